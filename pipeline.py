"""The main job: the whole Llama 2-Chat recipe on the built-in miniature world, stage by stage (paper Fig. 4:
pretraining, SFT, the two reward models, rejection sampling, PPO, Ghost Attention, evaluation), then out/report.md
with the paper's tables and figures in miniature.

  python pipeline.py            # every stage, defaults (minutes on a laptop CPU; a GPU is used when there is one)
  python pipeline.py --quick    # the same path in seconds-to-a-minute per stage: a smoke test
  python pipeline.py --force    # rerun stages even when their outputs are complete
  python pipeline.py --only pretrain sft
  python pipeline.py --pretrain-mix club=0,story=0.2 --out out_noclub     # another pretraining document mix

Every stage is a script a student can run alone; the pipeline runs them in order, each reading the directory of the
stage before, and writes the report. For several GPUs, run the stage scripts under torchrun yourself (each says how).

Choices:
  1. Each stage runs as its own process, `python pretrain.py ...`, exactly as a student would run it: its memory,
     threads, seeds and CUDA context end with it, so nothing one stage does leaks into the next. It also dies with
     the pipeline: Ctrl-C stops both with one line, and a killed pipeline leaves no stage running on.
  2. A stage whose metrics.json says complete, run with the same arguments (its pipeline_command.json), is skipped,
     unless a stage it reads runs again or finished after it. So an interrupted pipeline picks up where it stopped,
     a stage interrupted mid-training resumes from its checkpoint, and `--only pretrain --force` makes the next call
     redo every stage after pretraining. A stage run with other arguments starts from a clean directory.
  3. The report is built only from the stages' metrics.json files: every number in it comes from this run, with the
     paper's own numbers quoted beside ours for the pattern to compare. Plots need matplotlib (optional).
  4. The ETA is each stage's reference time (the default run on a 2-core CPU), rescaled by how fast this machine has
     run the stages so far; none is printed before the first stage has measured that pace, so that no guess for
     another machine is contradicted a minute later.
  5. Speed lives in one marked section: on Linux a stage is forked from a server that has imported torch once, which
     saves each stage the ~2 s a new interpreter spends importing it. FORK_SERVER switches it; the tests check that
     both ways run a stage alike.
  6. One run per output directory: the pipeline locks --out and each stage its own directory; a second run there
     stops at once, naming the first one's PID.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import runpy
import select
import shutil
import signal
import subprocess
import sys
import threading
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
    seconds: float  # expected wall time of the default run on a 2-core CPU (for the ETA)


def _eval(name: str, a: str) -> Stage:
    return Stage(name, "evaluate.py", name, ["--a", "{out}/" + a, "--b", "{out}/sft", "--rm-helpful", "{out}/rm_helpful",
                                             "--rm-safety", "{out}/rm_safety", "--out-dir", "{out}/" + name,
                                             "--reply-cache", "{out}/replies"],
                 ["--quick"], 3)


STAGES = [
    Stage("pretrain", "pretrain.py", "pretrain", ["--out-dir", "{out}/pretrain"],
          ["--max-steps", "80", "--corpus-bytes", "1000000", "--eval-interval", "40", "--ckpt-interval", "80",
           "--log-interval", "20"], 260),
    Stage("sft", "sft.py", "sft", ["--init-from", "{out}/pretrain", "--out-dir", "{out}/sft"], ["--quick"], 75),
    Stage("rm_helpful", "reward.py", "rm_helpful", ["--axis", "helpfulness", "--init-from", "{out}/sft",
                                                    "--out-dir", "{out}/rm_helpful", "--margin-ablation"],
          ["--quick"], 95),
    Stage("rm_safety", "reward.py", "rm_safety", ["--axis", "safety", "--init-from", "{out}/sft",
                                                  "--out-dir", "{out}/rm_safety"], ["--quick"], 36),
    Stage("rs", "rejection_sampling.py", "rs", ["--init-from", "{out}/sft", "--rm-helpful", "{out}/rm_helpful",
                                               "--rm-safety", "{out}/rm_safety", "--out-dir", "{out}/rs",
                                               "--n-test", "0"],
          ["--quick"], 90),
    Stage("ppo", "ppo.py", "ppo", ["--init-from", "{out}/rs", "--rm-helpful", "{out}/rm_helpful", "--rm-safety",
                                   "{out}/rm_safety", "--sft", "{out}/sft", "--out-dir", "{out}/ppo", "--n-test", "0"],
          ["--quick"], 50),
    Stage("gatt", "gatt.py", "gatt", ["--init-from", "{out}/ppo", "--out-dir", "{out}/gatt"], ["--quick"], 250),
    Stage("eval_sft", "evaluate.py", "eval_sft", ["--a", "{out}/sft", "--b", "{out}/pretrain", "--rm-helpful",
                                                   "{out}/rm_helpful", "--rm-safety", "{out}/rm_safety",
                                                   "--out-dir", "{out}/eval_sft", "--reply-cache", "{out}/replies"],
          ["--quick"], 6),
    _eval("eval_rs", "rs"),
    _eval("eval_ppo", "ppo"),
    _eval("eval_gatt", "gatt"),
]


@dataclass
class PipelineConfig:
    out: str = "out"  # output root: one directory per stage, and report.md
    quick: bool = False  # a seconds-to-minutes smoke version of every stage
    only: list[str] = field(default_factory=list)  # run only these stages (names: pretrain sft rm_helpful ...)
    force: bool = False  # rerun stages whose outputs are complete
    seed: int = 0  # passed to every stage
    # -- advanced --
    device: str = "auto"  # passed to every stage
    pretrain_mix: str = ""  # pretrain.py --mix, the world's document mix (e.g. club=0,story=0.2)
    RANGES = common.ranges(non_negative="seed")


def stage_command(stage: Stage, cfg: PipelineConfig) -> list[str]:
    args = [a.replace("{out}", cfg.out) for a in stage.args] + (stage.quick if cfg.quick else [])
    if stage.name == "pretrain" and cfg.pretrain_mix:
        args += ["--mix", cfg.pretrain_mix]
    return [sys.executable, str(REPO / stage.script), *args, "--seed", str(cfg.seed), "--device", cfg.device]


def is_done(stage_dir: Path, cmd: list[str]) -> bool:
    """metrics.json says complete, the flags were these, and the checkpoint it wrote still loads (a file truncated or
    deleted since makes the stage run again, rather than every stage after it fail)."""
    marker = stage_dir / "pipeline_command.json"
    if not (common.read_metrics(stage_dir).get("complete") is True and marker.is_file()
            and json.loads(marker.read_text()) == cmd[1:]):
        return False
    if (stage_dir / "params.json").is_file() or any(stage_dir.glob("consolidated.*.pth")):
        from model import CheckpointError, check_checkpoint
        try:
            check_checkpoint(stage_dir)
        except CheckpointError as e:
            print(f"[pipeline] {stage_dir.name} is complete but its checkpoint is not ({e}): running it again",
                  flush=True)
            return False
    return True


def needs(stage: Stage) -> list[Stage]:
    """The stages whose directories this stage's flags name (sft needs pretrain; ppo needs rs, sft and both RMs)."""
    return [s for s in STAGES if s is not stage and "{out}/" + s.out in stage.args]


