"""The main job end to end in its --quick form: every stage that exists runs as its own process and the report has a
section for each."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pipeline_quick_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--quick", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = (out / "report.md").read_text()
    import pipeline
    for stage in pipeline.STAGES:
        if (REPO / stage.script).is_file():
            m = json.loads((out / stage.out / "metrics.json").read_text())
            assert m.get("complete") is True, stage.name
    assert "## 1. Pretraining" in report and "fact recall" in report
    # a second run finds every stage complete and skips it
    r2 = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--quick", "--out", str(out)], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "skipped" in r2.stdout and "step 1/" not in r2.stdout
    # --only one stage still writes the whole report: every completed stage keeps its section
    r3 = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--quick", "--out", str(out), "--only", "eval_gatt"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert (out / "report.md").read_text() == report
