"""The Llama 2 Transformer (paper §2.2, Table 1; Meta's llama/model.py), one file, no training logic.

Architecture, exactly as Meta's released checkpoints expect it:
  - pre-normalization with RMSNorm (eps 1e-5, computed in fp32),
  - rotary position embeddings (theta 10000) rotating adjacent pairs (2i, 2i+1) of each head, applied to q and k,
  - grouped-query attention (GQA: n_kv_heads < n_heads; 70B uses 8 KV heads, 7B/13B plain multi-head),
  - SwiGLU feed-forward, width int(2 * 4 * dim / 3) [* ffn_dim_multiplier] rounded up to multiple_of,
  - no biases anywhere, untied input embedding and output head.
Weight names are Meta's (tok_embeddings, layers.N.attention.wq, ...), so one loader serves our checkpoints and Meta's.
A Hugging Face directory loads too (the q/k row permutation undone), and any model exports to Hugging Face's layout.

Tensor letters used in shape comments throughout the project:
  B batch, T tokens in this forward call, S key/value length (cache), V vocabulary, C model dim,
  H query heads, K key/value heads (H % K == 0), D head dim (C // H), F feed-forward hidden width.

Choices where the paper is silent (see also the module docstrings of the stage scripts):
  1. RoPE is computed with real cos/sin on adjacent pairs instead of complex numbers: the same numbers as Meta's
     complex multiply, but torch.compile and bf16 handle it without complex dtypes.
  2. The KV cache is a separate object (generate.py's job) passed into forward; Attention owns no state, so the same
     module trains, samples and scores.
  3. Reward and value models (§3.2.2) are this trunk with head="scalar": a Linear(C, 1) named `score` replaces `output`.
  4. Eager runs on the CPU take three exact rewrites of the plain path (the section "CPU speed-ups" at the end of the
     model code): the same results, tested equal in tests/test_model.py.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    # Meta's params.json keys and defaults (the 7B model).
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: plain multi-head attention (7B, 13B)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # §2.2: Llama 2 doubled the context to 4096
    head: str = "lm"  # ours: "lm" = next-token logits, "scalar" = one number per position (reward / value models)
    score_offset: float = 0.0  # ours, head "scalar": added to every score (a reward model's zero point, reward.py)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # §2.2 SwiGLU: 2/3 of the usual 4*dim keeps the parameter count of a 4*dim GELU MLP (three matrices, not two)
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE's (2i, 2i+1) pairs")
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', got {self.head!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # Meta's files may carry extra keys


# Table 1 / Meta's params.json. vocab_size is -1 in Meta's files (taken from the tokenizer); 32000 here.
PRESETS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    # Small models for CPU work. "15M" is llama2.c's stories15M shape (dim 288, 6 layers, 6 heads, seq 256).
    "15M": dict(dim=288, n_layers=6, n_heads=6, multiple_of=32, max_seq_len=256),
    # ~1M parameters with a 512-token vocabulary: the size that learns the miniature world in minutes on a laptop.
    "1M": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512, max_seq_len=256),
    # ~110M (GPT-2 small shape) for GPU throughput measurements.
    "110M": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256, max_seq_len=1024),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in fp32: in bf16 the mean of squares loses the small components."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight  # cast back before the weight, as Meta does


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle pos * theta^(-2i/D) for every position and pair i: two (max_pos, D/2) fp32 tables."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (D/2,)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)  # (max_pos, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the position's angle: Meta's (x0 + i x1) * e^(i angle) in real numbers
    (choice 1). x: (B, T, H, D); cos, sin: (B, T, 1, D/2). Done in fp32 (as Meta does) and cast back."""
    xp = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]  # (B, T, H, D/2) each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(-2).type_as(x)  # (B, T, H, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def qkv(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, K, T, D) of x (B, T, C), RoPE applied (gatt.py's Fig. 10 reads
        the attention probabilities from them)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        rope = rope_complex if cpu_eager(x) else apply_rope  # CPU speed-up: the same bits (section below)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # RoPE on q and k only, never on v
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0, cache_pos=None, kv_len: Optional[int] = None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)  # (B, H, T, D), (B, K, T, D)
        if cache is not None:
            # write this call's keys/values at cache_pos, attend over the first kv_len cached positions
            k, v = cache.update(layer, cache_pos, k, v, kv_len)  # (B, K, S, D)
        gqa = self.n_kv_heads != self.n_heads
        if gqa and not _SDPA_GQA:  # old torch: copy each KV head for its H/K query heads
            rep = self.n_heads // self.n_kv_heads
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False  # (B, H, S, D)
        if cache is None and x.device.type == "cpu" and T >= 2 * CAUSAL_CHUNK:  # CPU speed-up (section below)
            out = chunked_causal_attention(q, k, v, mask, gqa)
        else:  # with gqa the kernel broadcasts each KV head over its H/K query heads: no copy of K/V
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 **({"enable_gqa": True} if gqa else {}))  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