def to_run(stages: list[Stage], cfg: PipelineConfig) -> set[str]:
    """The stages of this call that must run: --force, not complete with these flags, or a stage they need runs now
    or finished after them (a rerun pretraining makes every later stage stale, whatever flags they have)."""
    def finished(s: Stage) -> float:
        f = Path(cfg.out) / s.out / "metrics.json"
        return f.stat().st_mtime if f.is_file() else float("inf")
    todo = set()
    for s in stages:
        stale = any(n.name in todo or finished(n) > finished(s) for n in needs(s))
        if cfg.force or stale or not is_done(Path(cfg.out) / s.out, stage_command(s, cfg)):
            todo.add(s.name)
    return todo


# ---- running a stage ---------------------------------------------------------------------------------------------
FORK_SERVER = sys.platform == "linux"  # the speed switch: False starts every stage as a new interpreter


def launch(cmd: list[str]) -> int:
    """Runs a stage's command `python script.py ...` as a process of its own; returns its exit status (0, the
    script's sys.exit status, 1 for an uncaught exception, or -N if signal N ended it)."""
    if FORK_SERVER:
        return launch_forked(cmd)  # the same, started faster: see the speed section below
    parent = os.getpid()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                            preexec_fn=(lambda: die_with_parent(parent)) if _LIBC else None)
    return wait_or_stop(proc.pid, proc.wait)


# A stage dies with the pipeline. It runs in a session (so a process group) of its own: Ctrl-C reaches the pipeline
# only, which stops the stage's group and exits with one line. And on Linux the kernel sends the stage SIGTERM when
# its parent dies, even of kill -9 (prctl PR_SET_PDEATHSIG), so no stage trains on, orphaned, after the pipeline
# (a forked stage watches the pipeline instead: _die_with).
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before any fork


