"""The plumbing every stage script shares, as plain functions (no Trainer class): each stage keeps its own loop in
main(cfg), and calls these for the parts that are the same everywhere.

  config -> flags    one @dataclass per script; parse_config turns its fields into --flags (the comment after a field
                     is its --help text), checks each numeric flag's range before any work, and --help shows the
                     paper's knobs apart from the advanced ones (the `# -- advanced --` line in the class body).
  device, precision  pick_device / pick_dtype / autocast: CUDA, Apple's MPS or the CPU; bf16 autocast on GPUs that
                     have it (fp16 with a GradScaler otherwise), fp32 on the CPU; weights and optimizer state fp32.
  torchrun           setup_distributed reads RANK / WORLD_SIZE from the environment (never from the config);
                     wrap_model gives DDP, or FSDP2 with --fsdp; consolidated_copy gathers a sharded model's weights
                     once for generation (§3.2.3); rank_shard / all_gather_shards split and rejoin sampling work.
  optimizer          make_optimizer: AdamW with Llama 2's settings (§2.2); lr_at: linear warmup, then cosine decay to
                     10% of the peak; optimizer_step: unscale, clip the gradient norm, step.
  checkpoints        save_training_checkpoint: weights and resume state (optimizer, step, RNG) as one unit swapped in
                     by renames, so a killed run leaves the old or the new checkpoint whole; the weights also published
                     in Meta's layout; load_resume_state picks the unit up again.
  progress, metrics  Progress (step, loss, tokens/s, MFU against this device's peak, ETA) and Ticker (long loops that
                     are not training steps); write_metrics merges into a stage's metrics.json, which the pipeline's
                     report reads.

Run: nothing to run here; every script imports it. On one process it needs no torchrun; under torchrun the same
calls become collective (nccl on CUDA, gloo on the CPU, which is how the tests check the multi-process paths).

Choices:
  1. Plain functions, not a framework: the reader of pretrain.py sees its loop, and each helper is a few lines to read.
  2. Save the raw model, never the wrapped one: no "_orig_mod." or "module." prefixes to strip when loading.
  3. MFU against a peak looked up per device (an unknown GPU gets none), not one hard-coded A100 figure.
  4. Errors the user can fix (a flag out of range, a wrong or damaged checkpoint, an output directory it cannot write
     or that another run is using) are one line before any work, not a traceback after minutes of it (die,
     check_ranges, check_checkpoints, preflight); a full disk or Ctrl-C mid-run is one line too (run_main).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import inspect
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

try:
    import fcntl  # flock: one run per output directory (lock_output_dir); not on Windows
except ImportError:
    fcntl = None

from model import atomic_write, fsync_dir  # temp file + fsync + rename: the one way every file here is written


# ---- configuration: one @dataclass per script, its fields are the flags -------------------------------------------
ADVANCED = "# -- advanced --"  # the line in a config's body that ends the paper's knobs and starts the rest


def _field_source(cls) -> tuple[dict[str, str], set[str]]:
    """Read from the dataclass source: the comment after each field (its --help text, nanoGPT's readable config block
    without exec: `lr: float = 2e-5  # §3.1: initial lr` -> "§3.1: initial lr"), and the fields after ADVANCED."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}, set()
    comments, advanced, past_marker = {}, set(), False
    for line in src.splitlines():
        if line.strip() == ADVANCED:
            past_marker = True
            continue
        m = re.match(r"^\s+(\w+)\s*:([^#\n]*)(?:#\s*(.+))?$", line)
        if not m:
            continue
        if m.group(3):
            comments[m.group(1)] = m.group(3).strip()
        if past_marker:
            advanced.add(m.group(1))
    return comments, advanced


def _field_comments(cls) -> dict[str, str]:
    return _field_source(cls)[0]