def _sdpa_supports_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_supports_gqa()  # torch >= 2.5


class FeedForward(nn.Module):
    """SwiGLU (§2.2): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None, kv_len=None):
        # pre-normalization: normalize each sub-layer's input, add its output to the un-normalized residual stream
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, self.layer_id, cache_pos, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.head == "lm":
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from tok_embeddings
        else:
            self.score = nn.Linear(args.dim, 1, bias=False)  # §3.2.2: regression head, one scalar per position
        # RoPE tables for 2x the context, as Meta does (room for generation past training length); not saved.
        cos, sin = rope_tables(args.head_dim, 2 * args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpoint = False  # common.py turns this on (--grad-checkpoint): recompute blocks in backward

    def init_weights(self, seed: Optional[int] = None):
        """Normal(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2's rule; Meta
        does not publish its init), norms at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def rope(self, T: int, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1 or B, T, 1, D/2) of positions (B, T), or of 0..T-1 when positions is None."""
        if positions is None:
            if T > 2 * self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than the RoPE table ({2 * self.args.max_seq_len})")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
            return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)
        return self.rope_cos[positions][:, :, None, :], self.rope_sin[positions][:, :, None, :]  # (B, T, 1, D/2)

    def block(self, i: int, h, cos, sin, mask, cache=None, cache_pos=None, kv_len=None) -> torch.Tensor:
        """Block i on the residual stream h (B, T, C); with --grad-checkpoint its activations are recomputed in the
        backward instead of kept."""
        if self.grad_checkpoint and self.training and cache is None:
            return torch.utils.checkpoint.checkpoint(self.layers[i], h, cos, sin, mask, use_reentrant=False)
        return self.layers[i](h, cos, sin, mask, cache, cache_pos, kv_len)

    def trunk(self, tokens, positions=None, mask=None, cache=None, cache_pos=None, kv_len=None):
        """Final normalized hidden states (B, T, C).

        tokens (B, T). positions (B, T) or None for 0..T-1: RoPE position of each token (left-padded prompts and packed
        documents restart their own count). mask: None for plain causal attention, else a bool (B, 1, T, S) tensor,
        True = may attend; it must be causal too (no query attends to a later key: long CPU sequences skip those keys,
        chunked_causal_attention). cache/cache_pos/kv_len: see generate.KVCache.
        """
        cos, sin = self.rope(tokens.shape[1], positions)
        h = self.tok_embeddings(tokens)  # (B, T, C)
        mask = cpu_additive_mask(mask, h)  # CPU speed-up: the same softmax (section below)
        for i in range(len(self.layers)):
            h = self.block(i, h, cos, sin, mask, cache, cache_pos, kv_len)
        return self.norm(h)

    def forward(self, tokens, targets=None, *, positions=None, mask=None, cache=None, cache_pos=None, kv_len=None,
                ignore_index: int = -100):
        """Returns (out, loss). out: logits (B, T, V) in fp32 for head="lm", scores (B, T) for head="scalar".

        loss: mean next-token cross-entropy over targets (B, T) that are not ignore_index (the caller shifts: targets[t]
        is the token after tokens[t]); None when targets is None. The softmax is always taken in fp32.
        With targets, the logits come back only as a detached by-product in the compute dtype: at 32000 words they are
        the step's largest tensor, and an fp32 copy with a graph would cost memory and time for nothing. Callers that
        differentiate through the logits (PPO's log-probs) call without targets and get fp32 logits with their graph.
        """
        h = self.trunk(tokens, positions, mask, cache, cache_pos, kv_len)  # (B, T, C)
        if self.args.head == "scalar":
            return self.score(h).squeeze(-1).float() + self.args.score_offset, None  # (B, T)
        logits = self.output(h)  # (B, T, V) in the compute dtype
        if targets is None:
            return logits.float(), None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits.detach(), loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params + attention scores (PaLM appendix B), used for MFU."""
        a = self.args
        n = self.num_params(exclude_embeddings=True)
        return 6 * n + 12 * a.n_layers * a.dim * seq_len

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: Optional[torch.dtype] = None, **arg_overrides):
        return load_checkpoint(path, device=device, dtype=dtype, **arg_overrides)


