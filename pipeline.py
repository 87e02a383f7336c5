"""The main job: the whole Llama 2-Chat recipe on the built-in miniature world, stage by stage (paper Fig. 4 and
§3.2.3's iterative fine-tuning), then out/report.md with the paper's tables and figures in miniature (report.py).

  python pipeline.py            # every stage, defaults (minutes on a laptop CPU; a GPU is used when there is one)
  python pipeline.py --rounds 2 # RLHF-V1 and V2 only (default 3 versions; the paper trained V1 ... V5)
  python pipeline.py --quick    # the same path in seconds-to-a-minute per stage: a smoke test
  python pipeline.py --force    # rerun stages even when their outputs are complete
  python pipeline.py --only pretrain sft
  python pipeline.py --pretrain-mix club=0,story=0.2 --out out_noclub     # another pretraining document mix

The stages (DESIGN.md's data flow), for N = --rounds versions:
  pretrain -> out/pretrain; sft -> out/sft (version 0)
  for k = 1 .. N:
    rm_helpful_vk: a new batch of preference pairs sampled from the latest chat model and earlier ones, rated by the
                   annotator (out/prefs/batch_k), and the helpfulness RM on every batch so far -> out/rm_helpful_vk
    rm_safety_vk:  the safety RM on the same batches -> out/rm_safety_vk
    rs_vk:         rejection sampling from the latest model with these RMs, the best reply of every iteration so far
                   -> out/rlhf_vk (the last version's: out/rlhf_vN_rs)
  ppo: PPO from out/rlhf_vN_rs with the last RMs -> out/rlhf_vN;  gatt: Ghost Attention on it -> out/gatt
  eval_*: each version against SFT (Fig. 11) and against the version before, PPO against its start, GAtt.
Every stage is a script a student can run alone; the pipeline runs them in order, each reading the directories of
the stages before, and writes the report. For several GPUs, run the stage scripts under torchrun yourself.

Choices:
  1. Each stage runs as its own process, `python pretrain.py ...`, exactly as a student would run it: its memory,
     threads, seeds and CUDA context end with it, so nothing one stage does leaks into the next. It also dies with
     the pipeline: Ctrl-C stops both with one line, and a killed pipeline leaves no stage running on.
  2. A stage whose metrics.json says complete, run with the same arguments (its pipeline_command.json), is skipped,
     unless a stage it reads runs again or finished after it. So an interrupted pipeline picks up where it stopped,
     a stage interrupted mid-training resumes from its checkpoint, and `--only pretrain --force` makes the next call
     redo every stage after pretraining. A stage run with other arguments starts from a clean directory.
  3. The report (report.py) is built only from the stages' metrics.json files: every number in it comes from this run,
     with the paper's own numbers quoted beside ours for the pattern to compare. Plots need matplotlib (optional).
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
from report import write_report

REPO = Path(__file__).resolve().parent


@dataclass
class Stage:
    name: str
    script: str
    out: str  # directory under the output root
    args: list  # flags for the default run ({out} is replaced by the output root)
    quick: list  # extra flags for --quick
    seconds: float  # expected wall time of the default run on a 2-core CPU (for the ETA)
    reads: list = field(default_factory=list)  # stages it depends on beyond the directories its flags name


def _eval(name: str, a: str, b: str, rounds: int) -> Stage:
    """evaluate.py: model a against model b, judged by the annotator and by the latest reward models."""
    return Stage(name, "evaluate.py", name, ["--a", "{out}/" + a, "--b", "{out}/" + b,
                                             "--rm-helpful", f"{{out}}/rm_helpful_v{rounds}",
                                             "--rm-safety", f"{{out}}/rm_safety_v{rounds}",
                                             "--out-dir", "{out}/" + name, "--reply-cache", "{out}/replies"],
                 ["--quick"], 2)


def version_dir(k: int) -> str:
    """The directory of chat model version k: sft (k = 0), then rlhf_vk (the last version's is PPO's; its RS model,
    PPO's start, is rlhf_vN_rs)."""
    return "sft" if k == 0 else f"rlhf_v{k}"


def stages(rounds: int = 3) -> list[Stage]:
    """The recipe as stages (DESIGN.md's data flow, paper Fig. 4 and §3.2.3's RLHF-V1 ... VN):
    pretrain, sft; for each version k: a new batch of preference pairs from the latest models and both reward models
    on every batch so far (rm_helpful_vk collects the batch, rm_safety_vk reuses it), rejection sampling from the
    latest model; PPO on the last version's RS model; GAtt on the final model; then the evaluations."""
    out = [Stage("pretrain", "pretrain.py", "pretrain", ["--out-dir", "{out}/pretrain"],
                 ["--max-steps", "80", "--corpus-bytes", "1000000", "--eval-interval", "40", "--ckpt-interval", "80",
                  "--log-interval", "20"], 190),
           Stage("sft", "sft.py", "sft", ["--init-from", "{out}/pretrain", "--out-dir", "{out}/sft"], ["--quick"], 50)]
    for k in range(1, rounds + 1):
        latest = version_dir(k - 1)
        models = ["{out}/" + latest] + ["{out}/" + version_dir(j) for j in range(k - 2, -1, -1)]
        for axis, name in (("helpfulness", "helpful"), ("safety", "safety")):
            args = ["--axis", axis, "--init-from", "{out}/sft", "--sample-from", *models,
                    "--prefs-dir", f"{{out}}/prefs/batch_{k}", "--out-dir", f"{{out}}/rm_{name}_v{k}"]
            if k > 1:
                args += ["--earlier-prefs", *[f"{{out}}/prefs/batch_{j}" for j in range(1, k)],
                         "--previous-rm", f"{{out}}/rm_{name}_v{k - 1}"]
            if axis == "helpfulness" and k == rounds:
                args.append("--margin-ablation")  # Table 28, on the last round's data
            out.append(Stage(f"rm_{name}_v{k}", "reward.py", f"rm_{name}_v{k}", args, ["--quick"],
                             (55 if k == rounds else 28) if axis == "helpfulness" else 10,
                             reads=[f"rm_helpful_v{k}"] if axis == "safety" else []))
        rs_out = f"rlhf_v{k}" if k < rounds else f"rlhf_v{k}_rs"
        out.append(Stage(f"rs_v{k}", "rejection_sampling.py", rs_out,
                         ["--init-from", "{out}/" + latest, "--base", "{out}/sft", "--iterations", "1",
                          "--rm-helpful", f"{{out}}/rm_helpful_v{k}", "--rm-safety", f"{{out}}/rm_safety_v{k}",
                          *(["--previous", f"{{out}}/rlhf_v{k - 1}"] if k > 1 else []),  # its kept set holds all before
                          "--out-dir", "{out}/" + rs_out, "--n-test", "0"], ["--quick"], 20))
    final = f"rlhf_v{rounds}"
    out += [
        Stage("ppo", "ppo.py", final, ["--init-from", f"{{out}}/{final}_rs", "--rm-helpful",
                                       f"{{out}}/rm_helpful_v{rounds}", "--rm-safety", f"{{out}}/rm_safety_v{rounds}",
                                       "--sft", "{out}/sft", "--out-dir", "{out}/" + final, "--n-test", "0"],
              ["--quick"], 60),
        Stage("gatt", "gatt.py", "gatt", ["--init-from", "{out}/" + final, "--out-dir", "{out}/gatt"], ["--quick"],
              25),
        Stage("eval_sft", "evaluate.py", "eval_sft", ["--a", "{out}/sft", "--b", "{out}/pretrain", "--out-dir",
                                                       "{out}/eval_sft", "--reply-cache", "{out}/replies"],
              ["--quick"], 2),
    ]
    # Fig. 11: every version against SFT; each version against the one before; PPO against its start; GAtt
    out += [_eval(f"eval_v{k}", f"rlhf_v{k}" if k < rounds else f"{final}_rs", "sft", rounds)
            for k in range(1, rounds + 1)]
    out += [_eval(f"eval_v{k}_vs_v{k - 1}", f"rlhf_v{k}" if k < rounds else f"{final}_rs", f"rlhf_v{k - 1}", rounds)
            for k in range(2, rounds + 1)]
    out += [_eval("eval_ppo_vs_sft", final, "sft", rounds), _eval("eval_ppo_vs_rs", final, f"{final}_rs", rounds),
            _eval("eval_gatt", "gatt", "sft", rounds)]
    return out


ROUNDS = 3  # the versions RLHF-V1 ... V3 of the default run (§3.2.3: V1 ... V5)
STAGES = stages(ROUNDS)


@dataclass
class PipelineConfig:
    out: str = "out"  # output root: one directory per stage, and report.md
    quick: bool = False  # a seconds-to-minutes smoke version of every stage
    only: list[str] = field(default_factory=list)  # run only these stages (names: pretrain sft rm_helpful_v1 ...)
    force: bool = False  # rerun stages whose outputs are complete
    seed: int = 0  # passed to every stage
    rounds: int = ROUNDS  # RLHF versions: each a new preference batch, new reward models, rejection sampling (§3.2.3)
    # -- advanced --
    device: str = "auto"  # passed to every stage
    pretrain_mix: str = ""  # pretrain.py --mix, the world's document mix (e.g. club=0,story=0.2)
    RANGES = common.ranges(non_negative="seed", positive="rounds")


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


def needs(stage: Stage, all_stages: list[Stage] = STAGES) -> list[Stage]:
    """The stages whose directories this stage's flags name (sft needs pretrain; ppo needs its RS model, sft and both
    RMs), and those it reads otherwise (rm_safety_vk reads the batch rm_helpful_vk collected)."""
    return [s for s in all_stages if s is not stage and ("{out}/" + s.out in stage.args or s.name in stage.reads)]


def to_run(stages: list[Stage], cfg: PipelineConfig, all_stages: list[Stage] = STAGES) -> set[str]:
    """The stages of this call that must run: --force, not complete with these flags, or a stage they need runs now
    or finished after them (a rerun pretraining makes every later stage stale, whatever flags they have)."""
    def finished(s: Stage) -> float:
        f = Path(cfg.out) / s.out / "metrics.json"
        return f.stat().st_mtime if f.is_file() else float("inf")
    todo = set()
    for s in stages:
        stale = any(n.name in todo or finished(n) > finished(s) for n in needs(s, all_stages))
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
    every = STAGES if cfg.rounds == ROUNDS else stages(cfg.rounds)
    missing = [s.script for s in every if not (REPO / s.script).is_file()]
    if missing:  # a lost or renamed script would otherwise leave its stage unrun and the pipeline green
        common.die(f"stage script(s) not found in {REPO}: {', '.join(sorted(set(missing)))}")
    todo_stages = [s for s in every if not cfg.only or s.name in cfg.only]
    unknown = set(cfg.only) - {s.name for s in every}
    if unknown:
        common.die(f"--only: unknown stage(s) {sorted(unknown)}; stages: {' '.join(s.name for s in every)}")
    common.preflight(cfg.out, flag="--out")  # writable, and no other pipeline on it
    scale = 0.15 if cfg.quick else 1.0
    todo = to_run(todo_stages, cfg, every)
    remaining = sum(s.seconds * scale for s in todo_stages if s.name in todo)
    t_all = time.perf_counter()
    print(f"[pipeline] stages: {', '.join(s.name + ('' if s.name in todo else ' (done)') for s in todo_stages)}; "
          f"ETA after the first stage, from this machine's pace", flush=True)
    # the reference times, rescaled by how fast this machine has run the stages so far (choice 4)
    spent = expected = 0.0
    for i, s in enumerate(todo_stages, 1):
        cmd = stage_command(s, cfg)
        if s.name not in todo:
            print(f"[pipeline] {i}/{len(todo_stages)} {s.name}: complete, skipped (--force reruns it)", flush=True)
            continue
        eta = (f"\n[pipeline] stage ETA {common.fmt_time(s.seconds * scale * spent / expected)}, total ETA "
               f"{common.fmt_time(remaining * spent / expected)}") if expected else ""
        print(f"\n[pipeline] {i}/{len(todo_stages)} {s.name}: {' '.join(cmd[1:])}{eta}", flush=True)
        dt = run_stage(s, cfg, cmd)
        remaining -= s.seconds * scale
        spent, expected = spent + dt, expected + s.seconds * scale
        print(f"[pipeline] {s.name} done in {common.fmt_time(dt)} ({dt / (s.seconds * scale):.1f}x the reference "
              f"time); remaining ETA {common.fmt_time(max(0.0, remaining) * spent / expected)}", flush=True)
    # every stage with results in --out, not only this call's: `--only gatt` keeps the other sections
    path = write_report(Path(cfg.out), every, cfg.quick)
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


def cli(argv=None):
    """`python pipeline.py ...`: main, with Ctrl-C as one line (launch has stopped the running stage by then)."""
    cfg = common.parse_config(PipelineConfig, argv, description=__doc__)
    common.run_main(main, cfg, interrupted="interrupted: the running stage was stopped; the same command resumes "
                                           "from where it stopped")


if __name__ == "__main__":
    cli()
