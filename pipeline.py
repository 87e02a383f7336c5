"""The main job: the whole Llama 2-Chat recipe on the built-in miniature world, stage by stage (paper Fig. 4), then
out/report.md with the paper's tables and figures in miniature.

  python pipeline.py            # every stage, defaults (minutes on a laptop CPU)
  python pipeline.py --quick    # the same path in seconds-to-a-minute per stage: a smoke test
  python pipeline.py --force    # rerun stages even when their outputs are complete
  python pipeline.py --only pretrain sft

Each stage runs as its own process (`python pretrain.py ...`), exactly as a student would run it alone, reading the
previous stage's directory. A stage whose metrics.json says complete, run with the same arguments, is skipped, so an
interrupted pipeline picks up where it stopped (and a stage interrupted mid-training resumes from its checkpoint).
The report is built only from the stages' metrics.json files: every number in it comes from this run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

REPO = Path(__file__).resolve().parent


@dataclass
class Stage:
    name: str
    script: str
    out: str  # directory under the output root
    args: list  # flags for the default run ({out} is replaced by the output root)
    quick: list  # extra flags for --quick
    seconds: float  # expected wall time of the default run on a 2-core laptop CPU (for the ETA)


STAGES = [
    Stage("pretrain", "pretrain.py", "pretrain", ["--out-dir", "{out}/pretrain"],
          ["--max-steps", "80", "--corpus-bytes", "1000000", "--eval-interval", "40", "--ckpt-interval", "80",
           "--log-interval", "20"], 270),
    Stage("sft", "sft.py", "sft", ["--init-from", "{out}/pretrain", "--out-dir", "{out}/sft"], ["--quick"], 120),
    Stage("rm_helpful", "reward.py", "rm_helpful", ["--axis", "helpfulness", "--init-from", "{out}/sft",
                                                    "--out-dir", "{out}/rm_helpful"], ["--quick"], 60),
    Stage("rm_safety", "reward.py", "rm_safety", ["--axis", "safety", "--init-from", "{out}/sft",
                                                  "--out-dir", "{out}/rm_safety"], ["--quick"], 60),
    Stage("eval_sft", "evaluate.py", "eval_sft", ["--a", "{out}/sft", "--b", "{out}/pretrain", "--rm-helpful",
                                                   "{out}/rm_helpful", "--rm-safety", "{out}/rm_safety",
                                                   "--out-dir", "{out}/eval_sft"], ["--quick"], 30),
]


@dataclass
class PipelineConfig:
    out: str = "out"  # output root: one directory per stage, and report.md
    quick: bool = False  # a seconds-to-minutes smoke version of every stage
    force: bool = False  # rerun stages whose outputs are complete
    only: list[str] = field(default_factory=list)  # run only these stages (names: pretrain sft rm_helpful ...)
    seed: int = 0  # passed to every stage
    device: str = "auto"  # passed to every stage


def stage_command(stage: Stage, cfg: PipelineConfig) -> list[str]:
    args = [a.replace("{out}", cfg.out) for a in stage.args] + (stage.quick if cfg.quick else [])
    return [sys.executable, str(REPO / stage.script), *args, "--seed", str(cfg.seed), "--device", cfg.device]


def is_done(stage_dir: Path, cmd: list[str]) -> bool:
    marker = stage_dir / "pipeline_command.json"
    return (common.read_metrics(stage_dir).get("complete") is True and marker.is_file()
            and json.loads(marker.read_text()) == cmd[1:])


def run_stage(stage: Stage, cfg: PipelineConfig, cmd: list[str]) -> float:
    stage_dir = Path(cfg.out) / stage.out
    marker = stage_dir / "pipeline_command.json"
    if stage_dir.exists() and (cfg.force or not marker.is_file() or json.loads(marker.read_text()) != cmd[1:]):
        shutil.rmtree(stage_dir)  # different arguments (or --force): start clean rather than resume a different run
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        common.die(f"stage {stage.name} failed (exit {proc.returncode}): {' '.join(cmd)}", proc.returncode)
    dt = time.perf_counter() - t0
    common.write_metrics(stage_dir, {"stage_seconds": dt})
    return dt


def main(cfg: PipelineConfig):
    stages = [s for s in STAGES if (REPO / s.script).is_file() and (not cfg.only or s.name in cfg.only)]
    unknown = set(cfg.only) - {s.name for s in STAGES}
    if unknown:
        common.die(f"--only: unknown stage(s) {sorted(unknown)}; stages: {' '.join(s.name for s in STAGES)}")
    scale = 0.15 if cfg.quick else 1.0
    todo = {s.name for s in stages if cfg.force or not is_done(Path(cfg.out) / s.out, stage_command(s, cfg))}
    remaining = sum(s.seconds * scale for s in stages if s.name in todo)
    t_all = time.perf_counter()
    print(f"[pipeline] stages: {', '.join(s.name + ('' if s.name in todo else ' (done)') for s in stages)}; "
          f"estimated {common.fmt_time(remaining)}", flush=True)
    for i, s in enumerate(stages, 1):
        cmd = stage_command(s, cfg)
        if s.name not in todo:
            print(f"[pipeline] {i}/{len(stages)} {s.name}: complete, skipped (--force reruns it)", flush=True)
            continue
        print(f"\n[pipeline] {i}/{len(stages)} {s.name}: {' '.join(cmd[1:])}\n[pipeline] stage ETA "
              f"{common.fmt_time(s.seconds * scale)}, total ETA {common.fmt_time(remaining)}", flush=True)
        dt = run_stage(s, cfg, cmd)
        remaining -= s.seconds * scale
        print(f"[pipeline] {s.name} done in {common.fmt_time(dt)}; remaining ETA {common.fmt_time(max(0, remaining))}",
              flush=True)
    path = write_report(Path(cfg.out), [s.name for s in stages])
    print(f"\n[pipeline] all stages done in {common.fmt_time(time.perf_counter() - t_all)}; report: {path}", flush=True)


# ---- the report: one section per stage, the paper's numbers beside ours --------------------------------------------
def _fmt(v, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def _plot(out: Path, name: str, series: dict, xlabel: str, ylabel: str) -> str:
    """A PNG line plot when matplotlib is installed (optional), else nothing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
    return f"\n![{name}]({name}.png)\n"