def _parse_optional(inner):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else inner(s)
    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def build_parser(cls, description: Optional[str] = None) -> argparse.ArgumentParser:
    """One flag per field of `cls`, in two groups of --help: the paper's knobs, then (after the ADVANCED line in the
    class body) the advanced ones. Each flag's help is its field's comment, its default and its range."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps, advanced = _field_source(cls)
    knobs = p.add_argument_group("the paper's knobs")
    rest = p.add_argument_group("advanced") if advanced else knobs
    hints = typing.get_type_hints(cls)
    rules = getattr(cls, "RANGES", {})
    for f in dataclasses.fields(cls):
        g = rest if f.name in advanced else knobs
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        limit = f", {RULES[rules[f.name]][0]}" if f.name in rules else ""
        help_text = f"{helps.get(f.name, '')} (default: {default}{limit})".strip().replace("%", "%%")  # argparse: %
        args = typing.get_args(typ)
        if typing.get_origin(typ) is typing.Union and type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            g.add_argument(flag, type=_parse_optional(inner), default=default, help=help_text,
                           metavar=inner.__name__.upper())
        elif typ is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(typ) is list:
            g.add_argument(flag, type=args[0], nargs="*", default=default, help=help_text)
        else:
            g.add_argument(flag, type=typ, default=default, help=help_text, metavar=typ.__name__.upper())
    return p


def parse_config(cls, argv=None, description: Optional[str] = None):
    """Build the dataclass `cls` from command-line flags (`python X.py --help` lists every field with its default),
    each numeric flag checked against its range (cls.RANGES) before the script does any work."""
    ns = build_parser(cls, description).parse_args(argv)
    cfg = cls(**vars(ns))
    check_ranges(cfg)
    return cfg


# Each config names the range of every numeric flag in RANGES, a class attribute without a type (so not a flag):
# RANGES = common.ranges(positive="k lr", share="long_frac"). A list flag is checked value by value; None (an
# Optional flag left unset) always passes; NaN and infinity never do.
RULES = {"positive": ("> 0", lambda v: v > 0),
         "non_negative": (">= 0", lambda v: v >= 0),
         "share": ("in [0, 1]", lambda v: 0 <= v <= 1),
         "open_share": ("in (0, 1)", lambda v: 0 < v < 1),  # e.g. a sigmoid-scale threshold
         "positive_share": ("in (0, 1]", lambda v: 0 < v <= 1)}  # e.g. top-p


def ranges(**names_by_rule: str) -> dict[str, str]:
    """ranges(positive="k lr", share="long_frac") -> {"k": "positive", "lr": "positive", "long_frac": "share"}."""
    out = {}
    for rule, names in names_by_rule.items():
        if rule not in RULES:
            raise ValueError(f"unknown range rule {rule!r}; one of {', '.join(RULES)}")
        out.update({name: rule for name in names.split()})
    return out


def range_error(name: str, value, rule: str) -> Optional[str]:
    """The one-line complaint about field `name` = value under `rule`, or None when it is in range."""
    what, ok = RULES[rule]
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is not None and not (math.isfinite(v) and ok(v)):
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            return f"--{name.replace('_', '-')} {shown}: must be {what}" + (
                f" (each value; {v} is not)" if isinstance(value, (list, tuple)) else "")
    return None


def check_ranges(cfg):
    """Die with the first flag of cfg outside its range (type(cfg).RANGES); the message also says what it is."""
    for name, rule in getattr(cfg, "RANGES", {}).items():
        err = range_error(name, getattr(cfg, name), rule)
        if err:  # the first words of the field's --help text say what it is
            meaning = re.split(r"[;(]", _field_comments(type(cfg)).get(name, ""))[0].strip()
            die(err + (f": {meaning}" if meaning and not meaning.startswith("§") else ""))


# ---- device and precision ----------------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: choose auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast. auto: bf16 on GPUs that have it, else fp16 (with a GradScaler); fp32 on the
    CPU, where bf16 matmuls are slower than fp32 on most laptops."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise SystemExit(f"error: --dtype {name}: choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and optimizer state stay fp32. A no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def die(msg: str, code: int = 2):
    """One clear line on stderr and a non-zero exit, instead of a traceback, for errors the user can fix."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def check_checkpoints(**dirs: tuple[Optional[str], str]):
    """check_checkpoints(init_from=("out/sft", "lm"), rm_safety=("out/rm_safety", "scalar")): each directory a stage
    will read has a Meta or Hugging Face layout and the right head (chat model "lm" or reward model "scalar"), checked
    before any work and without reading weights, so a wrong --rm-safety fails now, naming its flag. None: unused."""
    from model import checkpoint_layout
    _check_each(checkpoint_layout, dirs)


