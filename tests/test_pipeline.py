"""The main job end to end in its --quick form: every stage runs as its own process and the report has a
section for each."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from annotator import PREFERENCE_NOISE

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pipeline_quick_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--quick", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = (out / "report.md").read_text()
    import pipeline
    for stage in pipeline.STAGES:  # every stage: a missing script is a failure here, not a stage to pass over
        assert (REPO / stage.script).is_file(), f"{stage.name}: {stage.script} not found"
        m = json.loads((out / stage.out / "metrics.json").read_text())
        assert m.get("complete") is True, stage.name
    assert "## 1. Pretraining" in report and "fact recall" in report
    assert "## Targets at a glance" in report and "| the whole recipe <= 15 minutes |" in report  # every stage ran
    assert "Fig. 10 in numbers" in report and "kept, instruction taken out" in report  # GAtt's attention (§3.3)
    # the paper's RMs, on pairs labelled at the preference raters' noise (reward.py choice 6), three versions
    assert "scalar head (the paper's form)" in report and f"rater noise {PREFERENCE_NOISE:g}" in report
    assert "Table 26 in miniature" in report and "| 3 | rlhf_v2, rlhf_v1, sft |" in report
    assert "Fig. 11 in miniature" in report and "| RLHF-V3 | sft |" in report
    # a second run finds every stage complete and skips it
    r2 = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--quick", "--out", str(out)], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "skipped" in r2.stdout and "step 1/" not in r2.stdout
    # --only one stage still writes the whole report: every completed stage keeps its section
    r3 = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--quick", "--out", str(out), "--only", "eval_gatt"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert (out / "report.md").read_text() == report


def fake_finished_stages(root):
    """Every stage's directory under root, marked complete with the pipeline's own command for it, finished in
    pipeline order (metrics.json's mtime): what pipeline.to_run reads. Returns the PipelineConfig."""
    import os
    import pipeline
    cfg = pipeline.PipelineConfig(out=str(root))
    for i, s in enumerate(pipeline.STAGES):
        d = root / s.out
        d.mkdir()
        (d / "pipeline_command.json").write_text(json.dumps(pipeline.stage_command(s, cfg)[1:]))
        (d / "metrics.json").write_text(json.dumps({"complete": True}))
        os.utime(d / "metrics.json", (1000 + i, 1000 + i))
    return cfg


def test_a_rerun_stage_makes_every_stage_that_reads_it_stale(tmp_path):
    """pipeline.to_run: complete stages with the same flags are skipped, unless a stage they read (their --init-from,
    --rm-helpful, ... directories) has finished after them or runs in this call; another pretraining mix changes
    pretrain's flags and so reruns everything. Fake stage directories, nothing is trained."""
    import os
    import pipeline
    cfg = fake_finished_stages(tmp_path)
    names = {s.name for s in pipeline.STAGES}
    assert pipeline.to_run(pipeline.STAGES, cfg) == set()
    ppo = next(s for s in pipeline.STAGES if s.name == "ppo")
    assert {s.name for s in pipeline.needs(ppo)} == {"rs_v3", "rm_helpful_v3", "rm_safety_v3", "sft"}
    rm_s2 = next(s for s in pipeline.STAGES if s.name == "rm_safety_v2")  # reads the batch rm_helpful_v2 collected
    assert {s.name for s in pipeline.needs(rm_s2)} == {"sft", "rs_v1", "rm_helpful_v2", "rm_safety_v1"}
    os.utime(tmp_path / "rm_safety_v2" / "metrics.json", (5000, 5000))  # rerun alone (--only --force)
    done = {"pretrain", "sft", "rm_helpful_v1", "rm_safety_v1", "rs_v1", "rm_helpful_v2", "rm_safety_v2", "eval_sft"}
    assert pipeline.to_run(pipeline.STAGES, cfg) == names - done
    other_mix = pipeline.PipelineConfig(out=str(tmp_path), pretrain_mix="club=0,story=0.2")
    assert pipeline.to_run(pipeline.STAGES, other_mix) == names
    assert pipeline.stage_command(pipeline.STAGES[0], other_mix)[-5:-4] == ["club=0,story=0.2"]


@pytest.mark.parametrize("fork_server", [False, True])
def test_launch_runs_a_script_as_python_would_and_returns_its_exit_status(tmp_path, monkeypatch, fork_server):
    """pipeline.launch, the plain way (a new interpreter) and the fast one (a child of the fork server, the default on
    Linux): the same behaviour either way: the script runs as __main__ with its argv, from the repository, and its
    exit status comes back (the status sys.exit gives, 1 for an uncaught exception). The scripts use no torch: a fork
    of this test process, whose OpenMP threads have run, is safe only for them (the pipeline forks from a server)."""
    import pipeline
    if fork_server and sys.platform != "linux":
        pytest.skip("the fork server is the Linux path")
    monkeypatch.setattr(pipeline, "FORK_SERVER", fork_server)
    script = tmp_path / "stage.py"
    script.write_text(
        "import json, os, sys\n"
        "if __name__ == '__main__':\n"
        "    out, code = sys.argv[1], sys.argv[2]\n"
        "    json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open(out, 'w'))\n"
        "    if code == 'raise':\n"
        "        raise RuntimeError('a bug in the stage')\n"
        "    sys.exit(int(code))\n")
    for code, want in (("0", 0), ("3", 3), ("raise", 1)):
        out = tmp_path / f"seen_{code}.json"
        assert pipeline.launch([sys.executable, str(script), str(out), code]) == want
        seen = json.loads(out.read_text())
        assert seen == {"argv": [str(out), code], "cwd": str(pipeline.REPO)}


def test_launch_is_safe_after_this_process_ran_torch(tmp_path):
    """The reason launch() forks from a fork server: a process whose OpenMP threads have run (here a matmul on every
    core) and that then forks a stage which runs torch ops in parallel sees the child wait forever for threads it does
    not have (it did, with a plain fork: the second stage of `pipeline.py --quick` hung in its first cos()). Here such a
    parent launches such a stage, twice, under a timeout. The stage starts with what the server preloads imported
    (pipeline.PRELOAD: torch._dynamo, ~1.4 s of each stage's start otherwise), so that import ran no torch op either."""
    script = tmp_path / "stage.py"
    script.write_text("import sys\nassert 'torch._dynamo' in sys.modules, 'torch._dynamo was not preloaded'\n"
                      "import torch\nx = torch.randn(2_000_000)\nprint(float(x.cos().sum() + (x @ x)))\n")
    parent = ("import sys, torch\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "a = torch.randn(512, 512)\n"
              "(a @ a).cos().sum()\n"  # OpenMP's threads start in this process
              "import pipeline\n"
              f"codes = [pipeline.launch([sys.executable, {str(script)!r}]) for _ in range(2)]\n"
              "sys.exit(max(codes))\n")
    r = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.split()) == 2