# ---- CPU speed-ups ---------------------------------------------------------------------------------------------------
# Three rewrites that eager CPU runs take instead of the plain path above, each with the plain path's result (tests/
# test_model.py): the CPU kernels are slow at what the plain form asks of them. torch.compile, CUDA and MPS keep the
# plain path. Figures: RESULTS.md.
def cpu_eager(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope as Meta writes it, one complex multiply: the same bits forward and backward, one kernel, not seven."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, D/2) complex64
    # the tables of a model cast to bf16 (ppo.py's frozen RMs) widen to fp32 exactly, as apply_rope's type promotion
    return torch.view_as_real(xc * torch.complex(cos.float(), sin.float())).flatten(-2).type_as(x)  # (B, T, H, D)


# Query rows per attention call for sequences of at least twice as many tokens on the CPU (chunked_causal_attention)
CAUSAL_CHUNK = 128


def chunked_causal_attention(q, k, v, mask, gqa: bool):
    """Causal attention in chunks of CAUSAL_CHUNK query rows, each over the keys up to its own last row only.
    The CPU kernel computes every score of its (T, S) block, masked or not; in chunks, half of the masked scores are
    never computed. Every mask this project builds is causal (trunk's docstring), so the skipped keys were masked
    anyway: the same result up to float rounding. q (B, H, T, D); k, v (B, K, T, D); mask None or (B, 1, T, T)."""
    T = q.size(2)
    outs = []
    for s in range(0, T, CAUSAL_CHUNK):
        e = min(T, s + CAUSAL_CHUNK)
        m = (torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(diagonal=s) if mask is None
             else mask[:, :, s:e, :e])  # (e - s, e) or (B, 1, e - s, e)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=m,
                                                   **({"enable_gqa": True} if gqa else {})))
    return torch.cat(outs, dim=2)  # (B, H, T, D)


def cpu_additive_mask(mask: Optional[torch.Tensor], h: torch.Tensor) -> Optional[torch.Tensor]:
    """A bool mask on the CPU as an additive one (0 / -inf) in h's dtype, once per forward: the CPU kernel would convert
    it in every layer, forward and backward. Exactly the same softmax. Any other mask is returned as it is."""
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu":
        return mask
    return torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))


# ---- checkpoints -----------------------------------------------------------------------------------------------------
# Ours and Meta's: params.json + consolidated.NN.pth (+ tokenizer.model, which Meta's download keeps one folder up).
# Hugging Face's: config.json + *.safetensors or pytorch_model*.bin (+ tokenizer.model). Loads use weights_only=True (a
# pickle cannot run code) and mmap where the format allows; the model is built on the meta device and takes the loaded
# tensors as they are (assign=True), so a 7B checkpoint does not need twice its size in memory.
class CheckpointError(ValueError):
    pass


# How Meta's model-parallel shards split each weight (fairscale): column-parallel layers split rows (dim 0),
# row-parallel layers and the embedding split columns (dim 1); norms are replicated.
_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}


def _shard_dim(name: str) -> Optional[int]:
    return _SHARD_DIM.get(name.split(".")[-2] if name.endswith(".weight") else name)


