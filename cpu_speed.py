"""cpu_speed.py: the CPU decoding speed-ups generate.py switches on (TEMP DOCSTRING)."""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from model import Transformer


def column_major_weights(model: Transformer):
    """Store each (out, in) Linear weight with out >= in column-major: same values and shape, other strides.

    Decoding reads every weight once per token, so its speed is how fast MKL's x @ W^T streams W from memory; on the
    2-core AMD EPYC (BENCHMARKS.md) a column-major W streamed faster: the 32000 x 288 head 2.6x, w1/w3 (768 x 288) 1.6x,
    wq/wk/wv/wo 1.2x, but the wide w2 (288 x 768) 1.3x slower, so it stays. Decode at batch 1: +9-19% over converting
    the head alone; batch 16: neutral. Checkpoints are unchanged (saved contiguous); training matmuls differ by <8%.
    """
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.out_features >= mod.in_features and mod.weight.is_contiguous():
                mod.weight.data = mod.weight.data.t().contiguous().t()


# Below this many rows a CPU decode step keeps MKL's column-major matrix-vector products (column_major_weights);
# from it on, oneDNN's prepacked weights (packed_linears). Measured on the 2-core EPYC, the 32000 x 288 head:
# 1 row 2.7 ms column-major vs 3.3 ms packed; 4 rows 8.9 vs 3.2; 16 rows 12.6 vs 5.6 (BENCHMARKS.md).
PACK_MIN_ROWS = 4


PACK_MAX_BYTES = 1 << 30  # packing copies every Linear weight: fine at 15M (61 MB), not at 7B (27 GB)


def _packable(lins: list) -> bool:
    """True where oneDNN can prepack these Linear weights: plain fp32 CPU tensors (not FSDP's DTensors, not bf16,
    whose oneDNN path on AVX2 converts every element), few enough bytes that a second copy costs little."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and all(type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.float32
                    and m.weight.device.type == "cpu" for m in lins)
            and sum(m.weight.numel() * 4 for m in lins) <= PACK_MAX_BYTES)


_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # nn.Linear -> (fingerprint, packed weight)


def _packed_weight(mod: torch.nn.Linear, rows: int) -> torch.Tensor:
    """oneDNN's packed copy of mod.weight, made again only when the weight has changed since the last call.

    Packing 61 MB takes ~120 ms here, a decode step ~25 ms: rejection sampling and evaluation call generate() hundreds
    of times with the same weights. The fingerprint catches every way a weight changes: another tensor (.data = ...),
    an in-place update seen by autograd's version counter (optimizer steps, load_state_dict), and, for edits through
    .data that bypass the counter, the weights' sum (one 4 ms read)."""
    w = mod.weight.detach()  # shares the version counter
    key = (w.data_ptr(), w._version, tuple(w.stride()), float(w.sum()))
    hit = _PACKED.get(mod)
    if hit is None or hit[0] != key:
        hit = _PACKED[mod] = (key, torch.ops.mkldnn._reorder_linear_weight(w, rows))  # opaque oneDNN layout
    return hit[1]


@contextlib.contextmanager
def packed_linears(model: Transformer, rows: int):
    """For the duration of one generate() call, each Linear of a CPU model multiplies by a prepacked copy of its weight.

    Why: a decode step multiplies `rows` hidden vectors by each weight. MKL's x @ W^T for a few rows (M = 4..64) is
    slow on the 2-core EPYC: the 32000 x 288 head ran at ~25 GFLOP/s at 16 rows. oneDNN can reorder W once into the
    blocked layout its kernel reads (what torch.compile's CPU "freezing" does to constant weights) and then runs the
    same product 2.2x faster; the whole 15M decode step at batch 16 went from ~31 to ~24 ms. The packed copies are
    kept between calls (_packed_weight: one more copy of the weights while the model lives) and made again whenever a
    weight changed (PPO trains the policy between rollouts).
    How: each Linear's forward is overridden on the instance and restored on exit, even after an error; parameters
    are untouched, so DDP, the optimizer and the checkpoint never see a difference. Eager only: torch.compile cannot
    lower oneDNN's packed op without freezing the weights into the graph. Results agree with F.linear to fp32
    rounding (~1e-6 here)."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)] if rows >= PACK_MIN_ROWS else []
    if not lins or not _packable(lins):
        yield
        return
    try:
        for mod in lins:
            mod.forward = functools.partial(torch.ops.mkldnn._linear_pointwise, W=_packed_weight(mod, rows),
                                            B=mod.bias, attr="none", scalars=[], algorithm="")
        yield
    finally:
        for mod in lins:
            mod.__dict__.pop("forward", None)  # back to nn.Linear.forward