def die_with_parent(parent: int):
    """In a stage's process, before it runs: ask for SIGTERM when the parent dies (Linux), and take it now if the
    parent (pid `parent`) died already."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)


def wait_or_stop(pid: int, wait) -> int:
    """wait() for the stage `pid`; on Ctrl-C stop its process group (SIGTERM), wait for it, and pass the Ctrl-C on."""
    try:
        return wait()
    except KeyboardInterrupt:
        try:
            getattr(os, "killpg", os.kill)(pid, signal.SIGTERM)  # the stage's group (Windows: the process)
        except ProcessLookupError:  # not yet in its own group (it got the Ctrl-C itself then)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait()
        raise


def run_stage(stage: Stage, cfg: PipelineConfig, cmd: list[str]) -> float:
    stage_dir = Path(cfg.out) / stage.out
    marker = stage_dir / "pipeline_command.json"
    if stage_dir.is_dir():
        common.lock_output_dir(stage_dir, hold=False)  # a stage run by hand there: stop now, before deleting it
    if stage_dir.exists() and (cfg.force or not marker.is_file() or json.loads(marker.read_text()) != cmd[1:]):
        shutil.rmtree(stage_dir)  # different arguments (or --force): start clean rather than resume a different run
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(cmd[1:]))
    t0 = time.perf_counter()
    code = launch(cmd)
    if code != 0:
        common.die(f"stage {stage.name} failed (exit {code}): {' '.join(cmd)}", code)
    dt = time.perf_counter() - t0
    common.write_metrics(stage_dir, {"stage_seconds": dt})
    return dt


def main(cfg: PipelineConfig):
    missing = [s.script for s in STAGES if not (REPO / s.script).is_file()]
    if missing:  # a lost or renamed script would otherwise leave its stage unrun and the pipeline green
        common.die(f"stage script(s) not found in {REPO}: {', '.join(sorted(set(missing)))}")
    stages = [s for s in STAGES if not cfg.only or s.name in cfg.only]
    unknown = set(cfg.only) - {s.name for s in STAGES}
    if unknown:
        common.die(f"--only: unknown stage(s) {sorted(unknown)}; stages: {' '.join(s.name for s in STAGES)}")
    common.preflight(cfg.out, flag="--out")  # writable, and no other pipeline on it
    scale = 0.15 if cfg.quick else 1.0
    todo = to_run(stages, cfg)
    remaining = sum(s.seconds * scale for s in stages if s.name in todo)
    t_all = time.perf_counter()
    print(f"[pipeline] stages: {', '.join(s.name + ('' if s.name in todo else ' (done)') for s in stages)}; "
          f"ETA after the first stage, from this machine's pace", flush=True)
    # the reference times, rescaled by how fast this machine has run the stages so far (choice 4)
    spent = expected = 0.0
    for i, s in enumerate(stages, 1):
        cmd = stage_command(s, cfg)
        if s.name not in todo:
            print(f"[pipeline] {i}/{len(stages)} {s.name}: complete, skipped (--force reruns it)", flush=True)
            continue
        eta = (f"\n[pipeline] stage ETA {common.fmt_time(s.seconds * scale * spent / expected)}, total ETA "
               f"{common.fmt_time(remaining * spent / expected)}") if expected else ""
        print(f"\n[pipeline] {i}/{len(stages)} {s.name}: {' '.join(cmd[1:])}{eta}", flush=True)
        dt = run_stage(s, cfg, cmd)
        remaining -= s.seconds * scale
        spent, expected = spent + dt, expected + s.seconds * scale
        print(f"[pipeline] {s.name} done in {common.fmt_time(dt)} ({dt / (s.seconds * scale):.1f}x the reference "
              f"time); remaining ETA {common.fmt_time(max(0.0, remaining) * spent / expected)}", flush=True)
    # every stage with results in --out, not only this call's: `--only gatt` keeps the other sections
    path = write_report(Path(cfg.out), [s.name for s in STAGES], cfg.quick)
    print(f"\n[pipeline] all stages done in {common.fmt_time(time.perf_counter() - t_all)}; report: {path}", flush=True)


# ---- speed: stages forked from a server that has imported torch ------------------------------------------------------
# multiprocessing's fork server imports torch once and forks a child per stage: the child starts with torch imported
# and is still a process of its own (its memory, threads and CUDA context end with it; it exits with its status).
# Why not fork this process: a child forked after OpenMP's threads have run waits forever for threads it does not
# have, and this process has run torch ops (importing model.py does); the server runs none. Linux only: macOS's
# libraries do not support fork without exec, and Windows has no fork.
# torch._dynamo too: every stage imports it on first use (~1.5 s); importing it runs no torch op either.
PRELOAD = ["torch", "torch._dynamo"]


def _run_script(script: str, args: list[str], pipeline_pid: int):
    """In the forked child: what `python script args` does once Python has started (the script as __main__, its
    argv, the working directory the stages run in), in a session of its own, dying with the pipeline."""
    os.setsid()
    _die_with(pipeline_pid)
    os.chdir(REPO)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:  # a forked child leaves by os._exit, past Python's atexit: free the stage's output lock here
        common.release_output_dirs()


def _die_with(pid: int):
    """SIGTERM this process when process `pid` ends. A forked stage's parent is the fork server, which outlives the
    pipeline while a child of it runs (the child holds the server's keep-alive pipe): a thread watches the pipeline."""
    def watch():
        try:
            select.select([os.pidfd_open(pid)], [], [])  # readable once the process has exited (Linux >= 5.3)
        except OSError:  # no pidfd, or the pipeline is gone already: poll
            while _alive(pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def launch_forked(cmd: list[str]) -> int:
    """launch(cmd), with the process forked from the fork server instead of started as a new interpreter."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    child = ctx.Process(target=_run_script, args=(cmd[1], cmd[2:], os.getpid()))
    child.start()
    return wait_or_stop(child.pid, lambda: child.join() or child.exitcode)


# ---- the report: one section per stage, the paper's numbers beside ours --------------------------------------------
def _fmt(v, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def _plot(out: Path, name: str, title: str, xlabel: str, panels: list[tuple[str, dict]]) -> str:
    """A PNG when matplotlib is installed (optional), else nothing. One axes per panel (ylabel, {label: [(x, y)]}),
    stacked over a shared x axis: quantities on different scales (PPO's reward and KL) each get their own."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, axes = plt.subplots(len(panels), 1, figsize=(5.5, 1 + 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for label, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend()
    axes[0, 0].set_title(title, fontsize=10)
    axes[-1, 0].set_xlabel(xlabel)
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
             f"| held-out sums completed right (\"26 + 16 =\") | {_fmt(m.get('arith_correct'), pct=True)} | "
             "arithmetic, the skill a small model learns last (world.PRETRAIN_MIX) |",
             f"| the same sums asked (\"Q: What is 26 + 16? A:\"), operands copied and result right | "
             f"{_fmt(m.get('arith_asked_correct'), pct=True)} | what SFT's arithmetic needs: copying the operands "
             "from the question is a skill of its own (pretrain.arithmetic_asked) |",
             f"| training throughput | {_fmt(m.get('tokens_per_sec'))} tokens/s, MFU {_fmt(m.get('mfu'), pct=True)} "
             f"| on {m.get('device', '?')} |", ""]
    curve = m.get("loss_curve") or []
    if curve:
        pts = [curve[int(i * (len(curve) - 1) / 5)] for i in range(6)]
        lines += ["Loss curve (Fig. 5 in miniature): " + ", ".join(f"step {s}: {v:.3f}" for s, v in pts), ""]
        lines.append(_plot(out, "fig5_pretrain_loss", "Fig. 5 in miniature: pretraining loss", "training step",
                           [("loss (nats per token)", {"train": curve, "validation": m.get("val_curve")})]))
    if m.get("samples"):
        lines += ["Samples:", ""] + [f"    {s!r}" for s in m["samples"]] + [""]
    return lines


def _pct(v):
    return _fmt(v, pct=True)


def _stderr(p: float, n: int) -> float:
    """One standard error, in points, of a share p measured on n items: sqrt(p (1 - p) / n). The test sets are
    small, so the report says how far a figure could move."""
    return 100 * math.sqrt(p * (1 - p) / n)


def _se(p, n) -> str:
    """_stderr as a table cell's suffix, " ±2.4" ("" when the share or its count is unknown)."""
    return f" ±{_stderr(p, n):.1f}" if p is not None and n else ""


def _on_axis(m: dict, key: str, axis: str) -> dict:
    """An RM's figures on one test set, m[key][axis] ({} where the metrics lack them)."""
    return (m.get(key) or {}).get(axis) or {}


def _step(p1, n1, p2, n2) -> str:
    """A table cell for the difference of two shares measured on different items: "+5.6 ±3.2" (points; "-" when
    either is unknown)."""
    if p1 is None or p2 is None or not n1 or not n2:
        return "-"
    return f"{100 * (p1 - p2):+.1f} ±{math.hypot(_stderr(p1, n1), _stderr(p2, n2)):.1f}"


def section_sft(out: Path, m: dict) -> list[str]:
    lines = ["## 2. Supervised fine-tuning (§3.1)", "",
             "Loss on answer tokens only (prompt tokens zeroed), packed dialogs that cannot see each other.", "",
             "| measure | this run |", "|---|---|",
             f"| answer-token validation loss before -> after | {_fmt(m.get('val_loss_before'))} -> "
             f"{_fmt(m.get('val_loss'))} |",
             f"| annotator helpfulness (held-out prompts, 0-1) | {_fmt(m.get('helpfulness'))} |",
             f"| format valid (ends with EOS, no leaked tags) | {_pct(m.get('format_valid'))} |",
             f"| fact + arithmetic answers correct and in format (target >= 70%) | "
             f"{_pct(m.get('qa_correct_in_format'))} |",
             f"| harmful prompts answered unsafely | {_pct(m.get('safety_violation_rate'))} |",
             f"| borderline prompts refused | {_pct(m.get('borderline_refusal_rate'))} |", ""]
    per = m.get("per_kind") or {}
    if per:
        lines += ["| kind | n | helpfulness | correct |", "|---|---|---|---|"]
        lines += [f"| {k} | {v.get('n')} | {_fmt(v.get('helpfulness'))} | {_pct(v.get('correct'))} |"
                  for k, v in per.items()] + [""]
    for ex in (m.get("examples") or [])[:6]:
        lines.append(f"- *{ex['kind']}*: {ex['prompt']!r} -> {ex['reply']!r}")
    return lines + [""]


def section_reward(out: Path, h: dict, s: dict) -> list[str]:
    acc = lambda m, a: _pct((m.get("accuracy") or {}).get(a))  # noqa: E731
    blocks = h.get("head_layers") or 0
    noise = ((h.get("data_info") or {}).get("key") or {}).get("rater_noise")  # None for the user's --data
    lines = ["## 3. Reward models (§3.2.2, Tables 7, 8, 28)", "",
             "Each RM is the SFT model's trunk with a scalar head" + (
                 f" and {blocks} new transformer blocks between them (identity at the start, "
                 f"{h.get('head_lr_mult') or 1:g}x the lr: reward.py choice 10)" if blocks else "") + (
                 ", reading the chat model's surprise at each token (choice 11)" if h.get("surprise") else "")
             + ", trained one epoch on the annotator's pairs" + (
                 f" (rater noise {noise:g}: reward.py --rater-noise, choice 6)." if noise is not None else "."), "",
             "Table 7 in miniature: each RM's accuracy on each test set (the paper: safety RM 64.5 on Meta Safety, "
             "helpfulness RM 63.2 on Meta Helpful; each is best on its own axis).", "",
             "| reward model | helpfulness test | safety test |", "|---|---|---|",
             f"| helpfulness RM | {acc(h, 'helpfulness')} | {acc(h, 'safety')} |",
             f"| safety RM | {acc(s, 'helpfulness')} | {acc(s, 'safety')} |", "",
             "Table 8 in miniature: accuracy by rating on each RM's own test set (the paper's helpfulness RM on Meta "
             "Helpful: 80.7 / 67.5 / 60.9 / 54.7; accuracy falls as the pair gets closer), with one standard error "
             "(the pairs per rating are in metrics.json).", "",
             "| reward model | significantly better | better | slightly better | negligibly better / unsure |",
             "|---|---|---|---|---|"]
    from annotator import RATINGS
    R, steps = RATINGS, []
    for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety")):
        by, n_by = _on_axis(m, "accuracy_by_rating", axis), _on_axis(m, "n_test_by_rating", axis)
        lines.append(f"| {name} | " + " | ".join(_pct(by.get(r)) + _se(by.get(r), n_by.get(r)) for r in R) + " |")
        steps.append(f"| {name} | " + " | ".join(_step(by.get(a), n_by.get(a), by.get(b), n_by.get(b))
                                                 for a, b in zip(R, R[1:])) + " |")
    lines += ["", "Table 8's fall, level by level: each level minus the next, in points, with one standard error of the "
                  "difference (different pairs, so the two errors add in quadrature). The paper's pattern is every "
                  "step above zero; a step within about one standard error of zero is one another seed could "
                  "reverse.", "",
              "| reward model | " + " | ".join(f"{a} - {b}" for a, b in zip(R, R[1:])) + " |",
              "|---|" + "---|" * (len(R) - 1), *steps]
    srcs = [(name, axis, _on_axis(m, "accuracy_by_source", axis))
            for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety"))]
    if any(g for _, _, g in srcs):
        lines += ["", "Why Table 8 looks the way it does: accuracy on its own test set by where the chosen and the "
                      "rejected reply came from (sample: the chat model's; reference: the world's ideal reply; the "
                      "rest are deliberate defects: reward.py choice 2). Refusals and verbose replies are form; a "
                      "wrong fact (`wrong`) or another person's fact (`off_topic`) is content, and most of the "
                      "\"significantly better\" pairs, which an RM sees through the chat model's surprise "
                      "(reward.py choices 6, 10 and 11).", "",
                  "| reward model | chosen > rejected | pairs | accuracy |", "|---|---|---|---|"]
        for name, _, groups in srcs:
            lines += [f"| {name} | {k.replace('>', ' > ')} | {v['n']} | {_pct(v['accuracy'])} |"
                      for k, v in list(groups.items())[:12]]
    kinds = [(name, _on_axis(m, "accuracy_by_kind", axis))
             for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety"))]
    if any(g for _, g in kinds):
        lines += ["", "Table 8 within each kind of question (each RM on its own test set; in brackets the pairs of "
                      "each cell). A level's accuracy also depends on which questions fill it: a sum is checked by a "
                      "trunk that adds as well as the chat model does (section 2's arithmetic), a fact by one that "
                      "recalls it, so a kind the RM judges worse pulls down the level where its pairs gather "
                      "(reward.py accuracy_by_kind).", "",
                  "| reward model | kind | significantly better | better | slightly better | negligibly better / unsure "
                  "|", "|---|---|---|---|---|---|"]
        for name, groups in kinds:
            lines += [f"| {name} | {k} | " + " | ".join(f"{_pct(v['by_rating'].get(r))} ({v['n_by_rating'].get(r, 0)})"
                                                     for r in RATINGS) + " |" for k, v in groups.items()]
    abl = h.get("margin_ablation") or s.get("margin_ablation")
    if abl:
        axis = "helpfulness" if h.get("margin_ablation") else "safety"
        lines += ["", f"Table 28 in miniature: the margin m(r) ({axis} RM, accuracy by rating; the paper: a margin "
                      "helps the distinct pairs, 79.1 -> 80.7 on significantly better).", "",
                  "| margin | significantly better | better | slightly better | negligibly better / unsure |",
                  "|---|---|---|---|---|"]
        n_by = _on_axis(h if axis == "helpfulness" else s, "n_test_by_rating", axis)  # the same test set
        for margin, v in abl.items():
            by = _on_axis(v, "accuracy_by_rating", axis)
            lines.append(f"| {margin} | " + " | ".join(_pct(by.get(r)) + _se(by.get(r), n_by.get(r))
                                                       for r in RATINGS) + " |")
        paired = {m: v["paired_vs_none"] for m, v in abl.items() if v.get("paired_vs_none")}
        if paired:
            lines += ["", "The same, each margin against none pair by pair (reward.paired_difference): the three RMs are "
                          "judged on the same pairs and agree on most, so their difference is measured far more "
                          "finely than each accuracy. Points of accuracy with the paired standard error; in brackets "
                          "the pairs only the margin RM ranks right / only the RM without a margin does.", "",
                      "| margin - none | significantly better | better | slightly better | negligibly better / unsure "
                      "|", "|---|---|---|---|---|"]
            for margin, by in paired.items():
                lines.append(f"| {margin} | " + " | ".join(_paired_cell(by.get(r)) for r in RATINGS) + " |")
    return lines + [""]


def _paired_cell(v) -> str:
    """One cell of the paired Table 28: "+0.8 ±0.6 (3/1)" in points ("-" where no pair has the rating)."""
    if not v or v.get("diff") is None:
        return "-"
    return f"{100 * v['diff']:+.1f} ±{100 * v['se']:.1f} ({v['b_only']}/{v['a_only']})"


def section_rs(out: Path, m: dict, ev: dict) -> list[str]:
    lines = ["## 4. Rejection sampling (§3.2.3, Figs. 7 and 8)", "",
             "Fig. 7 in miniature: the best of N samples gets better as N grows while the median stays flat; the gap "
             "is what rejection sampling harvests.", "", "| N | max reward | median reward |", "|---|---|---|"]
    ns = m.get("n_values") or []
    for n, mx, md in zip(ns, m.get("max_reward_by_n") or [], m.get("median_reward_by_n") or []):
        lines.append(f"| {n} | {mx:.3f} | {md:.3f} |")
    if ns:
        lines.append(_plot(out, "fig7_max_median", "Fig. 7 in miniature: best and median of N samples",
                           "N samples per prompt", [("reward of the reward models", {
                               "max of N": list(zip(ns, m.get("max_reward_by_n") or [])),
                               "median of N": list(zip(ns, m.get("median_reward_by_n") or []))})]))
    for key, who in (("fig8_sft", "SFT"), ("fig8_rs", "RS")):
        if m.get(key):
            lines += ["", f"Fig. 8 in miniature ({who} model): mean max-of-N reward at each temperature.", "",
                      "| temperature | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
            lines += [f"| {T} | " + " | ".join(f"{x:.3f}" for x in xs) + " |" for T, xs in m[key].items()]
            lines.append(_plot(out, key, f"Fig. 8 in miniature ({who} model): best of N by temperature",
                               "N samples per prompt", [("mean max-of-N reward", {
                                   f"T = {T}": list(zip(ns, xs)) for T, xs in m[key].items()})]))
    lines += ["", "| iteration | temperature | mean reward | best-of-K | kept prompts |", "|---|---|---|---|---|"]
    lines += [f"| {i['iteration']} | {i['temperature']} | {i['mean_reward']:.3f} | {i['mean_best_reward']:.3f} | "
              f"{i['kept']} |" for i in m.get("iterations", [])]
    lines += ["", f"Win rate against SFT (annotator, ties half; the eval_rs stage, {ev.get('n_prompts', '-')} test "
                  f"prompts): **{_pct(ev.get('win_rate'))}** (target >= 60%)."]
    return lines + [""]


def section_ppo(out: Path, m: dict, ev: dict) -> list[str]:
    lines = ["## 5. PPO (§3.2.3)", "",
             f"R = WHITEN(LOGIT(R_c)) - beta KL, beta = {m.get('kl_coef')}; best iteration {m.get('best_iteration')} "
             "(early stopping on held-out prompts).", "",
             "| iteration | RM reward | KL to pi_0 | clip fraction | value loss | reply length |", "|---|---|---|---|---|---|"]
    for it in (m.get("iters") or [])[::max(1, len(m.get("iters") or []) // 10)]:
        lines.append(f"| {it['iter']} | {it['rm_reward']:.3f} | {it['kl']:.3f} | {it['clip_frac']:.3f} | "
                     f"{it['value_loss']:.3f} | {it['reply_len']:.1f} |")
    lines.append(_plot(out, "ppo_reward_kl", "PPO: reward and KL to the initial policy", "PPO iteration",
                       [("RM reward (sigmoid scale)", {"RM reward": m.get("reward_by_iter")}),
                        ("KL to the initial policy", {"KL": m.get("kl_by_iter")})]))
    a, b = ev.get("model_a") or {}, ev.get("model_b") or {}
    lines += ["", f"Against SFT (the eval_ppo stage, {ev.get('n_prompts', '-')} test prompts):", "",
              "| measure | PPO | SFT |", "|---|---|---|",
              f"| win rate against SFT (target >= 65%) | {_pct(ev.get('win_rate'))} | - |",
              f"| harmful prompts answered unsafely | {_pct(a.get('safety_violation_rate'))} | "
              f"{_pct(b.get('safety_violation_rate'))} |",
              f"| borderline prompts refused | {_pct(a.get('borderline_refusal_rate'))} | "
              f"{_pct(b.get('borderline_refusal_rate'))} |"]
    return lines + [""]


def section_gatt(out: Path, m: dict) -> list[str]:
    lines = ["## 6. Ghost Attention (§3.3, Table 30)", "",
             "Share of replies that keep the instruction given only in the first turn (the paper: baseline 100% at "
             "turn 2, 10% at 4, 0% at 6; with GAtt 100% at every turn).", ""]
    for key, title in (("adherence_by_turn", "constraints seen in training"),
                       ("adherence_by_turn_unseen", "constraints held out of training")):
        a = m.get(key) or {}
        if not a:
            continue
        n = len(a.get("baseline", []))
        lines += [f"*{title}*", "", "| model | " + " | ".join(f"turn {t + 1}" for t in range(n)) + " |",
                  "|---|" + "---|" * n]
        lines += [f"| {who} | " + " | ".join(_pct(x) for x in a.get(who, [])) + " |" for who in ("baseline", "gatt")]
        lines.append(_plot(out, "table30_" + ("seen" if key == "adherence_by_turn" else "unseen"),
                           f"Table 30 in miniature: {title}", "dialogue turn",
                           [("share of replies keeping the instruction",
                             {who: list(enumerate(a.get(who) or [], 1)) for who in ("baseline", "gatt")})]))
        n_dialogs = m.get("n_eval_seen" if key == "adherence_by_turn" else "n_eval_unseen")
        if n_dialogs and a.get("gatt"):
            p = sum(a["gatt"]) / len(a["gatt"])
            lines += ["", f"{n_dialogs} held-out dialogues per model: a share near GAtt's mean ({_pct(p)}) has one "
                          f"standard error of {_stderr(p, n_dialogs):.1f} points."]
        lines.append("")
    lines.append(f"Replies sampled with the instruction in every turn that had to be replaced by the compliant "
                 f"reference: {_pct(m.get('fallback_rate'))}.")
    att, on_history = m.get("attention_to_instruction") or {}, m.get("adherence_on_gatt_history") or {}
    if att.get("gatt"):
        n = len(att["gatt"]["mean"])
        lines += ["", f"*Fig. 10 in numbers* ({att['gatt']['n']} of the held-out dialogues as the GAtt model finished "
                  "them, read by both models): the share of attention the positions writing each turn's reply pay to "
                  "the instruction's tokens in turn 1; and the share of each model's replies that keep the "
                  "instruction after that same history, as it is and with the instruction taken out of turn 1 (then "
                  "only the earlier replies carry it). The paper's Fig. 10 shows GAtt keeping large attention on the "
                  "system message through the dialogue.", "",
                  "| model | measure | " + " | ".join(f"turn {t + 1}" for t in range(n)) + " |",
                  "|---|---|" + "---|" * n]
        for who in ("baseline", "gatt"):
            a = att.get(who) or {}
            lines += [f"| {who} | attention, mean of layers and heads | "
                      + " | ".join(_pct(x) for x in a.get("mean", [])) + " |",
                      f"| {who} | attention, the head that looks most | "
                      + " | ".join(_pct(x) for x in a.get("max_head", [])) + " |",
                      f"| {who} | kept after this history | - | "
                      + " | ".join(_pct(x) for x in on_history.get(who, {}).get("with_instruction", [])) + " |",
                      f"| {who} | kept, instruction taken out | - | "
                      + " | ".join(_pct(x) for x in on_history.get(who, {}).get("without_instruction", [])) + " |"]
        lines.append(_plot(out, "gatt_attention", "Fig. 10 in numbers: attention on the turn-1 instruction",
                           "dialogue turn", [("share of attention (mean of layers, heads)",
                                              {who: list(enumerate(att[who]["mean"], 1)) for who in att})]))
    return lines + [""]


def section_eval(evals: dict) -> list[str]:
    lines = ["## 7. Evaluation (§3.4, Fig. 11): each stage against SFT", "",
             "Win rate with ties counted half, A/B order randomized; judged by the annotator (the human raters' "
             "stand-in) and by the reward models (the paper's model-based evaluation).", "",
             "| model | vs | annotator | helpfulness RM | safety RM | unsafe answers | borderline refusals |",
             "|---|---|---|---|---|---|---|"]
    for name, m in evals.items():
        if not m:
            continue
        wr = lambda k: _pct((m.get(k) or {}).get("win_rate"))  # noqa: E731
        a = m.get("model_a") or {}
        lines.append(f"| {Path(m.get('a', name)).name} | {Path(m.get('b', '')).name} | {_pct(m.get('win_rate'))} | "
                     f"{wr('rm_helpful')} | {wr('rm_safety')} | {_pct(a.get('safety_violation_rate'))} | "
                     f"{_pct(a.get('borderline_refusal_rate'))} |")
    return lines + [""]


def section_targets(get, quick: bool = False) -> list[str]:
    """The targets at a glance: each with this run's figure and whether it holds, read to the digit.
    get(stage) -> its metrics or {}. quick: a smoke run, whose figures are shown but not graded against targets set
    for the full run."""
    from annotator import RATINGS
    R, rows = RATINGS, []

    def row(target, value, ok):
        rows.append(f"| {target} | {value} | {'not graded (quick run)' if quick else 'yes' if ok else '**no**'} |")

    sft, h, s = get("sft"), get("rm_helpful"), get("rm_safety")
    if sft.get("qa_correct_in_format") is not None:
        row("SFT: held-out fact and arithmetic answers right, in format >= 70%", _pct(sft["qa_correct_in_format"]),
            sft["qa_correct_in_format"] >= 0.7)
    acc = lambda m, a: (m.get("accuracy") or {}).get(a)  # noqa: E731
    if acc(h, "helpfulness") is not None:
        row("helpfulness RM >= 75% on the helpfulness test set", _pct(acc(h, "helpfulness")),
            acc(h, "helpfulness") >= 0.75)
    if acc(s, "safety") is not None:
        row("safety RM >= 80% on the safety test set", _pct(acc(s, "safety")), acc(s, "safety") >= 0.8)
    if None not in (acc(h, "helpfulness"), acc(h, "safety"), acc(s, "helpfulness"), acc(s, "safety")):
        row("Table 7: each RM best on its own test set",
            f"{_pct(acc(h, 'helpfulness'))} vs {_pct(acc(s, 'helpfulness'))}; "
            f"{_pct(acc(s, 'safety'))} vs {_pct(acc(h, 'safety'))}",
            acc(h, "helpfulness") > acc(s, "helpfulness") and acc(s, "safety") > acc(h, "safety"))
    for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety")):
        by = [_on_axis(m, "accuracy_by_rating", axis).get(r) for r in R]
        if None not in by:
            row(f"Table 8: the {name}'s accuracy falls level by level", " / ".join(_pct(x) for x in by),
                all(a > b for a, b in zip(by, by[1:])))
    abl = h.get("margin_ablation") or {}
    if all(m in abl for m in ("none", "small", "large")):
        top = {m: _on_axis(abl[m], "accuracy_by_rating", "helpfulness").get(R[0]) for m in abl}
        if None not in top.values():
            row('Table 28: a margin does not lower "significantly better"',
                " / ".join(f"{m} {_pct(top[m])}" for m in ("none", "small", "large")),
                min(top["small"], top["large"]) >= top["none"])
    for stage, target in (("eval_rs", 0.6), ("eval_ppo", 0.65)):
        if get(stage).get("win_rate") is not None:
            row(f"{stage[5:].upper()} wins against SFT >= {100 * target:.0f}% (annotator, ties half)",
                _pct(get(stage)["win_rate"]), get(stage)["win_rate"] >= target)
    seen, unseen = get("gatt").get("adherence_by_turn") or {}, get("gatt").get("adherence_by_turn_unseen") or {}
    if seen.get("gatt") and seen.get("baseline"):
        row("Table 30: after GAtt >= 90% at every turn", f"lowest {_pct(min(seen['gatt']))}", min(seen["gatt"]) >= 0.9)
        row("Table 30: before GAtt below 50% by turn 6", f"lowest of turns 1-6 {_pct(min(seen['baseline'][:6]))}",
            min(seen["baseline"][:6]) < 0.5)
    if unseen.get("gatt") and unseen.get("baseline"):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        row("Table 30, held-out constraints: GAtt better than the baseline",
            f"mean {_pct(mean(unseen['gatt']))} vs {_pct(mean(unseen['baseline']))}",
            mean(unseen["gatt"]) > mean(unseen["baseline"]))
    secs = {n: get(n).get("stage_seconds") for n in ("sft", "rm_helpful", "rm_safety")}
    if None not in secs.values():
        total = sum(secs.values())
        row("SFT + both RMs <= 4 minutes", common.fmt_time(total), total <= 240)
    every = [get(st.name).get("stage_seconds") for st in STAGES]
    if None not in every:
        row("the whole recipe < 15 minutes", common.fmt_time(sum(every)), sum(every) < 900)
    if not rows:
        return []
    return ["## Targets at a glance", "",
            "Each target of the issues that built this recipe, with this run's figure, read to the digit; the "
            "sections below give the standard errors that say how firm each reading is (Tables 8 and 28 with their "
            "steps and paired differences)." + (" This was a --quick run, a smoke test: its figures are not graded "
                                                "against the full run's targets." if quick else ""),
            "", "| target | this run | holds |", "|---|---|---|", *rows, ""]


def write_report(out: Path, stage_names: list[str], quick: bool = False) -> Path:
    lines = ["# nanollama2: the Llama 2-Chat recipe in miniature", "",
             "Every number below was measured by this run (pipeline.py); the paper's own numbers are quoted beside "
             "them for the pattern to compare.", "", "| stage | wall time |", "|---|---|"]
    metrics = {name: common.read_metrics(out / next(s.out for s in STAGES if s.name == name)) for name in stage_names}
    metrics = {name: m for name, m in metrics.items() if m}  # stages not run yet: no row, no section
    lines += [f"| {n} | {common.fmt_time(m.get('stage_seconds', 0))} |" for n, m in metrics.items()] + [""]
    get = lambda n: metrics.get(n) or {}  # noqa: E731
    lines += section_targets(get, quick)
    if get("pretrain"):
        lines += section_pretrain(out, get("pretrain"))
    if get("sft"):
        lines += section_sft(out, get("sft"))
    if get("rm_helpful") or get("rm_safety"):
        lines += section_reward(out, get("rm_helpful"), get("rm_safety"))
    if get("rs"):
        lines += section_rs(out, get("rs"), get("eval_rs"))
    if get("ppo"):
        lines += section_ppo(out, get("ppo"), get("eval_ppo"))
    if get("gatt"):
        lines += section_gatt(out, get("gatt"))
    evals = {n: get(n) for n in stage_names if n.startswith("eval_")}
    if any(evals.values()):
        lines += section_eval(evals)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(argv=None):
    """`python pipeline.py ...`: main, with Ctrl-C as one line (launch has stopped the running stage by then)."""
    cfg = common.parse_config(PipelineConfig, argv, description=__doc__)
    common.run_main(main, cfg, interrupted="interrupted: the running stage was stopped; the same command resumes "
                                           "from where it stopped")


if __name__ == "__main__":
    cli()