def _torch_load(f: Path):
    """A weights file as a dict of tensors, or CheckpointError with one line (never torch's advice to lift
    weights_only: a file that needs it could run code)."""
    try:
        try:
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # an old (non-zip) file cannot be memory-mapped; a zip one can
            if "mmap" not in str(e):
                raise
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a class: loading it would run the file's code
        raise CheckpointError(f"{f}: holds Python objects, not only tensors, and loading it could run code: refused; "
                              "save the model's state_dict() with torch.save instead") from None
    except Exception as e:  # truncated, corrupt, not a torch file at all
        raise CheckpointError(f"{f}: cannot be loaded: {str(e).splitlines()[0][:200]}") from None


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    return d


def _args_from_params(params: dict, f: Path):
    """Meta's params.json as ModelArgs; a missing shape key or a value of the wrong type is a CheckpointError."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise CheckpointError(f"{f}: missing {', '.join(missing)}")
    try:
        return ModelArgs.from_dict(params)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def check_weights_file(f: Path):
    """CheckpointError unless `f` is whole: reads a zip archive's directory (torch.save's format since PyTorch 1.6;
    the directory sits at the end, so a file cut short has none) or a safetensors header, never the tensors, so it is
    as cheap for 7B as for 1M. An old non-zip torch.save file cannot be checked without reading it: it passes."""
    with open(f, "rb") as fh:
        head = fh.read(8)
        if f.suffix == ".safetensors":
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                if not 0 < n < 100_000_000:
                    raise ValueError(n)
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                raise CheckpointError(f"{f}: not a safetensors file (its header does not parse)") from None
            if 8 + n + end != os.fstat(fh.fileno()).st_size:
                raise CheckpointError(f"{f}: incomplete (cut off while it was written?); write it again")
            return
    if head[:1] == b"\x80":  # a pickle: torch.save's format before PyTorch 1.6
        return
    try:
        with zipfile.ZipFile(f) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                raise CheckpointError(f"{f}: a zip archive, but not one written by torch.save")
    except (zipfile.BadZipFile, EOFError, ValueError):
        what = "incomplete (cut off while it was written?)" if head.startswith(b"PK") else "not a torch.save file"
        raise CheckpointError(f"{f}: {what}; write it again") from None


HEADS = {"lm": "a language model", "scalar": "a reward or value model"}  # ModelArgs.head, in words


def checkpoint_layout(path, expect_head: Optional[str] = None) -> str:
    """"meta" (params.json) or "hf" (config.json) for a checkpoint directory, else CheckpointError; with expect_head,
    also CheckpointError unless its head is that one ("lm" when the file names none, as Meta's and Hugging Face's).
    It reads no weights, so a stage checks every directory it needs before it starts (common.check_checkpoints)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if (path / "params.json").is_file():
        layout, key = "meta", "head"
    elif (path / "config.json").is_file():
        layout, key = "hf", "nanollama2_head"  # export_hf writes it for our reward models
    else:
        raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (Hugging Face layout) found")
    if expect_head is None:
        return layout
    head = _read_json(path / ("params.json" if layout == "meta" else "config.json")).get(key) or "lm"
    if head != expect_head:
        raise CheckpointError(f"{path}: {HEADS.get(head, repr(head))} (head {head!r}), where "
                              f"{HEADS[expect_head]} is needed (head {expect_head!r})")
    return layout


def check_checkpoint(path, expect_head: Optional[str] = None) -> str:
    """checkpoint_layout, and everything that can be checked without reading the weights: the settings file makes a
    model, and every weights file is whole (check_weights_file). A stage runs it on each checkpoint before any work."""
    layout, path = checkpoint_layout(path, expect_head), Path(path)
    if layout == "meta":
        _args_from_params(_read_json(path / "params.json"), path / "params.json")
        files = sorted(path.glob("consolidated.*.pth"))
    else:
        missing = [k for k in _HF_KEYS if k not in _read_json(path / "config.json")]
        if missing:
            raise CheckpointError(f"{path / 'config.json'}: missing {', '.join(missing)}")
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path}: {'params' if layout == 'meta' else 'config'}.json but no weights file")
    for f in files:
        check_weights_file(f)
    return layout