def _check_each(check, dirs: dict):
    """check(path, head) for each flag -> (path, head) given, a CheckpointError ending in one line naming the flag."""
    from model import CheckpointError
    for name, (path, head) in dirs.items():
        if path is not None:
            try:
                check(path, head)
            except CheckpointError as e:
                die(f"--{name.replace('_', '-')}: {e}")


# ---- preflight: before any work ------------------------------------------------------------------------------------
def preflight(out, dist: Optional[Dist] = None, flag: str = "--out-dir", **checkpoints):
    """What every stage checks before its first real work, so that nothing it can foresee fails minutes into a run:
    each checkpoint it will read loads (model.check_checkpoint: the settings parse and every weights file is whole);
    it can write its output directory; and no other run writes there (lock_output_dir). checkpoints: as
    check_checkpoints, flag name -> (directory or None, head or None)."""
    from model import check_checkpoint
    _check_each(check_checkpoint, checkpoints)
    check_writable(out, flag)
    if dist is None or dist.is_main:  # torchrun: rank 0 speaks for the run
        lock_output_dir(out, flag)


def check_writable(path, flag: str):
    """Create `path` and a file in it (removed at once): a read-only disk or a file in the way is one line now."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        die(f"{flag} {path}: is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=p).close()
    except OSError as e:
        die(f"{flag} {path}: cannot write there ({e.strerror or e})")


_LOCKS: dict[str, int] = {}  # directory -> open lock file, held while this process lives (the kernel drops it after)


def lock_output_dir(path, flag: str = "--out-dir", hold: bool = True):
    """One run per output directory: an exclusive flock on path/.lock, which holds the owner's PID for the message.
    A second run stops at once, naming the holder; a run that died (even of kill -9) held no lock after its death, and
    the next one takes its directory over, saying so. hold=False: only check that no other run holds it."""
    if fcntl is None:  # Windows: no flock; one run per directory is then up to the user
        return
    key = os.path.realpath(path)
    if key in _LOCKS:  # this process holds it already (a stage's main run twice in one process, as tests do)
        return
    fd = os.open(os.path.join(key, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    owner = os.read(fd, 200).decode(errors="replace").strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        die(f"{path} is in use by {owner or 'another run'}; wait for it or stop it, or pass another {flag}")
    if not hold:
        os.close(fd)
        return
    if owner:  # the lock is free but names its last owner: that run ended without releasing it
        print(f"[lock] {path}: the run that held it ({owner}) is gone; taking it over", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    _LOCKS[key] = fd


@atexit.register
def release_output_dirs():
    """Empty every lock file this process holds before it exits, so that the next run does not report a dead owner."""
    while _LOCKS:
        fd = _LOCKS.popitem()[1]
        os.ftruncate(fd, 0)
        os.close(fd)


def run_main(main, cfg, interrupted: str = "interrupted"):
    """`python X.py`: main(cfg), with what the machine did rather than the code as one line instead of a traceback:
    a full disk (naming the file and the free space) and Ctrl-C (the line `interrupted`)."""
    try:
        return main(cfg)
    except KeyboardInterrupt:
        die(interrupted, 130)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or getattr(cfg, "out_dir", None) or getattr(cfg, "out", None) or "."
        die(f"disk full while writing {where}: {disk_free(where)}", 1)


def disk_free(path) -> str:
    """"12 MB free on /data": the space left on the file system that holds `path`."""
    p = Path(os.path.abspath(path))
    while not p.exists() or not os.path.ismount(p):
        if p == p.parent:
            break
        p = p.parent
    return f"{shutil.disk_usage(p).free / 1e6:,.0f} MB free on {p}"


# ---- model FLOPs utilization: achieved FLOP/s over the device's peak, the peak looked up per device ----------------
# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, matched against torch.cuda.get_device_name();
# an unknown GPU gets no MFU rather than a wrong one.
_GPU_PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("A10G", 125e12), ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12),
              ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[Optional[float], str]:
    """(peak FLOP/s or None, what it is). CPU: an estimate, cores x clock x FLOPs per cycle of the vector unit."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS:
            if key in name:
                return (peak if dtype != torch.float32 else peak / 2 if "V100" not in name else peak / 8), name
        return None, name
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ghz, flags = 2.5, ""
        try:
            info = open("/proc/cpuinfo").read()
            m = re.search(r"cpu MHz\s*:\s*([\d.]+)", info)
            ghz = float(m.group(1)) / 1000 if m else ghz
            flags = info
        except OSError:
            pass
        # fp32 FLOPs per cycle per core: 2 FMA units x (16 lanes AVX-512 | 8 lanes AVX2) x 2 (multiply + add);
        # AMD Zen 4 (cpu family 25) runs AVX-512 on 256-bit units: 32, like AVX2
        per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 8
        if "AuthenticAMD" in flags and re.search(r"cpu family\s*:\s*25\b", flags):
            per_cycle = 32
        return cores * ghz * 1e9 * per_cycle, f"CPU estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle"
    return None, device.type


