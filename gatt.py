"""Ghost Attention (paper §3.3): keep following a system-level instruction for the whole dialogue, not one turn.

  python gatt.py                                  # the latest RLHF model (out/ppo) -> out/gatt, with Table 30
  python gatt.py --init-from out/sft --out-dir out/gatt_from_sft
  python gatt.py --device cuda                    # one GPU; one process samples and fine-tunes (no torchrun)

A chat model that follows "Act as a pirate" when the instruction sits in the current message forgets it a few turns
later, once it sits only in the first one (Table 30's baseline: 100% at turn 2, 10% at turn 4, 0% at 6). GAtt fixes
it with data and a loss mask, not with any change to attention:
  1. Multi-turn dialogues (the world's questions), each with an instruction from the constraint kinds (figure, style,
     hobby, random combinations, half the time in the short form "Figure: pirate (Arr!)").
  2. Sampling: the instruction joined to EVERY user message, the replies sampled turn by turn from the latest RLHF
     model, which follows an instruction in the current turn. Each dialogue keeps its prompt's keys/values between
     turns (generate.CachedPrompt), so a turn computes only what it adds. The samples are the model's own replies:
     one that breaks the instruction is dropped, never replaced (choice 1).
  3. Training sample: the instruction in the FIRST user message only, the loss zeroed on the earlier turns, assistant
     replies included. The paper's form is one sample per prefix (turns 1..k, only reply k trained; --per-prefix).
     Attention is causal, so reply k sees the same context in the whole dialogue as in prefix k, and has the same
     loss (tests/test_gatt.py): the default trains each dialogue once with every reply on, at ~2/(n+1) of the tokens.
  4. Fine-tune with sft.py's recipe (sft.main) on these samples alone (the mixes of aids 4-5 are off).
  5. Table 30: the share of replies keeping the instruction at turns 1..8, before and after, with the model's own
     replies as history, on held-out dialogues and on constraints never trained on (zero-shot).
  6. Fig. 10 in numbers: the attention each turn's reply pays to the instruction, before and after, on the same
     dialogues; and adherence on that history with and without the instruction in turn 1.

Choices where the paper is silent, then the aids: help the paper's GAtt does without, off by default (RESULTS.md):
  1. A reply is dropped when it breaks the instruction's own rule (world.Constraint.check, the instruction's
     definition), and so is the rest of its dialogue: a later reply's history would hold the broken one. A dialogue
     is trained up to its last reply before the first dropped one and sampled no further; one whose first reply is
     dropped gives no sample. metrics.json: dropped_share and dropped_by_kind, the share of dialogue turns (the
     paper's per-prefix samples) lost, overall and per instruction kind; dropped_by_turn, the share of the replies
     sampled at turn t, after a history that kept the instruction, that broke it.
  2. The instruction goes in front of the user message ("inst question"), as a system prompt would.
  3. Aid: --rm-helpful and --rm-safety (reward model dirs) also drop a reply whose combined reward (§3.2.3's R_c; the
     GAtt questions are helpfulness prompts) is below 0.15, the level both RMs are calibrated to (reward.py).
  4. Aid: --mix-ratio r > 0 mixes r ordinary dialogues per trained GAtt reply into the fine-tune, so that the other
     skills are not forgotten: with --mix own, the model's own greedy replies to train prompts as sampled
     (unfiltered); with --mix sft, SFT's demonstrations, which bring back the writers' habit (world.DEMO_HABIT).
  5. Aid: --instruction-share s > 0 adds s in-turn instruction dialogues (the world's compliant replies, as in SFT's
     data) per trained GAtt reply: the skill every GAtt reply starts from.
  6. Aid: --instruction-focus F > 0 (with aid 5) draws half of those dialogues toward the instruction kinds dropped
     most in step 2 (focus_on_failures).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from random import Random
from collections.abc import Callable
from typing import Optional

import torch

import common
import rlhf
import sft
from data import write_dialogs_jsonl
from generate import CachedPrompt, chat_replies, load_model_and_tokenizer
from model import CheckpointError, save_checkpoint
from world import World


@dataclass
class GattConfig:
    init_from: str = "out/ppo"  # the latest RLHF model: samples the replies and is fine-tuned
    out_dir: str = "out/gatt"
    n_dialogs: int = 600  # GAtt dialogues sampled for training (step 2)
    n_turns: int = 8  # turns per dialogue (Table 30 reports up to 20; our context holds 8)
    lr: float = 1e-3  # fine-tuning peak lr (sft.py's recipe)
    epochs: int = 2  # over the training samples (step 3)
    per_prefix: bool = False  # the paper's one sample per dialogue prefix (same losses, ~4.5x the tokens: step 3)
    device: str = "auto"
    seed: int = 0
    quick: bool = False  # a seconds-long smoke run
    # -- advanced --
    n_eval: int = 100  # held-out dialogues per evaluation set (seen / unseen constraints)
    n_attention: int = 32  # of the seen ones, dialogues for Fig. 10's measurements (step 6)
    max_new_tokens: int = 48  # reply budget per turn (replies in capitals take many pieces)
    rm_helpful: Optional[str] = None  # aid 3, with --rm-safety: also drop replies whose combined reward is < 0.15
    rm_safety: Optional[str] = None  # aid 3: the safety RM
    mix_ratio: float = 0.0  # aid 4: ordinary dialogues per trained GAtt reply; 0 = off (the paper's GAtt)
    mix: str = "own"  # aid 4's dialogues: "own" (the model's replies, unfiltered) or "sft" (demonstrations)
    instruction_share: float = 0.0  # aid 5: in-turn instruction dialogues per trained GAtt reply; 0 = off
    instruction_focus: float = 0.0  # aid 6, > 0: half of aid 5's dialogues drawn toward the kinds dropped most
    world_seed: int = 0
    dtype: str = "auto"
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="n_dialogs n_turns n_eval n_attention max_new_tokens lr epochs",
        non_negative="mix_ratio instruction_share instruction_focus world_seed seed")


RM_FLOOR = 0.15  # aid 3: a reply whose combined reward (sigmoid scale) is below this is dropped (§3.2.3's threshold)
# dialogues per generate() call: a decoding step costs about the same for a few rows as for many, so wide batches pay;
# the multi-turn prompts are long, and 128 of them is where wider stops paying
TURN_BATCH, SINGLE_BATCH = 128, 256


def with_instruction(instruction: str, question: str) -> str:
    return f"{instruction} {question}"


# ---- 2. sampling with the instruction in every turn ------------------------------------------------------------------
Judge = Callable[[list, list], list]  # (prompts, replies) -> keep each reply? (aid 3's reward models)


@torch.no_grad()
def sample_dialogs(model, tok, dialogs: list, max_new_tokens: int,
                   judge: Optional[Judge] = None) -> tuple[list[list[str]], list[int]]:
    """Replies turn by turn, the instruction attached to every user message. A reply that breaks the instruction
    (g.check), or that `judge` rejects, is dropped with the rest of its dialogue, which is sampled no further
    (choice 1). Returns each dialogue's kept replies (all n_turns, or those before the first dropped one) and, per
    turn, how many replies were sampled at it."""
    n_turns = len(dialogs[0].user_turns)
    histories = [[] for _ in dialogs]
    replies = [[] for _ in dialogs]
    sampled = [0] * n_turns
    # each dialogue's last prompt and its keys/values: a turn computes only what it adds (the reply, the question)
    prefixes = [CachedPrompt() for _ in dialogs]
    alive = list(range(len(dialogs)))
    ticker = common.Ticker("gatt sampling", n_turns, unit="turns")
    for t in range(n_turns):
        if not alive:
            break
        for i in alive:
            histories[i].append({"role": "user", "content": with_instruction(dialogs[i].instruction,
                                                                             dialogs[i].user_turns[t])})
        prompts = [fit_context(tok, histories[i], model.args.max_seq_len - max_new_tokens, refill=0.5) for i in alive]
        out = chat_replies(model, tok, prompts, max_new_tokens, batch_size=TURN_BATCH,
                           prefixes=[prefixes[i] for i in alive])
        keep = [dialogs[i].check(r) for i, r in zip(alive, out)]
        if judge is not None and any(keep):  # the reward models see only replies the rule kept
            asked = [k for k, ok in enumerate(keep) if ok]
            for k, ok in zip(asked, judge([prompts[k] for k in asked], [out[k] for k in asked])):
                keep[k] = bool(ok)
        sampled[t], still = len(alive), []
        for i, r, ok in zip(alive, out, keep):
            histories[i].append({"role": "assistant", "content": r})  # only kept dialogues go on
            if ok:
                replies[i].append(r)
                still.append(i)
        alive = still
        ticker.tick(t + 1)
    return replies, sampled


def instruction_kind(constraints) -> str:
    """What an instruction asks, by rule: "hobby+upper" for capitals and a hobby, whatever the hobby."""
    return "+".join(sorted(c.rule for c in constraints))


def dropped_by_kind(dialogs: list, replies: list[list[str]]) -> dict[str, float]:
    """Share of the dialogue turns (the paper's per-prefix samples) dropped, per instruction kind: where the model's
    in-turn instruction following fails."""
    counts = {}
    for g, r in zip(dialogs, replies):
        lost, total = counts.get(instruction_kind(g.constraints), (0, 0))
        counts[instruction_kind(g.constraints)] = (lost + len(g.user_turns) - len(r), total + len(g.user_turns))
    return {k: lost / total for k, (lost, total) in sorted(counts.items())}


class RewardJudge(rlhf.RewardModels):
    """Aid 3: keeps a reply whose combined reward R_c (§3.2.3, sigmoid scale) is at least RM_FLOOR; the prompts are
    the GAtt questions, helpfulness prompts (IS_SAFETY false). Counts what it was asked and what it dropped."""

    def __init__(self, rm_helpful: str, rm_safety: str, tok, device):
        super().__init__(rm_helpful, rm_safety, device, RM_FLOOR)
        self.tok, self.asked, self.dropped = tok, 0, 0

    def __call__(self, prompts: list, replies: list) -> list[bool]:
        r_c, _ = super().__call__(self.tok, prompts, replies, torch.zeros(len(prompts), dtype=torch.bool))
        keep = (r_c >= RM_FLOOR).tolist()
        self.asked, self.dropped = self.asked + len(keep), self.dropped + keep.count(False)
        return keep


def fit_context(tok, history: list[dict], budget: int, refill: float = 1.0) -> list[dict]:
    """The latest turns of `history` whose prompt fits in `budget` tokens: whole (user, assistant) pairs are dropped
    from the front; once one must go, as many as bring the prompt down to refill * budget. Sampling only: every user
    message carries the instruction here, so the reply still sees it (eight turns with the instruction repeated
    outgrow a 512-token context; the training samples, which carry it once, fit).
    Why refill < 1 (sample_dialogs: 0.5): dropping just enough changes the front of the prompt again at every later
    turn, so none of it could be reused from the turn before (generate.CachedPrompt) and each turn would prefill the
    whole history; dropping to half leaves the front unchanged for the next few turns."""
    if len(tok.encode_dialog(history)[0]) <= budget:
        return history
    start = 2
    while len(tok.encode_dialog(history[start:])[0]) > refill * budget and start + 2 < len(history):
        start += 2
    return history[start:] if start < len(history) else history[-1:]


def focus_on_failures(rates: dict[str, float], focus: float):
    """Aid 6: keep(g) for World.instruction_dialogs, the probability of keeping an in-turn instruction dialogue of
    g's kind, (dropped share of the kind / the highest share) ** focus. Kinds step 2 did not sample count as the
    highest. None (keep all: the world's mix) for focus 0, the default."""
    top = max(rates.values(), default=0.0)
    if focus == 0 or top == 0:
        return None
    return lambda g: (rates.get(instruction_kind(g.constraints), top) / top) ** focus


@torch.no_grad()
def own_replies(model, tok, world, n: int, max_new_tokens: int, seed: int) -> list[list[dict]]:
    """Aid 4 with --mix own: the model's own greedy replies to n ordinary train prompts, as sampled (no rater filters
    them); earlier turns of multi-turn prompts are context (weight 0)."""
    tasks = world.tasks("train", n, seed=seed)
    budget = model.args.max_seq_len - max_new_tokens
    tasks = [t for t in tasks if len(tok.encode_dialog(t.messages)[0]) <= budget]
    out = chat_replies(model, tok, [t.messages for t in tasks], max_new_tokens, batch_size=SINGLE_BATCH,
                       progress="gatt own replies")
    return [[m if m["role"] != "assistant" else {**m, "weight": 0} for m in t.messages]
            + [{"role": "assistant", "content": r}] for t, r in zip(tasks, out)]


def instruction_mix(world, n: int, seed: int, keep=None) -> list[list[dict]]:
    """Aid 5: n in-turn instruction dialogues in the world's mix of kinds; with `keep` (aid 6), half of them in that
    mix (every skill stays in the data) and half drawn toward the most dropped kinds."""
    if keep is None:
        return world.instruction_dialogs("train", n, seed=seed)
    return (world.instruction_dialogs("train", n - n // 2, seed=seed)
            + world.instruction_dialogs("train", n // 2, seed=seed + 1000, keep=keep))


# ---- 3. the training samples: the instruction in the first turn only, no loss on the earlier turns -------------------
def training_samples(g, replies: list[str], per_prefix: bool = False) -> list[list[dict]]:
    """The GAtt training dialogue(s) of one sampled dialogue: user turns with the instruction in the first only.

    per_prefix=True: the paper's form, one dialogue per prefix k = 1..n, replies 1..k-1 with weight 0 (context, no
    loss), reply k trained. per_prefix=False: one dialogue with every reply trained, the same losses (module
    docstring, step 3)."""
    def dialog(k: int, last_only: bool) -> list[dict]:
        msgs = []
        for t in range(k):
            q = with_instruction(g.instruction, g.user_turns[t]) if t == 0 else g.user_turns[t]
            msgs.append({"role": "user", "content": q})
            context = last_only and t < k - 1  # an earlier reply of a prefix sample: context, no loss
            msgs.append({"role": "assistant", "content": replies[t], **({"weight": 0} if context else {})})
        return msgs
    if not per_prefix:
        return [dialog(len(replies), last_only=False)]
    return [dialog(k, last_only=True) for k in range(1, len(replies) + 1)]


# ---- 5. Table 30: does the instruction hold at turn t when only turn 1 carries it? -----------------------------------
@torch.no_grad()
def adherence_by_turn(model, tok, dialogs: list, max_new_tokens: int,
                      histories_out: Optional[list] = None) -> list[float]:
    """Share of replies that keep the instruction at each turn. The instruction is in the first user message only;
    the history is the model's own replies. A dialogue that outgrows the context counts as not adhering.
    histories_out: a list to receive each dialogue's messages (None for one that outgrew the context): Fig. 10."""
    n_turns = len(dialogs[0].user_turns)
    histories = [[] for _ in dialogs]
    alive = list(range(len(dialogs)))
    kept = [0] * n_turns
    prefixes = [CachedPrompt() for _ in dialogs]  # as in sample_dialogs
    for t in range(n_turns):
        for i in alive:
            g = dialogs[i]
            q = with_instruction(g.instruction, g.user_turns[t]) if t == 0 else g.user_turns[t]
            histories[i].append({"role": "user", "content": q})
        fits = [i for i in alive if len(tok.encode_dialog(histories[i])[0]) + max_new_tokens <= model.args.max_seq_len]
        out = (chat_replies(model, tok, [histories[i] for i in fits], max_new_tokens, batch_size=TURN_BATCH,
                            prefixes=[prefixes[i] for i in fits]) if fits else [])
        for i, r in zip(fits, out):
            kept[t] += dialogs[i].check(r)
            histories[i].append({"role": "assistant", "content": r})
        alive = fits
    if histories_out is not None:
        finished = set(alive)
        histories_out += [h if i in finished else None for i, h in enumerate(histories)]
    return [k / len(dialogs) for k in kept]


# ---- 6. Fig. 10: how much each reply looks at the instruction --------------------------------------------------------
# The paper's Fig. 10 shows, for one dialogue, the attention on the system message across the dialogue, with and
# without GAtt. Here: every held-out dialogue the GAtt model finished (its own replies, which keep the instruction),
# read by both models, so that the text is the same and only where they look differs. For the positions that write
# turn t's reply, the share of attention that falls on the instruction's tokens in turn 1, averaged over layers and
# heads, and (the paper's view: "the maximum activations across the network") in the head that looks most.
def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def instruction_span(tok, instruction: str, question: str) -> tuple[int, int]:
    """Columns [start, end) of the instruction's tokens in the encoded first turn "<s>[INST] {inst} {question} ...":
    where it starts, the question alone differs from it; where it ends, the instruction alone does (SentencePiece
    pieces never cross a space, so the instruction's tokens are the same in all three)."""
    enc = lambda text: tok.encode_dialog([{"role": "user", "content": text}])[0]  # noqa: E731
    full = enc(with_instruction(instruction, question))
    return _common_prefix(full, enc(question)), _common_prefix(full, enc(instruction))


@torch.no_grad()
def attention_maps(model, tokens: list[int]) -> torch.Tensor:
    """(L, H, T, T) attention probabilities of one row, every layer, recomputed from each layer's own weights (the
    model's attention calls a fused kernel that never forms them). tests/test_gatt.py checks that probs @ values
    through wo gives the attention module's output."""
    device = next(model.parameters()).device
    x = torch.tensor([tokens], device=device)  # (1, T)
    T = x.size(1)
    cos, sin = model.rope_cos[:T][None, :, None, :], model.rope_sin[:T][None, :, None, :]  # (1, T, 1, D/2)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    h, maps = model.tok_embeddings(x), []
    for layer in model.layers:
        a, hn = layer.attention, layer.attention_norm(h)
        q, k, _ = a.qkv(hn, cos, sin)  # (1, H, T, D), (1, K, T, D): as the layer computes them
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)  # (1, H, T, D): GQA, each KV head for its group
        scores = (q.float() @ k.float().transpose(-1, -2)) / a.head_dim ** 0.5  # (1, H, T, T)
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])  # (H, T, T)
        h = layer(h, cos, sin, None)
    return torch.stack(maps)  # (L, H, T, T)


def attention_to_instruction(model, tok, dialogs: list, histories: list) -> dict[str, list[float]]:
    """Per turn: the share of attention on the instruction from the positions that write that turn's reply, mean over
    layers and heads ("mean") and in the head with the largest share ("max_head"), averaged over the dialogues."""
    n_turns = len(dialogs[0].user_turns)
    mean, top, n = [0.0] * n_turns, [0.0] * n_turns, 0
    for g, hist in zip(dialogs, histories):
        if hist is None:  # outgrew the context
            continue
        start, end = instruction_span(tok, g.instruction, g.user_turns[0])
        tokens = tok.encode_dialog(hist)[0]
        maps = attention_maps(model, tokens)  # (L, H, T, T)
        on_inst = maps[..., start:end].sum(-1)  # (L, H, T): each query's share on the instruction
        for t in range(n_turns):
            lo = len(tok.encode_dialog(hist[:2 * t + 1])[0])  # the reply's first token...
            hi = len(tok.encode_dialog(hist[:2 * t + 2])[0])  # ...to its EOS; written at columns lo-1 .. hi-2
            share = on_inst[..., lo - 1:hi - 1].mean(-1)  # (L, H)
            mean[t] += share.mean().item()
            top[t] += share.max().item()
        n += 1
    return {"mean": [m / max(1, n) for m in mean], "max_head": [m / max(1, n) for m in top], "n": n}


@torch.no_grad()
def adherence_on_history(model, tok, dialogs: list, histories: list, max_new_tokens: int,
                         instruction: bool = True) -> list[float]:
    """Turns 2..n: share of replies that keep the instruction when the model answers turn t's question after a given
    finished history (not its own). instruction=False takes the instruction out of turn 1 of that history: what is
    left to copy from is the earlier, compliant replies, the part of adherence the instruction does not explain.
    The causal counterpart of Fig. 10's attention."""
    done = [(g, h) for g, h in zip(dialogs, histories) if h is not None]
    turns = range(1, len(dialogs[0].user_turns))
    prompts = [[{**m, "content": g.user_turns[0]} if j == 0 and not instruction else m
                for j, m in enumerate(h[:2 * t + 1])] for t in turns for g, h in done]
    out = chat_replies(model, tok, prompts, max_new_tokens, batch_size=TURN_BATCH)  # every turn in one call
    kept = [g.check(r) for (g, _), r in zip(done * len(turns), out)]
    n = len(done)
    return [sum(kept[i * n:(i + 1) * n]) / max(1, n) for i in range(len(turns))]


# ---- the run, step by step -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What every step of one GAtt run reads."""
    cfg: GattConfig
    out: Path
    device: torch.device
    tok: object
    world: World


def sample_and_write(run: Run, model) -> dict:
    """Steps 1-3: sample the training dialogues with the instruction in every turn, build the training samples (and
    the aids' mixes, when on), and write them to out/gatt_train.jsonl. Returns the figures metrics.json keeps."""
    cfg, world = run.cfg, run.world
    train = world.gatt_dialogs("train", cfg.n_dialogs, cfg.n_turns, seed=cfg.seed)
    judge = RewardJudge(cfg.rm_helpful, cfg.rm_safety, run.tok, run.device) if cfg.rm_helpful else None
    replies, sampled = sample_dialogs(model, run.tok, train, cfg.max_new_tokens, judge)
    kept = sum(len(r) for r in replies)  # trained GAtt replies
    dropped = 1 - kept / (len(train) * cfg.n_turns)
    by_kind = dropped_by_kind(train, replies)
    by_turn = [(n - sum(len(r) > t for r in replies)) / n if n else None for t, n in enumerate(sampled)]
    print(f"[gatt] sampled {len(train)} dialogues x {cfg.n_turns} turns; {dropped:.1%} of the turns dropped (a reply "
          f"that broke the instruction and the rest of its dialogue); by instruction kind: "
          + ", ".join(f"{k} {100 * r:.0f}%" for k, r in by_kind.items())
          + "; replies dropped at turn 1..n: " + " ".join("-" if x is None else f"{100 * x:.0f}%" for x in by_turn),
          flush=True)
    samples = [s for g, r in zip(train, replies) if r for s in training_samples(g, r, cfg.per_prefix)]
    mix = []  # the aids (4-6); none by default
    if cfg.mix_ratio > 0:
        n_mix = round(cfg.mix_ratio * kept)
        mix += (own_replies(model, run.tok, world, n_mix, cfg.max_new_tokens, seed=cfg.seed + 1) if cfg.mix == "own"
                else world.sft_dialogs("train", n_mix, seed=cfg.seed + 1))
    if cfg.instruction_share > 0:
        keep = focus_on_failures(by_kind, cfg.instruction_focus)
        mix += instruction_mix(world, round(cfg.instruction_share * kept), seed=cfg.seed + 1, keep=keep)
    if mix:
        print(f"[gatt] aids: {len(mix):,} mix dialogues (--mix-ratio {cfg.mix_ratio:g} --mix {cfg.mix}, "
              f"--instruction-share {cfg.instruction_share:g})", flush=True)
    rows = samples + mix
    Random(f"gatt/{cfg.seed}").shuffle(rows)
    write_dialogs_jsonl(run.out / "gatt_train.jsonl", rows)
    return {"n_train_dialogs": len(train), "n_train_samples": len(samples), "n_kept_replies": kept,
            "dropped_share": dropped, "dropped_by_kind": by_kind, "dropped_by_turn": by_turn, "n_mix": len(mix),
            **({"rm_dropped_share": judge.dropped / max(1, judge.asked)} if judge else {})}


def eval_dialogs(run: Run) -> tuple[list, list]:
    """Step 5's held-out dialogues: constraints seen in training, and constraints held out of it."""
    cfg = run.cfg
    seen = run.world.gatt_dialogs("val", cfg.n_eval, cfg.n_turns, seed=cfg.seed)
    unseen = [g for g in run.world.gatt_dialogs("test", 2 * cfg.n_eval, cfg.n_turns, seed=cfg.seed)
              if any(c.held_out for c in g.constraints)][:cfg.n_eval]
    return seen, unseen


def table_30(run: Run, model, seen: list, unseen: list, histories_out: Optional[list] = None) -> dict:
    """Step 5: adherence by turn on both held-out sets (histories_out receives the seen dialogues' histories)."""
    n = run.cfg.max_new_tokens
    return {"seen": adherence_by_turn(model, run.tok, seen, n, histories_out=histories_out),
            "unseen": adherence_by_turn(model, run.tok, unseen, n)}


def fine_tune(run: Run, n_rows: int):
    """Step 4: sft.py's recipe on out/gatt_train.jsonl, into out/. With nothing to train on (every dialogue dropped at
    its first reply, no aid on), out/ gets the starting model unchanged, and the run says so."""
    cfg = run.cfg
    if n_rows == 0:
        print(f"[gatt] WARNING: no training sample (every dialogue's first reply broke its instruction): {run.out} is "
              f"{cfg.init_from} unchanged", flush=True)
        model, _ = load_model_and_tokenizer(cfg.init_from, "cpu")
        save_checkpoint(model, run.out, Path(cfg.init_from) / "tokenizer.model")
        return
    sft_cfg = sft.SFTConfig(init_from=cfg.init_from, out_dir=str(run.out), data=str(run.out / "gatt_train.jsonl"),
                            seq_len=512, lr=cfg.lr, epochs=cfg.epochs, eval_n=100 if not cfg.quick else 8,
                            device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, val_frac=0.02)
    sft.main(sft_cfg)
    common.write_metrics(run.out, {"complete": False})  # sft.main marked its part done; GAtt is done after step 6


def figure_10(run: Run, tuned, seen: list, histories: list) -> tuple[dict, dict]:
    """Step 6: the same dialogues (the GAtt model's own) read by the model before GAtt and after; and what each
    model keeps of the instruction when it is taken out of turn 1 of that history."""
    cfg, tok = run.cfg, run.tok
    fig = slice(0, cfg.n_attention)
    base, _ = load_model_and_tokenizer(cfg.init_from, run.device)
    attention, on_history = {}, {}
    for who, m in (("baseline", base), ("gatt", tuned)):
        attention[who] = attention_to_instruction(m, tok, seen[fig], histories[fig])
        on_history[who] = {f"{k}_instruction": adherence_on_history(m, tok, seen[fig], histories[fig],
                                                                     cfg.max_new_tokens, instruction=k == "with")
                           for k in ("with", "without")}
        print(f"[gatt] {who}, attention on the instruction: " + _fmt_turns(attention[who]["mean"], 1)
              + f"; kept on that history, turns 2-{cfg.n_turns}, with / without it: "
              + " ".join(f"{100 * a:.0f}/{100 * b:.0f}%" for a, b in zip(*on_history[who].values())), flush=True)
    return attention, on_history


def main(cfg: GattConfig):
    if cfg.mix not in ("own", "sft"):
        common.die(f"--mix: expected 'own' or 'sft', got {cfg.mix!r}")
    if bool(cfg.rm_helpful) != bool(cfg.rm_safety):
        common.die("--rm-helpful and --rm-safety: aid 3 needs both reward models (or neither)")
    if cfg.instruction_focus > 0 and cfg.instruction_share == 0:
        common.die("--instruction-focus: aid 6 draws aid 5's dialogues; set --instruction-share too")
    if cfg.quick:
        cfg.n_dialogs, cfg.n_eval, cfg.n_turns, cfg.n_attention = 12, 8, 4, 4
    t0 = time.perf_counter()
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    common.preflight(out, init_from=(cfg.init_from, "lm"), rm_helpful=(cfg.rm_helpful, "scalar"),
                     rm_safety=(cfg.rm_safety, "scalar"))
    try:
        model, tok = load_model_and_tokenizer(cfg.init_from, device)
    except (CheckpointError, OSError, ValueError) as e:
        common.die(f"--init-from: {e}")
    world = World(seed=cfg.world_seed)
    run = Run(cfg, out, device, tok, world)

    data = sample_and_write(run, model)  # 1-3
    seen, unseen = eval_dialogs(run)
    before = table_30(run, model, seen, unseen)  # 5a. Table 30 before GAtt
    print("[gatt] before: " + _fmt_turns(before["seen"]), flush=True)
    del model
    fine_tune(run, data["n_train_samples"] + data["n_mix"])  # 4
    tuned, _ = load_model_and_tokenizer(out, device)
    histories: list = []
    after = table_30(run, tuned, seen, unseen, histories_out=histories)  # 5b. Table 30 after GAtt
    print("[gatt] after:  " + _fmt_turns(after["seen"]), flush=True)
    print("[gatt] unseen constraints, before: " + _fmt_turns(before["unseen"]) + "\n[gatt] unseen constraints, after:  "
          + _fmt_turns(after["unseen"]), flush=True)
    attention, on_history = figure_10(run, tuned, seen, histories)  # 6
    del tuned
    common.write_metrics(out, {
        "adherence_by_turn": {"baseline": before["seen"], "gatt": after["seen"]},
        "attention_to_instruction": attention, "adherence_on_gatt_history": on_history,
        "adherence_by_turn_unseen": {"baseline": before["unseen"], "gatt": after["unseen"]},
        **data, "aids": {"rm_filter": bool(cfg.rm_helpful), "mix_ratio": cfg.mix_ratio, "mix": cfg.mix,
                         "instruction_share": cfg.instruction_share, "instruction_focus": cfg.instruction_focus},
        "n_eval_seen": len(seen), "n_eval_unseen": len(unseen), "gatt_seconds": time.perf_counter() - t0,
        "complete": True})
    print(f"[gatt] done in {common.fmt_time(time.perf_counter() - t0)}; wrote {out}", flush=True)


def _fmt_turns(rates: list[float], digits: int = 0) -> str:
    return " ".join(f"t{t + 1} {100 * r:.{digits}f}%" for t, r in enumerate(rates))


if __name__ == "__main__":
    common.run_main(main, common.parse_config(GattConfig, description=__doc__))