def load_checkpoint(path, device="cpu", dtype=None, expect_head: Optional[str] = None,
                    **arg_overrides) -> Transformer:
    """A checkpoint directory (ours, Meta's or Hugging Face's) as a Transformer; expect_head as checkpoint_layout."""
    path = Path(path)
    args, state = (_read_meta if checkpoint_layout(path, expect_head) == "meta" else _read_hf)(path)
    args = ModelArgs(**{**asdict(args), **arg_overrides})
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(t.shape)} but params say {tuple(expected[k].shape)}")
        if dtype is not None or not t.is_floating_point():
            state[k] = t.to(device).to(dtype or torch.float32)  # cast on the device: no full-size copy in RAM
    model.load_state_dict(state, assign=True, strict=True)
    # the RoPE tables are not weights: rebuild them for real (they were created on the meta device)
    model.rope_cos, model.rope_sin = rope_tables(args.head_dim, 2 * args.max_seq_len, args.rope_theta)
    return model.to(device)


def find_tokenizer(path, tokenizer=None, flag: Optional[str] = None) -> Path:
    """The tokenizer.model that goes with checkpoint directory `path`: `tokenizer` when the user named one; else the
    one inside `path` (ours, Hugging Face's); else the one in its parent, where Meta's download puts it. Else
    FileNotFoundError naming the paths tried and `flag`, the stage's option for giving the path."""
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer not found: {tokenizer}")
        return Path(tokenizer)
    # abspath: Path(".").parent is "." again, and Path("a/..").parent is "a"
    tried = [Path(path) / "tokenizer.model", Path(os.path.abspath(path)).parent / "tokenizer.model"]
    for f in tried:
        if f.is_file():
            return f
    hint = f"; pass {flag} PATH" if flag else ""
    raise FileNotFoundError(f"{path}: no tokenizer.model in the checkpoint directory ({tried[0]}) or its parent "
                            f"(Meta's download layout: {tried[1]}){hint}")


def _read_meta(path: Path):
    params = _read_json(path / "params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: params.json but no consolidated.*.pth")
    parts = [_torch_load(f) for f in shards]
    if params.get("vocab_size", -1) <= 0:  # Meta writes -1: the vocabulary comes from the tokenizer / embedding
        params["vocab_size"] = parts[0]["tok_embeddings.weight"].shape[0]
    args = _args_from_params(params, path / "params.json")
    if len(parts) == 1:
        return args, dict(parts[0])
    state = {}
    for name in parts[0]:  # 13B (2 shards), 70B (8 shards): concatenate each split weight along its split dim
        d = _shard_dim(name)
        state[name] = parts[0][name] if d is None else torch.cat([p[name] for p in parts], dim=d)
    return args, state


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF: within each head, rows (2i, 2i+1) become rows i and i + D/2 ("rotate half" RoPE layout)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of _hf_permute."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_HF_NAMES = {  # Meta name pattern -> Hugging Face name pattern
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _meta_to_hf_name(name: str) -> str:
    if not name.startswith("layers."):  # our own weights (the scalar head `score`) keep their names
        return _HF_NAMES.get(name, name)
    _, i, rest = name.split(".", 2)  # layers.N.attention.wq.weight
    sub, _, suffix = rest.rpartition(".")
    return f"model.layers.{i}.{_HF_NAMES[sub]}.{suffix}"


_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