# ---- torchrun: one process per device; the environment (never the config) says the rank ---------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = True  # False when a caller started the process group (rejection_sampling runs sft.main
    #                          inside its own torchrun processes): then only that caller may end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> Dist:
    """Single process unless launched by torchrun (RANK / WORLD_SIZE set); nccl on CUDA, gloo on the CPU."""
    if "RANK" not in os.environ:
        return Dist(device=pick_device(device_name))
    import faulthandler
    import torch.distributed as tdist
    faulthandler.enable()  # a rank that dies in C++ (SIGABRT, SIGSEGV) prints its Python stack into torchrun's log
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device, owns_group=owns)


def cleanup_distributed(dist: Optional[Dist] = None):
    """Wait for every rank, then end the process group unless another caller started it."""
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        if dist is None or dist.owns_group:
            tdist.destroy_process_group()


def rank_shard(items: list, dist: Dist) -> list:
    """This rank's share of `items`: every world_size-th item from index rank (disjoint shares, together all of
    them, sizes differing by at most one). Rejection sampling splits its prompts this way."""
    return items[dist.rank::dist.world_size]


def all_gather_shards(local: list, dist: Dist) -> list:
    """The inverse of rank_shard, on every rank: each rank's results for its shard in, the full list in the original
    order out. Python objects travel as pickles (all_gather_object): right for records and rewards, not weights."""
    if dist.world_size == 1:
        return list(local)
    import torch.distributed as tdist
    parts: list = [None] * dist.world_size
    tdist.all_gather_object(parts, local)
    out: list = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::dist.world_size] = part  # item j of rank r was item r + j * world_size
    return out


def all_reduce_mean(x: float, dist: Dist) -> float:
    if dist.world_size == 1:
        return x
    import torch.distributed as tdist
    t = torch.tensor([x], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t)
    return t.item() / dist.world_size


def all_reduce_sum(t: torch.Tensor, dist: Optional[Dist]) -> torch.Tensor:
    """The elementwise sum of `t` over all ranks, on every rank (`t` itself in one process). For statistics of the
    global batch, all-reduce partial SUMS and COUNTS, then divide: an average of per-rank means is wrong when the
    ranks' counts differ, as reply tokens do."""
    if dist is None or dist.world_size == 1:
        return t
    import torch.distributed as tdist
    out = t.detach().to(dist.device, copy=True)  # nccl reduces CUDA tensors only (the reward models score on the CPU)
    tdist.all_reduce(out)  # SUM by default
    return out.to(t.device)