def _gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (an orphan's is reaped by init, which a container may not run)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
@pytest.mark.parametrize("fork_server", [False, True])
def test_a_stage_dies_with_the_pipeline(tmp_path, fork_server, how):
    """A stand-in stage that would sleep for two minutes: when the pipeline is killed (kill -9, no chance to clean
    up) or interrupted (Ctrl-C: SIGINT to the terminal's foreground group), the stage is gone within seconds, and
    Ctrl-C ends the pipeline with one line on stderr, no traceback, either way a stage is launched."""
    import os
    import signal
    import time
    stage, pid_file = tmp_path / "stage.py", tmp_path / "stage.pid"
    stage.write_text(f"import os, time\nopen({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
                     f"os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\ntime.sleep(120)\n")
    parent = (f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport pipeline\npipeline.FORK_SERVER = {fork_server}\n"
              f"pipeline.STAGES[:] = [pipeline.Stage('standin', {str(stage)!r}, 'standin', [], [], 1.0)]\n"
              f"pipeline.cli(['--out', {str(tmp_path / 'out')!r}])\n")
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", parent], stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not pid_file.exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-2000:]
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        if how == "kill -9":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C (the pipeline leads its group here)
        code = proc.wait(timeout=30)
        deadline = time.time() + 5
        while not _gone(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert _gone(pid), f"the stage (pid {pid}) outlived the pipeline"
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "Ctrl-C":
        err = (tmp_path / "stderr").read_text().strip()
        assert code == 130 and err.startswith("error: interrupted") and len(err.splitlines()) == 1, err


def test_every_stage_has_its_script():
    """pipeline.py runs the stages whose scripts exist and passes over the others: a stage script renamed or lost
    would leave the pipeline green and that stage unrun. Here it fails, in the fast tests."""
    import pipeline
    assert pipeline.STAGES
    for stage in pipeline.STAGES:
        assert (REPO / stage.script).is_file(), f"{stage.name}: {stage.script} not found"


def test_a_finished_stage_whose_checkpoint_was_cut_short_runs_again(tmp_path, capsys):
    """pipeline.is_done re-reads what a complete stage wrote: a consolidated.00.pth truncated since (a full disk, a
    killed copy) makes that stage and every stage after it run again, with a one-line note, not "complete, skipped"."""
    import model as M
    import pipeline
    cfg = fake_finished_stages(tmp_path)
    M.save_checkpoint(M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)),
                      tmp_path / "sft")
    assert pipeline.to_run(pipeline.STAGES, cfg) == set()
    pth = tmp_path / "sft" / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[:-50])
    assert pipeline.to_run(pipeline.STAGES, cfg) == {s.name for s in pipeline.STAGES} - {"pretrain"}
    assert f"[pipeline] sft is complete but its checkpoint is not ({pth}: incomplete" in capsys.readouterr().out


