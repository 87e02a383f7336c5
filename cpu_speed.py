"""CPU decoding speed-ups: the same numbers as the plain path, sooner. generate.py switches them on with one call,
`with cpu_speed.fast_decode(model, rows, compile):`, and sampling uses `exponential_race` in place of
torch.multinomial on the CPU. Nothing here is needed to understand Llama 2; read generate.py first.

What and why. Decoding multiplies a few hidden vectors by every weight matrix once per token, so a CPU decode step is
bound by how fast the matrix library streams the weights, not by arithmetic:
  1. column_major_weights: each Linear weight with out >= in is stored column-major (same values and shape, other
     strides), the layout MKL's matrix-vector product reads fastest. The wide w2 keeps its layout: it got slower.
  2. packed_linears: from PACK_MIN_ROWS rows on, each Linear multiplies by a copy of its weight that oneDNN has
     reordered once into the blocked layout its kernel reads (what torch.compile's CPU "freezing" does). The copies
     are kept between calls and made again whenever a weight changes (PPO trains the policy between rollouts).
  3. exponential_race: torch.multinomial's own algorithm without its checks of the whole tensor.

When. fast_decode: on a CPU only; the column-major layout always there (it stays, checkpoints are saved contiguous),
the packing only in eager decoding (torch.compile cannot lower the packed op) of at least PACK_MIN_ROWS rows, of fp32
weights small enough (PACK_MAX_BYTES) that a second copy costs little. exponential_race: whenever sampling on a CPU.

Tested equal to the plain path (tests/test_generate.py): packed decoding gives the greedy tokens of full recomputation
without cache or packing and log-probs equal to fp32 rounding, re-packs after every kind of weight change and leaves
plain nn.Linear modules behind, even after an error; exponential_race draws torch.multinomial's tokens bit for bit
from the same seed and leaves the generator in the same state.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from model import Transformer


@contextlib.contextmanager
def fast_decode(model: Transformer, rows: int, compile: bool):
    """The one switch generate() calls around its decoding of `rows` rows: on a CPU, lay the weights out column-major,
    then (eager only) multiply by oneDNN's packed weights for the duration. Elsewhere it does nothing."""
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        column_major_weights(model)
    with packed_linears(model, rows) if cpu and not compile else contextlib.nullcontext():
        yield


def column_major_weights(model: Transformer):
    """Store each (out, in) Linear weight with out >= in column-major: same values and shape, other strides.
    Called by ppo.py too, before DDP is built, since DDP lays out its gradient buckets by the parameters' strides."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.out_features >= mod.in_features and mod.weight.is_contiguous():
                mod.weight.data = mod.weight.data.t().contiguous().t()


# Below this many rows MKL's column-major matrix-vector product is faster; from it on, oneDNN's packed weights.
PACK_MIN_ROWS = 4
PACK_MAX_BYTES = 1 << 30  # packing copies every Linear weight: fine for a small model, not for 7B


def _packable(lins: list) -> bool:
    """True where oneDNN can prepack these Linear weights: plain fp32 CPU tensors (not FSDP's DTensors, not bf16,
    whose oneDNN path on AVX2 converts every element), few enough bytes that a second copy costs little."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and all(type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.float32
                    and m.weight.device.type == "cpu" for m in lins)
            and sum(m.weight.numel() * 4 for m in lins) <= PACK_MAX_BYTES)


_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # nn.Linear -> (fingerprint, packed weight)


def _packed_weight(mod: torch.nn.Linear, rows: int) -> torch.Tensor:
    """oneDNN's packed copy of mod.weight, made again only when the weight has changed since the last call (packing
    costs several decode steps, and rejection sampling calls generate() hundreds of times with the same weights).
    The fingerprint catches every way a weight changes: another tensor (.data = ...), an in-place update seen by
    autograd's version counter (optimizer steps, load_state_dict), and, for edits through .data that bypass the
    counter, the weights' sum."""
    w = mod.weight.detach()  # shares the version counter
    key = (w.data_ptr(), w._version, tuple(w.stride()), float(w.sum()))
    hit = _PACKED.get(mod)
    if hit is None or hit[0] != key:
        hit = _PACKED[mod] = (key, torch.ops.mkldnn._reorder_linear_weight(w, rows))  # opaque oneDNN layout
    return hit[1]


@contextlib.contextmanager
def packed_linears(model: Transformer, rows: int):
    """For the duration of one generate() call, each Linear of a CPU model multiplies by a prepacked copy of its weight.

    Each Linear's forward is overridden on the instance and restored on exit, even after an error; parameters are
    untouched, so DDP, the optimizer and the checkpoint never see a difference. Eager only: torch.compile cannot lower
    oneDNN's packed op without freezing the weights into the graph. Results agree with F.linear to fp32 rounding."""
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


def exponential_race(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """torch.multinomial(probs, 1) on the CPU, the same draws: probs (B, V) -> (B,) token ids.

    Give token i an exponential waiting time E_i / p_i (E_i ~ Exp(1), independent); the first to finish,
    argmax_i p_i / E_i, is token i with probability exactly p_i. torch.multinomial draws one sample this way itself,
    with E_i = -log(1 - U_i) for U_i uniform in float64, but first checks the whole tensor for negative and infinite
    values; here probs come from a softmax. So the same random numbers from the same generator give the same tokens,
    and leave the generator in the same state. generator: one torch.Generator (None: torch's global one) or a list of
    B, one per row (each row's draws from its own generator alone)."""
    V = probs.size(-1)
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(V, dtype=torch.float64, generator=g) for g in generator])  # (B, V)
    else:
        u = torch.rand(probs.shape, dtype=torch.float64, generator=generator)  # (B, V) uniform in [0, 1)
    wait = u.neg_().log1p_().neg_().to(probs.dtype)  # (B, V) E = -log(1 - U) ~ Exp(1), as torch draws it
    return (probs / wait).argmax(-1)  # (B,) the first to arrive
