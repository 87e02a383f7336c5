"""Sampling from a Llama 2 model: Meta's llama/generation.py, re-thought for batches and for use inside training.

  python generate.py --checkpoint out/sft --prompt "Alice's pet is a"      # text completion
  python generate.py --checkpoint out/sft --chat --system "Be brief."       # interactive chat, Llama 2 format
  python generate.py --checkpoint /path/to/llama-2-7b-chat --chat --device cuda --compile

The lesson, top to bottom:
  - KVCache: preallocated keys and values per layer that the model writes into; Attention itself keeps no state.
  - The sampling rule: temperature, then Meta's nucleus (top-p) rule, in fp32; greedy at temperature 0.
  - generate(), in numbered steps: 1. left-pad a batch of prompts so every row's next token sits in the same column;
    2. prefill them in one call; 3. decode one token per step over the cache, each row stopping at its own EOS;
    4. drop finished rows from the model's batch. num_samples=K prefills a prompt once and samples K continuations
    from the shared prefix (rejection sampling). CachedPrompt lets a chat's next turn compute only what it adds.
  - sequence_logprobs(): the log-probability of given continuation tokens (PPO's logprobs and ref_logprobs).
  - The chat helpers every stage samples with: chat_generate / chat_replies answer dialogs in the Llama 2-Chat
    format, batched; load_model_and_tokenizer opens a checkpoint. Then the command line.
On a CPU, one call (cpu_speed.fast_decode) re-lays the weights for decoding, and sampling uses the same draws as
torch.multinomial without its checks: speed only, tested equal to the plain path (cpu_speed.py). --compile compiles
the decode step, not the loop (gpt-fast's recipe): on CUDA a CUDA graph over the whole static cache, masked, so no
shape changes from token to token; on the CPU a cache length that is a symbolic size. Speed figures: RESULTS.md.

Choices where Meta's code differs or is silent:
  1. Left padding with per-row RoPE positions (Meta pads on the right and overwrites); attention masks hide the pads,
     so one prefill call serves prompts of every length.
  2. Returned completions include the EOS token when one was sampled: RL needs to know the reply ended.
  3. The log-probs returned with samples are those of the temperature-scaled distribution before top-p truncation;
     PPO samples with top_p=1.0, so they are exactly the sampling distribution's.
  4. Seeding: one generator for the batch (Meta's way, one draw for all rows per step), or one generator per row, so
     that a row's sample does not depend on its batch-mates (PPO under torchrun: N processes sample what one would).
  5. A finished row keeps its place in the sampling step (with stale logits), so every row draws exactly the random
     numbers it would draw if no row were dropped: dropping finished rows changes speed, never tokens.
  6. A dialog that smuggles a chat tag ([INST], <<SYS>>, ...) into any message is answered with UNSAFE_ERROR, as in
     Meta's chat_completion: a user must not forge a system prompt or a model turn.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import common
import cpu_speed
from model import CheckpointError, Transformer, find_tokenizer, load_checkpoint
from tokenizer import UNSAFE_ERROR, Tokenizer, has_special_tags


# ---- the KV cache --------------------------------------------------------------------------------------------------
class KVCache:
    """Keys/values for every layer, allocated once: k[l], v[l] of shape (B, K, S, D), S = max_len. One tensor per layer,
    not one (L, B, K, S, D) block: compiled, a write into a view block[l] copied the whole block every step, while a
    write into a graph input itself happens in place."""

    def __init__(self, model: Transformer, batch: int, max_len: int, device=None, dtype=None):
        a = model.args
        p = next(model.parameters())
        shape = (batch, a.kv_heads, max_len, a.head_dim)
        self.k = [torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype) for _ in range(a.n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.max_len = max_len

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: Optional[int]):
        """Write k, v (B, K, T, D) at positions pos (T,); return the first kv_len positions (all when None)."""
        ck, cv = self.k[layer], self.v[layer]  # (B, K, S, D)
        ck.index_copy_(2, pos, k.to(ck.dtype))
        cv.index_copy_(2, pos, v.to(cv.dtype))
        if kv_len is None:
            return ck, cv
        return ck[:, :, :kv_len], cv[:, :, :kv_len]  # (B, K, kv_len, D)

    def select_rows(self, rows: torch.Tensor) -> "KVCache":
        """A cache of the given rows (R,) only, in that order (generate() drops finished rows)."""
        new = object.__new__(KVCache)
        new.k = [k.index_select(0, rows) for k in self.k]
        new.v = [v.index_select(0, rows) for v in self.v]
        new.max_len = self.max_len
        return new

    def repeat_rows(self, n: int) -> "KVCache":
        """A cache whose row b*n + j copies row b: K samples continue from one prefilled prompt."""
        new = object.__new__(KVCache)
        new.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        new.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        new.max_len = self.max_len
        return new


class CachedPrompt:
    """One conversation's last prompt and its keys/values, kept for a next generate() call whose prompt extends it:
    the next turn of the same chat. Start with an empty one; generate(prefix=[...]) reads and then overwrites it.

    Why: a chat's next prompt is its last prompt + the reply + the new user turn. Prefilled from scratch, turn n costs
    the whole history again, and Ghost Attention's eight-turn sampling would spend most of its time there. With the
    cache, generate() copies the leading tokens a row shares with its last prompt (their keys and values, to the row's
    new place in the left-padded batch) and computes only the columns after them. The new prompt may differ from the
    old one anywhere (a reply replaced, an early turn dropped to fit the context): only the common prefix, token for
    token, is reused. Logits equal a fresh prefill's up to float rounding (tests/test_generate.py).
    Memory: the keys/values of the prompt, as views of the batch's cache (which stays alive until they are replaced)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.k: list[torch.Tensor] = []  # per layer (K, len(tokens), D)
        self.v: list[torch.Tensor] = []

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` this cache holds; never the last one, whose logits sampling needs."""
        n = 0
        for a, b in zip(self.tokens, prompt[:-1]):
            if a != b:
                break
            n += 1
        return n


# ---- the sampling rule ---------------------------------------------------------------------------------------------
def sample_top_p(probs: torch.Tensor, top_p: float, generator=None) -> torch.Tensor:
    """Meta's nucleus rule: sort descending, keep each token whose preceding mass is <= top_p (so the smallest set
    reaching top_p, always at least the top token), renormalize, sample. probs (B, V) fp32 -> (B,) token ids."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)  # (B, V)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
    sorted_p = sorted_p.masked_fill(before > top_p, 0.0)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    choice = draw(sorted_p, generator)  # (B,) index into the sorted order
    return idx.gather(-1, choice[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B, V) -> (B,): torch.multinomial(probs, 1).

    generator: one torch.Generator for the whole batch (None: torch's global one): one draw for all rows, laid out by
    row position, so a row's tokens depend on which rows share its batch. Or a list of B, one per row: row b then
    takes its random numbers from generator[b] alone, and its tokens depend only on its own generator and logits
    (PPO under torchrun: a reply must not depend on which process samples it)."""
    if probs.device.type == "cpu":
        return cpu_speed.exponential_race(probs, generator)  # the same draws, without multinomial's checks
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g) for b, g in enumerate(generator)])[:, 0]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sample(probs: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """probs (B, V) fp32 -> (B,) token ids, by the nucleus rule (top_p < 1) or from the whole distribution."""
    if top_p < 1.0:
        return sample_top_p(probs, top_p, generator)
    return draw(probs, generator)


def _next_token(logits, temperature, top_p, generator, want_logprobs: bool = True):
    """logits (B, V) fp32 -> (tokens (B,), logprobs (B,) under the temperature-scaled distribution, or None when
    greedy decoding was not asked for them: a log-softmax over the vocabulary is not free)."""
    if temperature <= 0:
        tok = logits.argmax(-1)
        if not want_logprobs:
            return tok, None
        logp = F.log_softmax(logits, -1)
    else:
        logp = F.log_softmax(logits / temperature, -1)
        tok = _sample(logp.exp(), top_p, generator)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# ---- generate(): its steps ------------------------------------------------------------------------------------------
def _left_pad(prompt_tokens: list[list[int]], pad_id: int, device):
    """Step 1: left-pad the prompts so that row b's prompt occupies columns pad_len[b] .. P-1 and the next token is
    column P in every row. Returns tokens (B, P), pad_len (B,), positions (B, P): each prompt's own RoPE positions
    from 0, and the prefill's attention mask (B, P, P): causal, over real keys only."""
    lens = [len(p) for p in prompt_tokens]
    B, P = len(prompt_tokens), max(lens)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompt_tokens):
        tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    pad_len = torch.tensor([P - n for n in lens], device=device)  # (B,)
    cols = torch.arange(P, device=device)
    positions = (cols[None, :] - pad_len[:, None]).clamp(min=0)  # (B, P)
    real = cols[None, :] >= pad_len[:, None]  # (B, P) key is a real token
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    # a pad query attends to itself only, so no softmax row is empty (an all-masked row would give NaN)
    mask = causal[None] & (real[:, None, :] | torch.eye(P, dtype=torch.bool, device=device)[None])  # (B, P, P)
    return tokens, pad_len, positions, mask


def _reuse_prefix(cache: KVCache, prefix: list[CachedPrompt], prompt_tokens: list[list[int]]) -> int:
    """Copy into the (left-padded) cache the keys/values of what each prompt shares with its cached one, and return
    the first column the prefill must compute: every row's uncached tokens are at or after it."""
    lens = [len(p) for p in prompt_tokens]
    P = max(lens)
    reuse = [c.reusable(p) for c, p in zip(prefix, prompt_tokens)]
    first = P - max(n - r for n, r in zip(lens, reuse))
    for b, c in enumerate(prefix):  # row b: columns P - lens[b] .. first-1 hold its first n cached tokens
        n = first - (P - lens[b])
        if n > 0:
            for new, old in zip(cache.k + cache.v, c.k + c.v):
                new[b, :, P - lens[b]:first] = old[:, :n]
    return first


def _prefill(model: Transformer, prompt_tokens: list[list[int]], S: int, pad_id: int,
             prefix: Optional[list[CachedPrompt]], reuse: bool):
    """Steps 1 and 2: left-pad the prompts and run them through the model in one call, filling a cache of S columns.
    Returns the cache, the logits (B, V) of each row's next token, and pad_len (B,). With reuse, what a prompt shares
    with its CachedPrompt is copied, not computed; each CachedPrompt is then overwritten with this prompt."""
    device = next(model.parameters()).device
    lens = [len(p) for p in prompt_tokens]
    P = max(lens)
    tokens, pad_len, positions, mask = _left_pad(prompt_tokens, pad_id, device)  # 1.
    cache = KVCache(model, len(prompt_tokens), S, device=device)
    first = 0  # the first column to compute; the columns before it come from the cached prompts
    if reuse:
        first = _reuse_prefix(cache, prefix, prompt_tokens)
    h = model.trunk(tokens[:, first:], positions=positions[:, first:], mask=mask[:, None, first:], cache=cache,
                    cache_pos=torch.arange(first, P, device=device), kv_len=P)  # (B, P - first, C)
    logits = model.output(h[:, -1]).float()  # (B, V): only the last column's logits are needed, not all P of them
    if prefix is not None:  # decoding writes at columns >= P only: the prompt's columns stay for the next call
        for b, c in enumerate(prefix):
            c.tokens = list(prompt_tokens[b])
            c.k, c.v = [k[b, :, P - lens[b]:P] for k in cache.k], [v[b, :, P - lens[b]:P] for v in cache.v]
    return cache, logits, pad_len


def _decode_step(model, tok, t, pad_len, real, cache, kv_len):
    """Step 3, one token: the logits (B, V) of the next token for every row. tok (B, 1) the token in column t (1,);
    pad_len (B,); real (B, S) True where a column holds a real token (not left padding). kv_len=t+1 attends over the
    first t+1 columns only; kv_len=None attends over the whole cache, the same shapes at every token (for CUDA
    graphs), masking the columns after t."""
    if kv_len is None:
        mask = real & (torch.arange(real.size(1), device=real.device) <= t)  # (B, S): real tokens up to and incl. t
    else:
        mask = real[:, :kv_len]  # (B, t+1): a view, nothing after t to hide
    h = model.trunk(tok, positions=(t - pad_len)[:, None], mask=mask[:, None, None, :], cache=cache, cache_pos=t,
                    kv_len=kv_len)  # (B, 1, C)
    return model.output(h[:, -1]).float()  # (B, V) fp32: sampling is done in fp32


# Step 4 copies the live rows into a smaller cache once at most this share of the cache's rows is still decoding.
# 1.0 compacts at every finished row, 0.0 never: the tests compare the two.
COMPACT_AT = 0.75


def _compact(cache: KVCache, live: Optional[torch.Tensor], done: torch.Tensor):
    """Step 4: once a quarter of the cache's rows have finished (COMPACT_AT), keep only the live ones. A decode step
    costs in proportion to its rows, and the longest of many samples sets the loop's length. Returns the cache and
    `live`, the rows (B_live,) it holds, in order (None: all B)."""
    rows = live if live is not None else torch.arange(done.numel(), device=done.device)
    keep = ~done[rows]  # (B_live,) which of the cache's rows still decode
    n_keep = int(keep.sum())
    if n_keep < rows.numel() and n_keep <= COMPACT_AT * rows.numel():
        cache = cache.select_rows(keep.nonzero().squeeze(1))
        live = rows[keep]
    return cache, live


_compiled_steps: dict = {}


def _compiled_decode_step(device: torch.device):
    """torch.compile of the decode step only, not of the loop (gpt-fast's recipe).

    CUDA: "reduce-overhead" replays the step as a CUDA graph, one launch per token instead of one per kernel. A graph
    has fixed shapes: the step attends over the whole static cache, masked (kv_len=None in generate).
    CPU: no graph to replay, and reading the unwritten part of a static cache is waste. So it slices the cache like
    eager, and dynamic=True makes the length a symbolic size: one compilation serves every step and prompt length."""
    if device.type not in _compiled_steps:
        cuda = device.type == "cuda"
        _compiled_steps[device.type] = torch.compile(_decode_step, dynamic=not cuda,
                                                     mode="reduce-overhead" if cuda else None)
    return _compiled_steps[device.type]


def _check_request(prompt_tokens, num_samples: int, generator, prefix) -> None:
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token (e.g. BOS)")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompt_tokens) * num_samples:
        raise ValueError(f"{len(generator)} generators for {len(prompt_tokens) * num_samples} completions: "
                         f"give one per completion (len(prompts) * num_samples)")
    if prefix is not None and len(prefix) != len(prompt_tokens):
        raise ValueError(f"{len(prefix)} cached prompts for {len(prompt_tokens)} prompts: give one per prompt")


@torch.no_grad()
def generate(model: Transformer, prompt_tokens: list[list[int]], max_new_tokens: int, *, temperature: float = 0.6,
             top_p: float = 0.9, eos_id: Optional[int] = 2, num_samples: int = 1, logprobs: bool = False,
             generator=None, compile: bool = False, pad_id: int = 0, prefix: Optional[list[CachedPrompt]] = None):
    """Sample continuations for a batch of prompts (lists of token ids, different lengths allowed).

    Returns completions: list (len(prompts) * num_samples, prompt-major) of token lists, each ending at its first EOS
    (included) or after max_new_tokens; with logprobs=True also the per-token log-probs, as (tokens, logprobs).
    Defaults are Meta's chat sampling (temperature 0.6, top_p 0.9); temperature 0 is greedy.
    generator: a torch.Generator for the whole batch (None: torch's global one), or a list of len(prompts) *
    num_samples generators, one per completion, in the output's order (see draw).
    prefix: one CachedPrompt per prompt (eager, num_samples 1): what a prompt shares with its cached one is not
    computed again, and each is overwritten with this call's prompt for the next call.
    """
    _check_request(prompt_tokens, num_samples, generator, prefix)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B = len(prompt_tokens)
    # CPU only, speed only: weights re-laid out and packed for decoding (cpu_speed.py), the same numbers
    with cpu_speed.fast_decode(model, B * num_samples, compile):
        max_seq = model.args.max_seq_len
        P = max(len(p) for p in prompt_tokens)
        if P >= max_seq:
            raise ValueError(f"prompt of {P} tokens does not fit the model's context of {max_seq} tokens")
        total = min(max_seq, P + max_new_tokens)

        # 1.-2. left-pad and prefill all prompts in one call, then share each prefix among its num_samples continuations
        static = compile and device.type == "cuda"  # attend over the whole cache with fixed shapes (CUDA graphs)
        # a static cache's length is rounded up to a power of two: other prompt lengths reuse the recorded graph
        S = min(max_seq, 1 << (total - 1).bit_length()) if static else total
        reuse = prefix is not None and num_samples == 1 and not compile
        cache, logits, pad_len = _prefill(model, prompt_tokens, S, pad_id, prefix, reuse)
        if num_samples > 1:
            cache = cache.repeat_rows(num_samples)
            logits, pad_len = logits.repeat_interleave(num_samples, 0), pad_len.repeat_interleave(num_samples, 0)
            B *= num_samples
        real = torch.arange(S, device=device)[None, :] >= pad_len[:, None]  # (B, S) column holds a real token

        # 3. decode: one token per step. Finished rows drop out of the model's batch (step 4, `live`); the sampling
        # below still sees all B rows, finished ones with stale logits, so each row draws exactly the random numbers it
        # would draw if nothing were dropped (choice 5)
        step = _compiled_decode_step(device) if compile else _decode_step
        if static:  # the CUDA graph writes into the cache in place: the cache's address must not move
            for buf in cache.k + cache.v:
                torch._dynamo.mark_static_address(buf)
        columns = torch.arange(S, device=device)  # column t as a tensor is columns[t:t+1]: no new tensor per step
        out_tok = torch.full((B, total - P), pad_id, dtype=torch.long, device=device)
        out_logp = torch.zeros((B, total - P), dtype=torch.float32, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n_gen = torch.zeros(B, dtype=torch.long, device=device)
        live = None  # the rows (B_live,) the cache holds now, in order; None = all B
        per_row = isinstance(generator, (list, tuple))
        for i, t in enumerate(range(P, total)):
            if per_row and live is not None:  # one generator per row: only the live rows draw (nothing to keep aligned)
                tok, lp = out_tok[:, i], out_logp[:, i]
                gens = [generator[b] for b in live.tolist()]
                tok[live], lp_live = _next_token(logits[live], temperature, top_p, gens, want_logprobs=logprobs)
                if lp_live is not None:
                    lp[live] = lp_live
            else:
                tok, lp = _next_token(logits, temperature, top_p, generator, want_logprobs=logprobs)
                out_tok[:, i] = tok
                if lp is not None:
                    out_logp[:, i] = lp
            n_gen += (~done).long()
            if eos_id is not None:
                done |= tok == eos_id
                if bool(done.all()):  # waits for the device: only worth it when rows can finish early
                    break
            if t == total - 1:
                break
            if eos_id is not None and not compile:  # 4. eager only: CUDA graphs need fixed shapes
                cache, live = _compact(cache, live, done)
            if live is None:
                logits = step(model, tok[:, None], columns[t:t + 1], pad_len, real, cache, None if static else t + 1)
            else:
                logits[live] = step(model, tok[live][:, None], columns[t:t + 1], pad_len[live], real[live], cache,
                                    t + 1)

    model.train(was_training)
    n_gen = n_gen.tolist()
    toks = [out_tok[b, :n_gen[b]].tolist() for b in range(B)]
    if logprobs:
        return toks, [out_logp[b, :n_gen[b]].tolist() for b in range(B)]
    return toks


def sequence_logprobs(model: Transformer, prompts: list[list[int]], completions: list[list[int]],
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(completion token | everything before it) for a batch, with gradients if the model is training.

    Rows are prompt + completion, right-padded (padding after a sequence cannot change it under causal attention).
    Returns (B, Tc) fp32, Tc = longest completion, zeros past each completion's end. Used by PPO (logprobs of the
    policy and of the frozen reference) and checked against the log-probs recorded at sampling time.
    """
    device = next(model.parameters()).device
    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    Tc = max(len(c) for c in completions)
    tokens = torch.zeros((len(rows), T), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, device=device)
    logits, _ = model(tokens)  # (B, T, V) fp32
    logp = F.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)  # (B, T, V)
    out = torch.zeros((len(rows), Tc), dtype=torch.float32, device=device)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        if c:  # token c[j] sits at column len(p)+j and is predicted by the logits at the column before it
            idx = torch.tensor(c, device=device)
            out[b, :len(c)] = logp[b, len(p) - 1:len(p) - 1 + len(c)].gather(-1, idx[:, None]).squeeze(-1)
    return out


# ---- chat: the Llama 2 chat format on top of generate() (every stage that samples replies uses these) -------------
def load_model_and_tokenizer(path, device="cpu", dtype: Optional[torch.dtype] = None,
                             head: str = "lm") -> tuple[Transformer, Tokenizer]:
    """A checkpoint directory (ours, Meta's or Hugging Face's) and its tokenizer.model (model.find_tokenizer: inside
    it, or one folder up as Meta's download lays it out), in eval mode; a chat model, or with head="scalar" a
    reward model.
    Raises CheckpointError / FileNotFoundError / ValueError with a one-line reason (the CLIs call common.die)."""
    model = load_checkpoint(path, device=device, dtype=dtype, expect_head=head)
    tok_path = find_tokenizer(path)
    tok = Tokenizer(tok_path)
    if tok.n_words != model.args.vocab_size:
        raise ValueError(f"{tok_path} has {tok.n_words} tokens but the model's vocabulary is {model.args.vocab_size}")
    return model.eval(), tok


@dataclass
class Reply:
    text: str  # decoded, EOS removed, outer whitespace stripped
    tokens: list[int]  # the generated ids, EOS included when one was produced
    finished: bool  # ended with EOS within the budget (False: cut off at max_new_tokens or the context)


@torch.no_grad()
def chat_generate(model: Transformer, tok: Tokenizer, dialogs: list[list[dict]], max_new_tokens: int, *,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                  num_samples: int = 1, prefixes: Optional[list[CachedPrompt]] = None,
                  progress: Optional[str] = None) -> list[Reply]:
    """Answer each dialog (a list of messages ending with a user turn) in the Llama 2 chat format.

    Returns len(dialogs) * num_samples Replies, prompt-major (the num_samples replies of dialog 0 first), in the order
    of `dialogs`. Batched through generate(); prompts are sorted by length first, so each batch pads little and its
    longest prompt leaves the most room for the reply. A dialog with a chat tag in any message is answered with
    UNSAFE_ERROR and not generated (choice 6).
    prefixes: one CachedPrompt per dialog, kept by the caller from one turn of these dialogs to the next, so the next
    turn computes only what its prompt adds (the reply and the new user message). Batches then group the dialogs by
    how many tokens they add, so one dialog that must be computed whole (its early turns dropped to fit) does not make
    its batch-mates compute theirs. gatt.py's multi-turn sampling and Table 30 pass them.
    progress: a name for common.Ticker's lines (replies done, rate, ETA) while a long call runs; None: silent."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = []
    for i, d in enumerate(dialogs):
        ids, _ = tok.encode_dialog(d)  # ends "[INST] {user} [/INST]": the model writes the answer next
        if d[-1]["role"] != "user":
            raise ValueError(f"dialog {i}: the last message must be a user turn to answer")
        if len(ids) >= model.args.max_seq_len:
            raise ValueError(f"dialog {i}: its prompt is {len(ids)} tokens; the context is {model.args.max_seq_len}")
        prompts.append(ids)
    out: list[Optional[Reply]] = [None] * (len(dialogs) * num_samples)
    todo = []
    for i, d in enumerate(dialogs):
        if has_special_tags(d):
            for k in range(num_samples):
                out[i * num_samples + k] = Reply(UNSAFE_ERROR, [], True)
        else:
            todo.append(i)
    if prefixes is not None and len(prefixes) != len(dialogs):
        raise ValueError(f"{len(prefixes)} cached prompts for {len(dialogs)} dialogs: give one per dialog")
    cached = prefixes
    if cached is None:
        todo.sort(key=lambda i: len(prompts[i]))
    else:  # tokens to compute, then length
        todo.sort(key=lambda i: (len(prompts[i]) - cached[i].reusable(prompts[i]), len(prompts[i])))
    ticker = common.Ticker(progress or "", len(todo) * num_samples, enabled=progress is not None)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        samples = generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=tok.eos_id, num_samples=num_samples, generator=gen,
                           prefix=None if cached is None else [cached[i] for i in chunk])
        for j, toks in enumerate(samples):  # prompt-major: sample j belongs to chunk[j // num_samples]
            finished = bool(toks) and toks[-1] == tok.eos_id
            text = tok.decode(toks[:-1] if finished else toks).strip()
            out[chunk[j // num_samples] * num_samples + j % num_samples] = Reply(text, toks, finished)
        ticker.tick((s + len(chunk)) * num_samples)
    return out  # type: ignore[return-value]


def chat_replies(model: Transformer, tok: Tokenizer, dialogs: list[list[dict]], max_new_tokens: int,
                 **options) -> list[str]:
    """chat_generate, text only: one reply string per dialog (num_samples per dialog, prompt-major); the same
    keyword options."""
    return [r.text for r in chat_generate(model, tok, dialogs, max_new_tokens, **options)]


# ---- command line --------------------------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    checkpoint: str = "out/sft"  # a checkpoint directory: ours, Meta's or Hugging Face's
    prompt: str = ""  # text to complete (ignored with --chat)
    chat: bool = False  # interactive chat in the Llama 2 format
    system: Optional[str] = None  # system prompt for --chat
    max_new_tokens: int = 128  # tokens generated per reply at most
    temperature: float = 0.6  # 0 = greedy (Meta's chat default: 0.6)
    top_p: float = 0.9  # nucleus sampling's probability mass (Meta's chat default: 0.9)
    seed: int = 0
    # -- advanced --
    tokenizer: Optional[str] = None  # tokenizer.model; default: the one in --checkpoint
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16
    compile: bool = False  # torch.compile the decode step
    RANGES = common.ranges(positive="max_new_tokens", non_negative="temperature seed", positive_share="top_p")


def load_for_inference(cfg):
    """Checkpoint + tokenizer, or one clear error line."""
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(cfg.dtype, device)
    try:
        model = load_checkpoint(cfg.checkpoint, device=device, dtype=dtype, expect_head="lm")
    except CheckpointError as e:
        common.die(f"--checkpoint: {e}")
    try:
        tok_path = find_tokenizer(cfg.checkpoint, cfg.tokenizer, flag="--tokenizer")
    except FileNotFoundError as e:
        common.die(str(e))
    tok = Tokenizer(str(tok_path))
    if tok.n_words != model.args.vocab_size:
        common.die(f"{tok_path} has {tok.n_words} tokens but the model's vocabulary is {model.args.vocab_size}")
    return model.eval(), tok


def _complete(model, tok, cfg, prompt_ids, gen):
    t0 = time.perf_counter()
    out = generate(model, [prompt_ids], cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   eos_id=tok.eos_id, generator=gen, compile=cfg.compile)[0]
    dt = time.perf_counter() - t0
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return [t for t in out if t != tok.eos_id]


def chat(model, tok, cfg, gen):
    """The --chat loop: read a user turn, answer it, keep both in the dialog; an empty line or Ctrl-D ends it."""
    dialog = [{"role": "system", "content": cfg.system}] if cfg.system else []
    print("Chat in the Llama 2 format. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input("user> ").strip()
        except EOFError:
            break
        if not user:
            break
        dialog.append({"role": "user", "content": user})
        ids, _ = tok.encode_dialog(dialog)
        if len(ids) >= model.args.max_seq_len:
            print(f"(the dialog is {len(ids)} tokens, over the context of {model.args.max_seq_len}; starting over)",
                  file=sys.stderr)
            dialog = dialog[:1] if cfg.system else []
            continue
        reply = tok.decode(_complete(model, tok, cfg, ids, gen)).strip()
        if has_special_tags(dialog):  # Meta generates but answers with this error when a tag is smuggled in
            print(f"assistant> {UNSAFE_ERROR}")
            dialog.pop()  # the refused turn leaves the history, or every later turn would be refused too
            continue
        print(f"assistant> {reply}")
        dialog.append({"role": "assistant", "content": reply})


def main(cfg: GenerateConfig):
    model, tok = load_for_inference(cfg)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    if not cfg.chat:
        ids = tok.encode(cfg.prompt, bos=True, eos=False)
        if len(ids) >= model.args.max_seq_len:
            common.die(f"--prompt is {len(ids)} tokens; the context is {model.args.max_seq_len}")
        print(cfg.prompt + tok.decode(_complete(model, tok, cfg, ids, gen)))
        return
    chat(model, tok, cfg, gen)


if __name__ == "__main__":
    main(common.parse_config(GenerateConfig, description=__doc__))