def test_the_first_eta_agrees_with_the_next(tmp_path, monkeypatch, capsys):
    """A fake clock: three stages that take 3x, 3.3x and 3x their reference times. No ETA is printed before the first
    stage has measured this machine's pace; the first one printed (after stage 1) and the next (after stage 2, plus
    the time stage 2 took) agree within 10%, as does the first with the time really left. (Printing the reference
    total first, as the pipeline once did, is 3x off here.)"""
    import re
    import pipeline
    clock = [0.0]
    stages = [pipeline.Stage(n, "pretrain.py", n, [n], [], ref) for n, ref in (("a", 100), ("b", 200), ("c", 300))]
    pace = {"a": 3.0, "b": 3.3, "c": 3.0}

    def launch(cmd):  # cmd[2]: the stage's name, its only flag here
        clock[0] += pace[cmd[2]] * next(s.seconds for s in stages if s.name == cmd[2])
        return 0
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "launch", launch)
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    pipeline.main(pipeline.PipelineConfig(out=str(tmp_path / "out")))
    out = capsys.readouterr().out
    assert "ETA after the first stage" in out.splitlines()[0]
    assert not re.search(r"ETA \d", out.split("[pipeline] a done")[0])  # no figure before stage a's pace
    etas = [int(m) * 60 + int(s) for m, s in re.findall(r"remaining ETA (\d+)m(\d\d)s", out)]
    left_after_a = pace["b"] * 200 + pace["c"] * 300  # what really came
    assert abs(etas[0] / left_after_a - 1) < 0.1 and abs(etas[0] / (etas[1] + pace["b"] * 200) - 1) < 0.1, etas


def test_the_stages_follow_the_iterative_recipe():
    """pipeline.stages(2): DESIGN.md's data flow for RLHF-V1 and V2, read off each stage's flags. Version k's batch
    is sampled from the latest model first, then the earlier ones; its RMs train on every batch so far and are
    compared with the last round's; RS samples from the latest model and fine-tunes SFT, keeping the earlier
    versions' best; PPO starts from the last RS model; GAtt from PPO's."""
    import pipeline

    def flag(stage, name):  # the values after --name, up to the next flag
        args = stage.args[stage.args.index(name) + 1:]
        return args[:next((i for i, a in enumerate(args) if a.startswith("--")), len(args))]
    st = {s.name: s for s in pipeline.stages(2)}
    assert [n for n in st if not n.startswith("eval_")] == [
        "pretrain", "sft", "rm_helpful_v1", "rm_safety_v1", "rs_v1", "rm_helpful_v2", "rm_safety_v2", "rs_v2", "ppo",
        "gatt"]
    assert flag(st["rm_helpful_v1"], "--sample-from") == ["{out}/sft"]
    assert "--previous-rm" not in st["rm_helpful_v1"].args and "--previous" not in st["rs_v1"].args
    assert flag(st["rm_safety_v2"], "--sample-from") == ["{out}/rlhf_v1", "{out}/sft"]
    assert flag(st["rm_safety_v2"], "--prefs-dir") == ["{out}/prefs/batch_2"]
    assert flag(st["rm_safety_v2"], "--earlier-prefs") == ["{out}/prefs/batch_1"]
    assert flag(st["rm_safety_v2"], "--previous-rm") == ["{out}/rm_safety_v1"]
    assert flag(st["rm_helpful_v2"], "--init-from") == ["{out}/sft"]  # every round's RMs start from SFT
    assert "--margin-ablation" in st["rm_helpful_v2"].args and "--margin-ablation" not in st["rm_helpful_v1"].args
    assert (st["rs_v1"].out, st["rs_v2"].out, st["ppo"].out) == ("rlhf_v1", "rlhf_v2_rs", "rlhf_v2")
    assert flag(st["rs_v2"], "--init-from") == ["{out}/rlhf_v1"] and flag(st["rs_v2"], "--base") == ["{out}/sft"]
    assert flag(st["rs_v2"], "--previous") == ["{out}/rlhf_v1"] and flag(st["rs_v2"], "--rm-safety") == [
        "{out}/rm_safety_v2"]
    assert flag(st["ppo"], "--init-from") == ["{out}/rlhf_v2_rs"] and flag(st["gatt"], "--init-from") == [
        "{out}/rlhf_v2"]
    assert flag(st["eval_ppo_vs_rs"], "--b") == ["{out}/rlhf_v2_rs"]
    assert all(flag(s, "--rm-helpful") == ["{out}/rm_helpful_v2"] for n, s in st.items() if n.startswith("eval_v"))
    assert [s.name for s in pipeline.STAGES] == [s.name for s in pipeline.stages(pipeline.ROUNDS)]