def _read_hf(path: Path):
    cfg = _read_json(path / "config.json")
    n_heads = cfg["num_attention_heads"]
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or None, vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
                     max_seq_len=cfg.get("max_position_embeddings", 4096),
                     head="scalar" if cfg.get("nanollama2_head") == "scalar" else "lm",
                     score_offset=cfg.get("nanollama2_score_offset", 0.0))
    hidden = cfg["intermediate_size"]
    args.multiple_of, args.ffn_dim_multiplier = 1, None
    if args.ffn_hidden != hidden:  # express the given width through Meta's rule: multiplier on the 8/3*dim width
        args.ffn_dim_multiplier = hidden / int(2 * 4 * args.dim / 3)
        if args.ffn_hidden != hidden:
            raise CheckpointError(f"{path}: intermediate_size {hidden} cannot be expressed as Meta's FFN width rule")
    if args.n_kv_heads == args.n_heads:
        args.n_kv_heads = None
    hf = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        for f in files:
            hf.update(load_file(str(f)))  # safetensors memory-maps and never runs code
    else:
        files = sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{path}: config.json but no *.safetensors or pytorch_model*.bin")
        for f in files:
            hf.update(_torch_load(f))
    with torch.device("meta"):
        names = {_meta_to_hf_name(k): k for k in Transformer(args).state_dict()}
    state = {}
    for hname, t in hf.items():
        if hname not in names:
            if "rotary_emb" in hname:  # old HF files stored the RoPE frequencies; we compute them
                continue
            raise CheckpointError(f"{path}: unexpected weight {hname}")
        name = names[hname]
        if name.endswith("attention.wq.weight"):
            t = _hf_unpermute(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = _hf_unpermute(t, args.kv_heads)
        state[name] = t
    return args, state


def save_checkpoint(model: Transformer, out_dir, tokenizer_path=None, extra_params: Optional[dict] = None,
                    weights_file: Optional[Path] = None):
    """Meta's layout: params.json + consolidated.00.pth (+ a copy of tokenizer.model), each file written atomically so
    that a crash mid-write leaves the previous checkpoint intact. weights_file: a consolidated.00.pth already written
    (a training checkpoint's, common.py), put in place by link_or_copy instead of writing the weights again; `model`
    then only gives params.json, so it may be sharded (FSDP)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = asdict(model.args)
    params.update(extra_params or {})
    if weights_file is None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}  # uncompiled names only
        atomic_write(out / "consolidated.00.pth", lambda f: torch.save(state, f))
    else:
        link_or_copy(weights_file, out / "consolidated.00.pth")
    atomic_write(out / "params.json", lambda f: f.write(json.dumps(params, indent=2).encode()))
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        data = Path(tokenizer_path).read_bytes()
        atomic_write(out / "tokenizer.model", lambda f: f.write(data))


def export_hf(model: Transformer, out_dir, tokenizer_path=None):
    """Hugging Face's layout (config.json + model.safetensors) that transformers' LlamaForCausalLM loads."""
    from safetensors.torch import save
    a, out = model.args, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        if name.endswith("attention.wq.weight"):
            t = _hf_permute(t, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = _hf_permute(t, a.kv_heads)
        hf[_meta_to_hf_name(name)] = t.contiguous()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
           "intermediate_size": a.ffn_hidden, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
           "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
           "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
           "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    if a.head == "scalar":
        cfg["nanollama2_head"] = "scalar"  # not a LlamaForCausalLM: our reward/value head, reloadable here
        cfg["nanollama2_score_offset"] = a.score_offset  # the reward's zero point (reward.py calibrates it)
    atomic_write(out / "model.safetensors", lambda f: f.write(save(hf, metadata={"format": "pt"})))
    atomic_write(out / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))
    if tokenizer_path is not None:
        data = Path(tokenizer_path).read_bytes()
        atomic_write(out / "tokenizer.model", lambda f: f.write(data))


def atomic_write(dest: Path, write):
    """Call write(f) on a temporary file beside dest, fsync it, then rename it to dest: readers see the old file or the
    new one, never half of one. A failed write (a crash, a full disk) removes the temporary file and re-raises."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)  # atomic on POSIX
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def fsync_dir(path: Path):
    """Make a rename inside `path` durable: without it a power cut may undo the rename though the file's bytes are on
    disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dest: Path):
    """dest becomes the file src: a hard link (one copy on disk, two names) where the filesystem allows, else a copy;
    renamed into place either way, so readers of dest never see half a file."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (FAT, some network filesystems)
        with open(src, "rb") as s:
            atomic_write(dest, lambda f: shutil.copyfileobj(s, f))
        return
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