def wrap_model(model: torch.nn.Module, dist: Dist, fsdp: bool = False, compile: bool = False,
               grad_checkpoint: bool = False, param_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The module the training loop calls. The raw model (the argument) keeps the weights' plain names: save that one,
    never the wrapped one (no "_orig_mod." / "module." prefixes to strip).

    DDP (default under torchrun): every rank holds all weights; gradients are averaged during backward.
    FSDP2 (--fsdp): fully_shard each transformer block, then the root: weights, gradients and optimizer state are split
    across ranks and gathered block by block; bf16 compute with fp32 gradient reduction on GPUs (param_dtype).
    """
    model.grad_checkpoint = grad_checkpoint
    if fsdp and dist.world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kw = {"mp_policy": mp} if mp else {}
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        wrapped = model
    elif dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    else:
        wrapped = model
    return torch.compile(wrapped) if compile else wrapped


def is_sharded(model: torch.nn.Module) -> bool:
    """True when wrap_model(fsdp=True) split this module's weights across ranks (FSDP2 fully_shard)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def consolidated_copy(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The model to GENERATE with: a plain, unsharded Transformer holding all of `model`'s weights on every rank, in
    eval mode, without gradients; `dtype` casts the floating-point weights. Collective when `model` is FSDP-sharded:
    each weight is all-gathered once, the only communication of the generation phase. A model that is not sharded is
    returned as it is. Call it in a small function that generates and returns, so the copy is freed after.

    Why (§3.2.3): the paper saw generation ~20x slower under FSDP and consolidated the weights once before it. FSDP
    gathers a block's weights in every forward: cheap for training over thousands of tokens, ruinous in decoding,
    which runs each block once per TOKEN; and ranks whose rows reach EOS at different steps would pair their per-token
    collectives wrongly and hang. A plain copy, rather than FSDP2's unshard(), keeps FSDP's hooks and buffers out of
    generate()."""
    if not is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    inner = getattr(model, "_orig_mod", model)
    sd = {}
    with torch.no_grad():
        for k, v in inner.state_dict().items():  # FSDP2 reshards first: every weight is this rank's DTensor shard
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)  # cast the shard, then gather: half the bytes sent for bf16, no fp32 full copy
            sd[k] = v.full_tensor() if isinstance(v, DTensor) else v  # one all-gather, every rank gets it all
    with torch.device("meta"):  # no memory, no random init: load_state_dict(assign=True) puts the gathered tensors in
        # the model's own class (Transformer), not FSDP2's wrapper class
        full = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))(inner.args)
    full.load_state_dict(sd, assign=True, strict=True)
    for name, buf in inner.named_buffers():  # the RoPE tables: not weights, never sharded, shared with the original
        full.register_buffer(name, buf, persistent=False)
    return full.eval().requires_grad_(False)


# ---- optimizer and schedule ----------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   eps: float = 1e-5):
    """AdamW with Llama 2's betas, eps and weight decay (§2.2). The paper does not say which tensors decay: here the
    matrices do and the RMSNorm gains do not (decaying a gain shrinks the normalized activations, not a prior on
    weights; the usual GPT/Llama practice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel over all tensors instead of a Python loop of small ops (several times faster on the CPU).
    # Sharded (FSDP2 DTensor) parameters on the CPU keep the default implementation, which supports them everywhere.
    from torch.distributed.tensor import DTensor
    fused = all(p.is_cuda or (p.device.type == "cpu" and not isinstance(p, DTensor)) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def optimizer_step(opt: torch.optim.Optimizer, scaler, model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """The end of every training step: unscale the fp16 loss scale (a no-op in bf16/fp32; scaler None: no scaler),
    clip the global gradient norm (§2.2: 1.0), step, clear the gradients. Returns the gradient norm before clipping."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def lr_at(step: int, max_steps: int, peak: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Linear warmup to peak over `warmup` steps, then cosine decay to final_ratio * peak at max_steps (§2.2: 2000
    warmup steps, decay to 10% of the peak)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float):
    for g in opt.param_groups:
        g["lr"] = lr


# ---- checkpoints with exact resume -----------------------------------------------------------------------------------
def full_state_dicts(wrapped: torch.nn.Module, opt: Optional[torch.optim.Optimizer]):
    """Unsharded model (and optimizer) state on CPU, the same under a plain module, DDP or FSDP2 (collective: every
    rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = getattr(wrapped, "_orig_mod", wrapped)
    if opt is None:
        return get_model_state_dict(inner, options=opts), None
    return get_state_dict(inner, opt, options=opts)


def load_full_state_dicts(wrapped: torch.nn.Module, opt: Optional[torch.optim.Optimizer], model_sd, opt_sd=None):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict, set_model_state_dict
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    inner = getattr(wrapped, "_orig_mod", wrapped)
    if opt is None or opt_sd is None:
        set_model_state_dict(inner, model_sd, options=opts)
    else:
        set_state_dict(inner, opt, model_state_dict=model_sd, optim_state_dict=opt_sd, options=opts)


# A checkpoint is two things that must agree: the weights, and the state to go on from them (optimizer, step, data
# position). They travel as one unit, the directory OUT/.checkpoint = {consolidated.00.pth, resume.pt}: written whole
# as .checkpoint.tmp, then swapped in by renames. A directory cannot be renamed over a full one, so the swap is two
# renames (the old unit aside to .checkpoint.old, the new one in) and a reader that finds no .checkpoint takes
# .checkpoint.old: after a crash at any instant it reads one complete unit, all old or all new, never new weights with
# an old step. A resume reads only the unit. The stage's published checkpoint (Meta's layout in OUT, what later
# stages read) is hard-linked from the new unit's weights before the swap, so it is never older than the unit; one
# checkpoint newer at most, which the resumed run writes again. The hard link keeps one copy of the weights on disk.
UNIT, UNIT_TMP, UNIT_OLD = ".checkpoint", ".checkpoint.tmp", ".checkpoint.old"


def save_training_checkpoint(out_dir, wrapped, raw, opt, step: int, dist: Dist, tokenizer_path=None,
                             extra: Optional[dict] = None, extra_params: Optional[dict] = None):
    """Write the resume unit (weights + optimizer, step, RNG, `extra` such as the data position) and publish the
    weights in Meta's layout, as described above. A full disk keeps the previous checkpoint and stops with one line."""
    from model import save_checkpoint
    model_sd, opt_sd = full_state_dicts(wrapped, opt)
    if not dist.is_main:
        return
    out, tmp = Path(out_dir), Path(out_dir) / UNIT_TMP
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items()}
    state = {"step": step, "optimizer": opt_sd, "rng_cpu": torch.get_rng_state(), "extra": extra or {},
             "world_size": dist.world_size}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed write left
        tmp.mkdir(parents=True)
        atomic_write(tmp / "consolidated.00.pth", lambda f: torch.save(weights, f))
        atomic_write(tmp / "resume.pt", lambda f: torch.save(state, f))
        save_checkpoint(raw, out, tokenizer_path, extra_params, weights_file=tmp / "consolidated.00.pth")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            need, free = tensor_bytes([weights, state]) / 1e6, shutil.disk_usage(out).free / 1e6
            die(f"disk full writing the step-{step} checkpoint to {out}: it needs {need:,.1f} MB, {free:,.1f} MB are "
                f"free; the previous checkpoint (if any) is kept: free space and rerun to resume from it")
        raise
    swap_in(out)
    (out / "resume.pt").unlink(missing_ok=True)  # the layout before units: never read again


def swap_in(out: Path):
    """Put the complete .checkpoint.tmp in place of .checkpoint (see above)."""
    unit, tmp, old = out / UNIT, out / UNIT_TMP, out / UNIT_OLD
    fsync_dir(tmp)
    if unit.is_dir():
        shutil.rmtree(old, ignore_errors=True)  # a swap that crashed after its second rename left it: garbage
        os.replace(unit, old)
    os.replace(tmp, unit)  # a crash before this line: readers take .checkpoint.old, whole
    fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)


def load_resume_state(out_dir) -> Optional[dict]:
    """The resume unit's state, its weights under "model"; None when out_dir has no unit (a fresh start). Only reads,
    so every rank may call it. A unit that cannot be read (truncated, foreign, a pickle that would run code) stops the
    run with one line naming the file and what to delete, not a traceback and not a silent fresh start."""
    out = Path(out_dir)
    unit = next((d for d in (out / UNIT, out / UNIT_OLD) if d.is_dir()), None)
    if unit is None:
        if (out / "resume.pt").is_file():
            print(f"[checkpoint] {out / 'resume.pt'} is from an older layout whose weights and step may not match: "
                  f"starting this stage over", flush=True)
        return None
    f = unit / "resume.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("extra"), dict)
                and "optimizer" in state):
            raise ValueError("not a resume state written by save_training_checkpoint")
        f = unit / "consolidated.00.pth"
        state["model"] = torch.load(f, map_location="cpu", weights_only=True)
        if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
            raise ValueError("not a dict of tensors")
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        die(f"{f} cannot be read to resume ({reason}); delete {unit} to start this stage over")
    return state


def forget_resume(out_dir):
    """Remove the resume unit, so that the next run in out_dir starts from step 0; the published checkpoint stays."""
    out = Path(out_dir)
    for name in (UNIT_TMP, UNIT_OLD):
        shutil.rmtree(out / name, ignore_errors=True)
    if (out / UNIT).is_dir():
        os.replace(out / UNIT, out / UNIT_TMP)  # gone in one step (.checkpoint.tmp is garbage to every reader)
    shutil.rmtree(out / UNIT_TMP, ignore_errors=True)
    (out / "resume.pt").unlink(missing_ok=True)


def disk_full(e: Optional[BaseException]) -> bool:
    """e, or an error it was raised while handling, is a full disk or quota. torch.save reports one as RuntimeError
    "unexpected pos", raised while handling the OSError that says why."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in nested dicts/lists: what writing a state needs on disk, give or take its index."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ---- progress, metrics -------------------------------------------------------------------------------------------------
class Progress:
    """One line per `log` call: step, loss, lr, tokens/s, MFU (against this device's peak), elapsed and ETA."""

    def __init__(self, name: str, total_steps: int, tokens_per_step: int, flops_per_token: float, device, dtype,
                 start_step: int = 0, enabled: bool = True, unit: str = "tok"):
        self.name, self.total, self.tps_tokens, self.unit = name, total_steps, tokens_per_step, unit
        self.flops_per_token, self.enabled = flops_per_token, enabled
        self.peak, _ = peak_flops(device, dtype)
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self.last_t, self.last_step = self.t0, start_step

    def tokens_per_sec(self, step: int) -> float:
        return (step - self.start_step) * self.tps_tokens / max(1e-9, time.perf_counter() - self.t0)

    def log(self, step: int, **values):
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tps_tokens / max(1e-9, now - self.last_t)
        self.last_t, self.last_step = now, step
        mfu = f" mfu {100 * rate * self.flops_per_token / self.peak:.1f}%" if self.peak and self.flops_per_token else ""
        vals = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"[{self.name}] step {step}/{self.total} {vals} | {rate:,.0f} {self.unit}/s{mfu} | "
              f"{elapsed_eta(now - self.t0, step - self.start_step, self.total - step)}", flush=True)


class Ticker:
    """Progress of a long loop that is not a training step (sampling, scoring): "[name] 1,200/4,800 replies |
    96 replies/s | 0m12s elapsed, ETA 0m37s", at most one line every `every` seconds, and a last one at the end if
    any was printed (a loop shorter than `every` prints nothing)."""

    def __init__(self, name: str, total: int, unit: str = "replies", every: float = 10.0, enabled: bool = True):
        self.name, self.total, self.unit, self.every, self.enabled = name, total, unit, every, enabled
        self.t0 = self.last = time.perf_counter()
        self.printed = False

    def tick(self, done: int):
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and not (done >= self.total and self.printed)):
            return
        self.last, self.printed = now, True
        elapsed = now - self.t0
        print(f"[{self.name}] {done:,}/{self.total:,} {self.unit} | {done / max(elapsed, 1e-9):,.0f} {self.unit}/s | "
              f"{elapsed_eta(elapsed, done, self.total - done)}", flush=True)


def elapsed_eta(elapsed: float, done: int, left: int) -> str:
    """"1m10s elapsed, ETA 0m35s": what is left at the pace so far (Progress and Ticker lines)."""
    return f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(elapsed / max(1, done) * left)}"


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def write_metrics(out_dir, metrics: dict):
    """Merge into out_dir/metrics.json (atomically); the pipeline builds the report from these files."""
    f = Path(out_dir) / "metrics.json"
    old = json.loads(f.read_text()) if f.is_file() else {}
    old.update(metrics)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(f, lambda fh: fh.write(json.dumps(old, indent=2).encode()))


def read_metrics(out_dir) -> dict:
    f = Path(out_dir) / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def seed_everything(seed: int):
    import random
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