def section_pretrain(out: Path, m: dict) -> list[str]:
    lines = ["## 1. Pretraining (§2, Fig. 5)", "",
             "The paper trains 7B-70B models on 2T tokens and the loss is still falling at the end (Fig. 5). Here a "
             f"{_fmt(m.get('params'))}-parameter model sees {_fmt(m.get('tokens_seen'))} tokens of the miniature world.",
             "", "| measure | this run | what to look for |", "|---|---|---|",
             f"| train loss (last step) | {_fmt(m.get('train_loss'))} | falls steadily, like Fig. 5 |",
             f"| validation loss | {_fmt(m.get('val_loss'))} | far below the unigram entropy "
             f"{_fmt(m.get('unigram_entropy'))} nats: the model uses context |",
             f"| fact recall (completion prompts) | {_fmt(m.get('fact_recall'), pct=True)} | the world's facts are "
             "stored in the weights |",
             f"| training throughput | {_fmt(m.get('tokens_per_sec'))} tokens/s, MFU {_fmt(m.get('mfu'), pct=True)} "
             f"| on {m.get('device', '?')} |", ""]
    curve = m.get("loss_curve") or []
    if curve:
        pts = [curve[int(i * (len(curve) - 1) / 5)] for i in range(6)]
        lines += ["Loss curve (Fig. 5 in miniature): " + ", ".join(f"step {s}: {v:.3f}" for s, v in pts), ""]
        lines.append(_plot(out, "fig5_pretrain_loss", {"train": curve, "validation": m.get("val_curve")}, "step",
                           "loss"))
    if m.get("samples"):
        lines += ["Samples:", ""] + [f"    {s!r}" for s in m["samples"]] + [""]
    return lines


def section_generic(title: str, m: dict) -> list[str]:
    rows = [(k, v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [f"## {title}", "", "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]


def write_report(out: Path, stage_names: list[str]) -> Path:
    lines = ["# nanollama2: the Llama 2-Chat recipe in miniature", "",
             "Every number below was measured by this run (pipeline.py); the paper's own numbers are quoted beside "
             "them for the pattern to compare.", "", "| stage | wall time |", "|---|---|"]
    metrics = {name: common.read_metrics(out / next(s.out for s in STAGES if s.name == name)) for name in stage_names}
    lines += [f"| {n} | {common.fmt_time(m.get('stage_seconds', 0))} |" for n, m in metrics.items()] + [""]
    for name, m in metrics.items():
        if not m:
            continue
        lines += section_pretrain(out, m) if name == "pretrain" else section_generic(name, m)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main(common.parse_config(PipelineConfig, description=__doc__))
