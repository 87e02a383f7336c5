"""Ghost Attention (paper §3.3): keep following a system-level instruction for the whole dialogue, not one turn.

  python gatt.py                     # the latest RLHF model (out/ppo) -> out/gatt, with the Table 30 measurement
  python gatt.py --init-from out/sft --out-dir out/gatt_from_sft

The problem. A chat model that follows "Act as a pirate" when the instruction sits in the current message forgets it
a few turns later, once it sits only in the first one (Table 30's baseline: 100% at turn 2, 10% at turn 4, 0% at 6).
GAtt fixes it with data and a loss mask, not with any change to attention:
  1. Take multi-turn dialogues (the world's questions) and an instruction inst drawn from the constraint kinds
     (figure / style / hobby, random combinations, half the time the short form "Figure: pirate (Arr!)").
  2. Sampling context: concatenate inst to EVERY user message, and sample each reply from the latest RLHF model, which
     does follow an instruction present in the current turn (learned in SFT from World.instruction_dialogs).
     Turn by turn, each dialogue keeps its prompt's keys/values (generate.CachedPrompt), so a turn computes only the
     reply and the question it adds, not the whole history again.
  3. Training sample: the same dialogue with inst kept in the FIRST user message only, and the loss zeroed on every
     token of the earlier turns, assistant replies included ("weight": 0): only the last turn's reply is learned.
     The paper's form is one training sample per dialogue prefix (turns 1..k, k = 1..n), so every turn is learned
     once, in the context it will be used in: the instruction far back, the model's own compliant earlier replies in
     between (`training_samples(..., per_prefix=True)`, `--per-prefix`).
  4. Fine-tune with sft.py's recipe on these samples, mixed with ordinary dialogues (choice 3).
  5. Measure Table 30: the share of replies keeping the instruction at turns 1..8, before and after, with the model's
     own replies as the history, on held-out dialogues, and on constraints held out of training (zero-shot).
  6. Fig. 10 in numbers: how much attention the replies of each turn pay to the instruction, before and after, on
     the same dialogues; and adherence after that history with and without the instruction in turn 1. In the
     miniature the attention is the same before and after GAtt (seed 0: 26% at turn 1, 7-8% at turn 8, both models);
     what differs is its use: after GAtt 90-100% of replies keep the instruction (before: 2-12%), 50-72% with it taken
     out, carried by the earlier compliant replies (BENCHMARKS.md).
A note on the mask, and why the default trains one sample per dialogue: attention is causal, so the tokens of reply k
see exactly the same context in the full dialogue as in prefix sample k (nothing after them is visible). The loss of
reply k is therefore the same number in both, and training the full dialogue once with every reply's loss on equals
training the n prefix samples on their last replies, at about 2/(n+1) of the tokens (8 turns: 4.5x fewer).
tests/test_gatt.py checks this on a model: the summed token losses of the two forms agree to float precision. The
per-prefix form stays (--per-prefix) because it is what "zero the loss on previous turns" means, sample by sample.

Choices where the paper is silent:
  1. A sampled reply that fails the constraint check (or the annotator's correctness) is replaced by the world's
     reference reply with the constraint applied; the share of such fallbacks is reported. The paper's RLHF model was
     reliable enough to skip this; a 1M-parameter model is not.
  2. The instruction goes in front of the user message ("inst question"), as a system prompt would.
  3. GAtt samples are mixed 1:1 with ordinary dialogues (one per trained GAtt reply, --mix-ratio) so that the other
     skills are not forgotten: by default (--mix own) the latest model's own greedy replies to the world's train
     prompts, kept where the annotator finds them safe and helpful (>= 0.75; refusals of harmful ones), plus
     0.9 as many in-turn instruction dialogues (--instruction-share; SFT's INSTRUCTION_SHARE is 0.3): the skill
     every GAtt reply starts from, since what GAtt misses is mostly a wrong word copied from the instruction already
     at turn 1. Doubling them (0.3 -> 0.6) raised adherence from 86-80% to 89-92% over turns 1-8, and 0.9 lifted seed
     1's from 91-82% to 96-95%, where hobbies were copied as similar words (GattConfig). `--mix sft` mixes
     the SFT demonstrations instead, as this file first did: they carry the writers' habit that RLHF trained away
     (DEMO_HABIT), and the GAtt model then lost most of RLHF's win rate against SFT (71% -> 46-54% in three runs,
     BENCHMARKS.md). Fine-tuning on the model's own replies keeps what it is.
  4. The in-turn instruction dialogues are drawn as the world draws them (--instruction-focus 0). With
     --instruction-focus F > 0, half of them are drawn toward the instruction kinds the model failed in step 2
     (gatt.focus_on_failures: a dialogue of a kind is kept with probability (the kind's fallback rate / the highest)
     ** F). That was the default (F = 8) while GAtt's misses were instructions the model did not follow even in the
     current turn (capitals + a hobby: "I LOVE SURFING." whatever the hobby, since a word in capitals is another
     spelling to learn), whose samples are mostly fallbacks: seed 0 87-82% -> 94-89% over turns 1-8. Since pretraining
     has club notices (data.py choice 7), the capitals kinds are still the most-failed in step 2 (their replies are
     long and any slip fails them), so the focus sends them nearly all its lessons, while what GAtt now misses is a
     word copied wrong from far back in every kind ("surfing" for sailing, "AHA!" for "Ahoy!"). On the four seeds'
     PPO models of one tree, lowest turn after GAtt, F = 8 -> F = 0: 95 -> 93%, 86 -> 91%, 94 -> 93%, 93 -> 95%
     (means over turns 1-8: 95.0 -> 95.4%), 14-29 fewer fine-tuning steps, the same win rates against SFT within a
     point. BENCHMARKS.md has the runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Optional

import torch

import common
import generate as G
from annotator import Annotator
from data import write_dialogs_jsonl
from world import World
from generate import CachedPrompt
from model import CheckpointError


@dataclass
class GattConfig:
    init_from: str = "out/ppo"  # the latest RLHF model: samples the replies and is fine-tuned
    out_dir: str = "out/gatt"
    n_dialogs: int = 600  # GAtt training dialogues (300: 77-67% over turns 1-8 at lr 5e-4, 2m20s less; see lr)
    n_turns: int = 8  # turns per dialogue (Table 30 reports turns up to 20; our context holds 8)
    n_eval: int = 100  # held-out dialogues per evaluation set (seen / unseen constraints)
    n_attention: int = 32  # of the seen ones, dialogues for Fig. 10's measurements (step 6; 50: ~20 s, 32: ~14 s)
    max_new_tokens: int = 48  # reply budget per turn (all capitals spell letter by letter: 32 cut such replies)
    # lr, epochs and n_dialogs: from the default run's PPO model, on the same 100 held-out dialogues (paired), mean
    # adherence over turns 1-8 after GAtt, 300 dialogues: 2 epochs at 5e-4 71-73%, 3 at 1e-3 76%, 4 at 1e-3 81%, 6 at
    # 1e-3 83%; 600 at 1e-3, 2 epochs, instruction_share 0.3: 83% (86% at turn 1, 80% at turn 8), 6m19s on Zen 3
    # against 3m59s for 300 at 5e-4 (BENCHMARKS.md). Twice the dialogues beat twice the epochs over the same ones.
    lr: float = 1e-3  # fine-tuning peak lr (sft.py's recipe)
    epochs: int = 2  # over full dialogues (step 3; one epoch of them = one epoch of the per-prefix samples)
    per_prefix: bool = False  # the paper's one sample per dialogue prefix (same gradient, ~4.5x the tokens: step 3)
    mix_ratio: float = 1.0  # ordinary dialogues per trained GAtt reply (choice 3; SFT mix at 0.5: 81% -> 75%)
    mix: str = "own"  # what those dialogues are (choice 3): "own" (the model's replies, checked) or "sft" (demos)
    # in-turn instruction dialogues per mix dialogue (choice 3). 600 dialogues at 1e-3, turns 1-8: SFT's 0.3 86-80%
    # (6m40s), 0.6 91-89-92% (8m51s), 1.2 with --mix-ratio 0.5 88-84% (7m29s); win rate vs SFT 68.5 / 68.3 / 69.8%
    # (Zen 3). On the club-notice corpus (Zen 4, seeds 0 / 1 / 2, BENCHMARKS.md): 0.6 100-95 / 91-82 / 94-91%, 0.9
    # 95-100 / 95-96 / 95-98% at every turn, ~1 minute more fine-tuning (1.05M tokens instead of 0.84M)
    instruction_share: float = 0.9
    # > 0: half of those in-turn dialogues drawn toward the instruction kinds the model fails in step 2 (choice 4): a
    # kind is kept with probability (its fallback rate / the highest) ** instruction_focus; 0 = all in the world's mix.
    # Four seeds, lowest turn of Table 30 after GAtt: 8 gave 95 / 86 / 94 / 93%, 0 gives 93 / 91 / 93 / 95%
    instruction_focus: float = 0.0
    world_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    quick: bool = False  # a seconds-long smoke run
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="n_dialogs n_turns n_eval n_attention max_new_tokens lr epochs",
        non_negative="mix_ratio instruction_share instruction_focus world_seed seed")


GOOD_REPLY = 0.75  # the annotator's helpfulness from which a sampled reply counts as good (choices 1 and 3)
# dialogues per generate() call. Decoding a few rows is mostly fixed cost per step, so wide batches pay: measured on the
# default run's PPO model, own_replies' 4,800 short prompts took 23.5 s at 64, 17.3 s at 128, 12.3 s at 256; the
# multi-turn sampling, whose prompts are long, was fastest at 128 (300 dialogues: 21, 19.4, 23.4 s)
TURN_BATCH, SINGLE_BATCH = 128, 256


def with_instruction(instruction: str, question: str) -> str:
    return f"{instruction} {question}"


# ---- 2. sampling with the instruction in every turn ------------------------------------------------------------------
@torch.no_grad()
def sample_dialogs(model, tok, dialogs: list, max_new_tokens: int, annotator) -> tuple[list[list[str]], list[int]]:
    """Replies turn by turn, the instruction attached to every user message. Returns the replies per dialogue and,
    per dialogue, how many of them were replaced by the compliant reference (choice 1)."""
    from generate import chat_replies
    histories = [[] for _ in dialogs]
    replies = [[] for _ in dialogs]
    fallbacks = [0] * len(dialogs)
    # each dialogue's last prompt and its keys/values: a turn computes only what it adds (the reply, the question)
    prefixes = [CachedPrompt() for _ in dialogs]
    n_turns = len(dialogs[0].user_turns)
    ticker = common.Ticker("gatt sampling", n_turns * len(dialogs), unit="replies")
    for t in range(n_turns):
        for h, g in zip(histories, dialogs):
            h.append({"role": "user", "content": with_instruction(g.instruction, g.user_turns[t])})
        out = chat_replies(model, tok, [fit_context(tok, h, model.args.max_seq_len - max_new_tokens, refill=0.5)
                                        for h in histories], max_new_tokens, batch_size=TURN_BATCH, prefixes=prefixes)
        for i, (h, g, r, rs) in enumerate(zip(histories, dialogs, out, replies)):
            good = g.check(r) and annotator.score(h, r).helpfulness >= GOOD_REPLY
            if not good:
                r, fallbacks[i] = g.compliant_replies()[t], fallbacks[i] + 1
            rs.append(r)
            h.append({"role": "assistant", "content": r})
        ticker.tick((t + 1) * len(dialogs))
    return replies, fallbacks


def instruction_kind(constraints) -> str:
    """What an instruction asks, by rule: "hobby+upper" for capitals and a hobby, whatever the hobby."""
    return "+".join(sorted(c.rule for c in constraints))


def failure_rates(dialogs: list, fallbacks: list[int]) -> dict[str, float]:
    """Share of the sampled replies replaced by the reference, per instruction kind: where the model's in-turn
    instruction following fails (the default run's PPO model: hobby+upper 97%, prefix+upper 98%, suffix 22%)."""
    counts = {}
    for g, f in zip(dialogs, fallbacks):
        failed, total = counts.get(instruction_kind(g.constraints), (0, 0))
        counts[instruction_kind(g.constraints)] = (failed + f, total + len(g.user_turns))
    return {k: failed / total for k, (failed, total) in sorted(counts.items())}


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
    """Choice 4: keep(g) for World.instruction_dialogs, the probability of keeping an in-turn instruction dialogue
    of g's kind, (fallback rate of the kind / the highest rate) ** focus. Kinds step 2 did not sample count as the
    highest. None (keep all: the world's mix) for focus 0, the default. One run's rates with focus 8: capitals + a
    hobby (96%) kept at 0.85, capitals + a figure (98%) at 1, a hobby alone (49%) at 0.004."""
    top = max(rates.values(), default=0.0)
    if focus == 0 or top == 0:
        return None
    return lambda g: (rates.get(instruction_kind(g.constraints), top) / top) ** focus


@torch.no_grad()
def own_replies(model, tok, world, annotator, n: int, max_new_tokens: int, seed: int,
                instruction_share: float, keep=None) -> list[list[dict]]:
    """Choice 3's default mix: the model's own greedy replies to n ordinary train prompts, kept where the annotator
    finds them helpful (GOOD_REPLY) and safe (any safe reply to a harmful prompt: a refusal); earlier turns of
    multi-turn prompts are context (weight 0). Returns the kept dialogues plus instruction_share * n in-turn
    instruction dialogues, half of them drawn with `keep` when it is given (choice 4, focus_on_failures)."""
    from generate import chat_replies
    tasks = world.tasks("train", n, seed=seed)
    budget = model.args.max_seq_len - max_new_tokens
    tasks = [t for t in tasks if len(tok.encode_dialog(t.messages)[0]) <= budget]
    out = []
    for t, r in zip(tasks, chat_replies(model, tok, [t.messages for t in tasks], max_new_tokens,
                                        batch_size=SINGLE_BATCH, progress="gatt own replies")):
        score = annotator.score(t.messages, r)
        # a refusal of a harmful request is the right reply, though raters give it moderate helpfulness (data.py)
        if score.safe and (score.helpfulness >= GOOD_REPLY or t.kind == "harmful"):
            context = [m if m["role"] != "assistant" else {**m, "weight": 0} for m in t.messages]
            out.append(context + [{"role": "assistant", "content": r}])
    n_instr = round(instruction_share * n)
    if keep is None:
        return out + world.instruction_dialogs("train", n_instr, seed=seed)
    # half in the world's mix of kinds (every skill stays in the data), half drawn toward the failed kinds (choice 4)
    return (out + world.instruction_dialogs("train", n_instr - n_instr // 2, seed=seed)
            + world.instruction_dialogs("train", n_instr // 2, seed=seed + 1000, keep=keep))


# ---- 3. the training samples: instruction in the first turn only, loss on the last reply only ------------------------
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


# ---- 5. Table 30: does the instruction hold at turn t when only turn 1 carries it? ------------------------------------
@torch.no_grad()
def adherence_by_turn(model, tok, dialogs: list, max_new_tokens: int,
                      histories_out: Optional[list] = None) -> list[float]:
    """Share of replies that keep the instruction at each turn. The instruction is in the first user message only;
    the history is the model's own replies. A dialogue that outgrows the context counts as not adhering.
    histories_out: a list to receive each dialogue's messages (None for one that outgrew the context): Fig. 10."""
    from generate import chat_replies
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


# ---- 6. Fig. 10: how much each reply looks at the instruction ---------------------------------------------------------
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
    from generate import chat_replies
    done = [(g, h) for g, h in zip(dialogs, histories) if h is not None]
    turns = range(1, len(dialogs[0].user_turns))
    prompts = [[{**m, "content": g.user_turns[0]} if j == 0 and not instruction else m
                for j, m in enumerate(h[:2 * t + 1])] for t in turns for g, h in done]
    out = chat_replies(model, tok, prompts, max_new_tokens, batch_size=TURN_BATCH)  # every turn in one call
    kept = [g.check(r) for (g, _), r in zip(done * len(turns), out)]
    n = len(done)
    return [sum(kept[i * n:(i + 1) * n]) / max(1, n) for i in range(len(turns))]


def main(cfg: GattConfig):
    import sft
    if cfg.mix not in ("own", "sft"):
        common.die(f"--mix: expected 'own' or 'sft', got {cfg.mix!r}")
    if cfg.quick:
        cfg.n_dialogs, cfg.n_eval, cfg.n_turns, cfg.n_attention = 12, 8, 4, 4
    t0 = time.perf_counter()
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model, tok = G.load_model_and_tokenizer(cfg.init_from, device)
    except (CheckpointError, OSError, ValueError) as e:
        common.die(f"--init-from: {e}")
    world = World(seed=cfg.world_seed)
    annotator = Annotator(world, seed=cfg.seed)

    # 1-2. dialogues with instructions; replies sampled with the instruction in every turn
    train = world.gatt_dialogs("train", cfg.n_dialogs, cfg.n_turns, seed=cfg.seed)
    replies, fallbacks = sample_dialogs(model, tok, train, cfg.max_new_tokens, annotator)
    fallback = sum(fallbacks) / max(1, len(train) * cfg.n_turns)
    rates = failure_rates(train, fallbacks)
    print(f"[gatt] sampled {len(train)} dialogues x {cfg.n_turns} turns; {fallback:.1%} of replies replaced by the "
          f"compliant reference; by instruction kind: " + ", ".join(f"{k} {100 * r:.0f}%" for k, r in rates.items()),
          flush=True)
    # 3. training samples (instruction only in turn 1), mixed 1:1 with ordinary dialogues by trained replies (choice 3)
    samples = [s for g, r in zip(train, replies) for s in training_samples(g, r, cfg.per_prefix)]
    n_mix = round(cfg.mix_ratio * sum(len(r) for r in replies))
    if cfg.mix == "own":
        mix = own_replies(model, tok, world, annotator, n_mix, cfg.max_new_tokens, seed=cfg.seed + 1,
                          instruction_share=cfg.instruction_share,
                          keep=focus_on_failures(rates, cfg.instruction_focus))
        print(f"[gatt] mix: {len(mix):,} dialogues (the model's own checked replies and instruction dialogues)",
              flush=True)
    else:
        mix = world.sft_dialogs("train", n_mix, seed=cfg.seed + 1)
    rows = samples + mix
    Random(f"gatt/{cfg.seed}").shuffle(rows)
    data_path = out / "gatt_train.jsonl"
    write_dialogs_jsonl(data_path, rows)

    # 5a. Table 30 before GAtt
    seen = world.gatt_dialogs("val", cfg.n_eval, cfg.n_turns, seed=cfg.seed)
    unseen = [g for g in world.gatt_dialogs("test", 2 * cfg.n_eval, cfg.n_turns, seed=cfg.seed)
              if any(c.held_out for c in g.constraints)][:cfg.n_eval]
    before = {"seen": adherence_by_turn(model, tok, seen, cfg.max_new_tokens),
              "unseen": adherence_by_turn(model, tok, unseen, cfg.max_new_tokens)}
    print("[gatt] before: " + _fmt_turns(before["seen"]), flush=True)
    del model

    # 4. fine-tune with sft.py's recipe
    sft_cfg = sft.SFTConfig(init_from=cfg.init_from, out_dir=str(out), data=str(data_path), seq_len=512,
                            lr=cfg.lr, epochs=cfg.epochs, eval_n=100 if not cfg.quick else 8, device=cfg.device,
                            dtype=cfg.dtype, seed=cfg.seed, val_frac=0.02)
    sft.main(sft_cfg)
    common.write_metrics(out, {"complete": False})  # sft.main marked its part done; GAtt is done after 5b
    tuned, _ = G.load_model_and_tokenizer(out, device)

    # 5b. Table 30 after GAtt
    histories: list = []
    after = {"seen": adherence_by_turn(tuned, tok, seen, cfg.max_new_tokens, histories_out=histories),
             "unseen": adherence_by_turn(tuned, tok, unseen, cfg.max_new_tokens)}
    print("[gatt] after:  " + _fmt_turns(after["seen"]), flush=True)
    print("[gatt] unseen constraints, before: " + _fmt_turns(before["unseen"]) + "\n[gatt] unseen constraints, after:  "
          + _fmt_turns(after["unseen"]), flush=True)
    # 6. Fig. 10: the same dialogues (the GAtt model's own) read by the model before GAtt and after; and what each
    # model keeps of the instruction when it is taken out of turn 1 of that history
    fig = slice(0, cfg.n_attention)
    base, _ = G.load_model_and_tokenizer(cfg.init_from, device)
    attention, on_history = {}, {}
    for who, m in (("baseline", base), ("gatt", tuned)):
        attention[who] = attention_to_instruction(m, tok, seen[fig], histories[fig])
        on_history[who] = {f"{k}_instruction": adherence_on_history(m, tok, seen[fig], histories[fig],
                                                                     cfg.max_new_tokens, instruction=k == "with")
                           for k in ("with", "without")}
        print(f"[gatt] {who}, attention on the instruction: " + _fmt_turns(attention[who]["mean"], 1)
              + f"; kept on that history, turns 2-{cfg.n_turns}, with / without it: "
              + " ".join(f"{100 * a:.0f}/{100 * b:.0f}%" for a, b in zip(*on_history[who].values())), flush=True)
    del base, tuned
    common.write_metrics(out, {
        "adherence_by_turn": {"baseline": before["seen"], "gatt": after["seen"]},
        "attention_to_instruction": attention, "adherence_on_gatt_history": on_history,
        "adherence_by_turn_unseen": {"baseline": before["unseen"], "gatt": after["unseen"]},
        "n_train_dialogs": len(train), "n_train_samples": len(samples), "fallback_rate": fallback,
        "fallback_rate_by_kind": rates, "mix": cfg.mix, "instruction_focus": cfg.instruction_focus,
        "n_mix": len(mix),
        "n_eval_seen": len(seen), "n_eval_unseen": len(unseen), "gatt_seconds": time.perf_counter() - t0,
        "complete": True})
    print(f"[gatt] done in {common.fmt_time(time.perf_counter() - t0)}; wrote {out}", flush=True)


def _fmt_turns(rates: list[float], digits: int = 0) -> str:
    return " ".join(f"t{t + 1} {100 * r:.{digits}f}%" for t, r in enumerate(rates))


if __name__ == "__main__":
    main(common.parse_config(GattConfig, description=__doc__))
