"""Reward models (paper §3.2.2): a helpfulness RM and a safety RM, trained on binary preference pairs (§3.2.1).

  python reward.py --axis helpfulness --out-dir out/rm_helpful     # collects out/prefs, trains: CPU, minutes
  python reward.py --axis safety --out-dir out/rm_safety           # reuses out/prefs
  python reward.py --axis helpfulness --margin-ablation            # + Table 28: none / small / large margin
  python reward.py --axis helpfulness --quick --out-dir /tmp/rm    # a smoke run in seconds
  python reward.py --axis safety --sample-from out/rlhf_v1 out/sft --prefs-dir out/prefs/batch_2 \
      --earlier-prefs out/prefs/batch_1 --previous-rm out/rm_safety_v1 --out-dir out/rm_safety_v2   # round 2 (§3.2.3)
  python reward.py --axis safety --data my_prefs.jsonl --test-data my_test.jsonl --init-from /path/to/llama-2-7b-chat
  torchrun --nproc_per_node=8 reward.py --axis safety --init-from /path/to/llama-2-7b-chat --device cuda --fsdp

An RM is the chat model with a scalar head `score` (C x 1) in place of its next-token head, nothing else; the reward of
a reply is the head's number at the reply's last token (rlhf.py). Steps: 1. a batch of preference pairs, two samples
of chat-model variants per prompt rated by the world's annotator (§3.2.1), cached in --prefs-dir for both axes (or
--data); 2. this axis's mixture of every batch so far (§3.2.2); 3. one epoch of the margin ranking loss
-log sigmoid(r_chosen - r_rejected - m(rating)) (eq. 2, Table 27); 4. the zero point; 5. accuracy on both test sets
(Table 7), by rating (Table 8), the last round's RM on this batch (the distribution shift) and with --margin-ablation
each margin (Table 28). Writes params.json (head "scalar"), consolidated.00.pth, tokenizer.model, metrics.json.

Choices where the paper is silent (or that differ from it):
  1. The reward is read at the reply's last token: the EOS of a finished turn "<s>[INST] prompt [/INST] reply </s>".
     A truncated sample (no EOS) is read at its last token, a state the RM never saw in training.
  2. Pairs (§3.2.1): per prompt, one sample of the latest chat model (the first --sample-from) at one of the two
     --temperatures, and one of a model drawn from --sample-from at the other: "two model variants, different
     temperatures". Two identical samples are not a comparison and are skipped (counted). Safety pairs whose chosen
     reply is unsafe and the other one safe are dropped (§3.2.1). Table 26 in miniature goes to info.json.
  3. Mixtures (§3.2.2): safety RM = all safety pairs + helpfulness pairs as 10% of the mix. Helpfulness RM = all
     helpfulness pairs + the safety part of the paper's "equal part" (we have no open-source data): 1/3 as many
     safety pairs, Table 6's share of safety if half of Meta's own comparisons are safety.
  4. One epoch, AdamW, cosine to 10%, warmup 3% of the steps (at least 5), as the paper. Batch 32 pairs, not 512 (we
     have a few thousand pairs); peak lr 1e-4, 10x the paper's, as pretrain.py scales its lr.
  5. The new head starts at std 1/sqrt(dim), so rewards start at unit scale, as a 7B's head at std 0.02 does.
  6. Test pairs: the same collection on held-out prompts, labelled by the same noisy annotator (--rater-noise 0.15),
     so no RM reaches 100% on close pairs, as with the paper's human labels.
  7. No mid-run checkpoints: an RM trains in seconds to a minute here.
  8. Zero points (calibrate): the loss fixes only differences of scores, in the same units for both RMs (log-odds of
     a preference, Bradley-Terry), but §3.2.3's switch compares R_s with 0.15 and hands the reward to R_h or R_s: it
     presumes levels. The switch reads R_s < 0.15 on helpfulness prompts only, so both RMs get the same rule there:
     the offset that puts sigmoid(score) = 0.15 at the 5th percentile of their scores of the safe training replies
     to helpfulness prompts (params.json's score_offset). R_s < 0.15 then flags ~5% of safe helpful replies, and a
     flagged reply's reward lies below 95% of what R_h gives them: the two scales meet where they switch.
  9. Iterations (§3.2.1, §3.2.3): --prefs-dir holds this round's batch; --earlier-prefs adds the earlier batches'
     pairs; every round's RM starts from --init-from (SFT) again. --previous-rm scores this batch's test pairs with
     the last round's RM: "reward model accuracy can quickly degrade if not exposed to this new sample distribution".
 10. Table 28's RMs are compared pair by pair on the same pairs (paired_difference), far finer than two accuracies.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import common
from annotator import Annotator, DROPPED_SAFETY_LABEL, PREFERENCE_NOISE, RATINGS, SAFETY_LABELS
from data import DataError, read_preferences_jsonl
from world import World
from rlhf import common_prefix_len, encode_reply, load_reward_model, score, shared_rewards
from model import CheckpointError, Transformer, atomic_write, find_tokenizer, load_checkpoint, save_checkpoint

AXES = ("helpfulness", "safety")
HELPFUL_KINDS = ("fact", "arith", "story", "multiturn")
SAFETY_KINDS = ("harmful", "borderline")
HELPFUL_SAFETY_SHARE = 1 / 3  # the helpfulness RM's safety pairs per helpfulness pair (choice 3)
# Table 27: margin m(r) per rating, in the order of RATINGS (significantly better ... negligibly better / unsure)
MARGINS = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}


@dataclass
class RewardConfig:
    axis: str = "helpfulness"  # helpfulness | safety (§3.2.2: two separate reward models)
    margin: str = "small"  # none | small | large: Table 27's margin m(r) in the loss
    init_from: str = "out/sft"  # the chat model the RM starts from (§3.2.2)
    sample_from: list[str] = field(default_factory=list)  # chat models whose samples are paired, latest first
    # (choice 2; default: --init-from)
    earlier_prefs: list[str] = field(default_factory=list)  # earlier rounds' batch dirs: their pairs join (choice 9)
    previous_rm: Optional[str] = None  # the last round's RM of this axis, scored on this batch's test pairs (choice 9)
    out_dir: Optional[str] = None  # default: out/rm_helpful or out/rm_safety
    data: Optional[str] = None  # preference JSONL {prompt, chosen, rejected, rating, category}; None = the world
    test_data: Optional[str] = None  # test pairs for --data (default: 10% of --data held out)
    batch_size: int = 32  # pairs per optimizer step, all processes together (§3.2.2: 512)
    lr: float = 1e-4  # peak lr (§3.2.2: 1e-5; 10x, as pretrain.py scales)
    epochs: int = 1  # §3.2.2: one epoch (training longer over-fits)
    margin_ablation: bool = False  # also train the other margins on the same data (Table 28)
    quick: bool = False  # a seconds-long smoke run: 60 + 80 train and 30 + 30 test prompts, replies of <= 32 tokens
    device: str = "auto"  # auto, cpu, cuda, mps
    # -- advanced --
    prefs_dir: Optional[str] = None  # cache of the collected pairs, shared by both axes; default: prefs/ beside out-dir
    world_seed: int = 0  # seed of the built-in world
    train_prompts: int = 1000  # world train prompts of the helpful kinds (fact, arith, story, multiturn); a pair each
    safety_prompts: int = 1000  # world train prompts of the safety kinds (harmful, borderline)
    test_prompts: int = 200  # world test prompts per category
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.2])  # §3.2.1: two samples, two temperatures
    max_new_tokens: int = 64  # length limit of the sampled replies
    helpful_safety_share: float = HELPFUL_SAFETY_SHARE  # the helpfulness RM's safety pairs per helpfulness pair
    rater_noise: float = PREFERENCE_NOISE  # the annotator's noise when it labels the world's pairs (choice 6)
    safety_threshold: float = 0.15  # §3.2.3: R_s below it marks a reply unsafe; both RMs are calibrated to it
    max_train_pairs: int = 0  # use at most this many pairs of the mixture (0 = all): for quick runs
    warmup_frac: float = 0.03  # §3.2.2: warmup over 3% of the steps...
    min_warmup: int = 5  # ...but at least 5 steps
    final_lr_ratio: float = 0.1  # §3.2.2: cosine down to 10% of the peak
    weight_decay: float = 0.1  # as pretraining (§2.2)
    grad_clip: float = 1.0  # as pretraining (§2.2)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model (shapes vary per batch: mostly useful on GPUs)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    seed: int = 0
    log_interval: int = 25
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="train_prompts safety_prompts test_prompts max_new_tokens batch_size lr epochs grad_clip log_interval",
        non_negative="world_seed temperatures helpful_safety_share rater_noise max_train_pairs min_warmup weight_decay "
                     "seed",
        share="warmup_frac final_lr_ratio", open_share="safety_threshold")


# ---- 1. the loss (§3.2.2 eq. 2) --------------------------------------------------------------------------------------
def margins_for(ratings: Sequence[str], margin: str) -> torch.Tensor:
    """m(r) for each pair's rating (Table 27), (N,) fp32."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {margin!r}")
    return torch.tensor([MARGINS[margin][RATINGS.index(r)] for r in ratings], dtype=torch.float32)


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """L = -log(sigmoid(r_chosen - r_rejected - m(r))), mean over pairs; all (N,). The margin asks distinct pairs
    (large m) to be separated by more than close ones before the loss lets go of them. logsigmoid is the stable form
    of log(sigmoid(x)): no overflow for very negative x."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# ---- 2. the reward model and where the reward is read ----------------------------------------------------------------
def reward_model_from(chat_model: Transformer, seed: int = 0) -> Transformer:
    """A scalar-head copy of a chat model (§3.2.2): every weight but the next-token head, and a new `score` head with
    small random weights, std 1/sqrt(dim) (choice 5). From another RM: a copy, its head included."""
    if chat_model.args.head == "scalar":
        rm = Transformer(chat_model.args)
        rm.load_state_dict(chat_model.state_dict())
        return rm.to(next(chat_model.parameters()).device)
    rm = Transformer(replace(chat_model.args, head="scalar"))
    trunk = {k: v for k, v in chat_model.state_dict().items() if not k.startswith("output.")}
    missing, unexpected = rm.load_state_dict(trunk, strict=False)
    assert not unexpected and set(missing) == {"score.weight"}, (missing, unexpected)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # (1, C): rewards start at unit scale, as a 7B's head at std 0.02 does (0.02 * sqrt(4096))
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=g) * rm.args.dim ** -0.5)
    return rm.to(next(chat_model.parameters()).device)


# ---- 3. the mixture (§3.2.2) -----------------------------------------------------------------------------------------
def mixture(pairs: list, axis: str, rng: random.Random, safety_share: float = HELPFUL_SAFETY_SHARE) -> list:
    """Helpfulness RM: all helpfulness pairs + safety_share times as many safety pairs (the safety part of §3.2.2's
    equal share; choice 3). Safety RM: all safety + helpfulness as 10% of the mix. Shuffled (one epoch, this order)."""
    helpful = [p for p in pairs if p.category == "helpfulness"]
    safety = [p for p in pairs if p.category == "safety"]
    if axis == "helpfulness":
        mix = helpful + rng.sample(safety, min(len(safety), round(safety_share * len(helpful))))
    else:
        mix = safety + rng.sample(helpful, min(len(helpful), round(len(safety) / 9)))
    rng.shuffle(mix)
    return mix


def train_mixture(cfg, train_pairs: list) -> list:
    """Step 2: this axis's mixture of the pairs (§3.2.2), cut to --max-train-pairs: the same list in every process."""
    mix = mixture(train_pairs, cfg.axis, random.Random(f"mixture/{cfg.seed}/{cfg.axis}"), cfg.helpful_safety_share)
    return mix[:cfg.max_train_pairs] if cfg.max_train_pairs else mix


# ---- 4. training -----------------------------------------------------------------------------------------------------
def length_batches(lengths: list[int], batch_size: int, rng: random.Random, window: int = 32) -> list[list[int]]:
    """One epoch of batches of pair indices. The pairs are shuffled, then within each window of `window` batches
    sorted by length, cut into batches, and the batches shuffled: each batch holds pairs of similar length (little
    padding) while the epoch order stays random. A remainder smaller than one batch is left out."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for w in range(0, len(order), window * batch_size):
        chunk = sorted(order[w:w + window * batch_size], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def pair_rewards(model, chosen: list[list[int]], rejected: list[list[int]], max_len: int, device):
    """Rewards (b,), (b,) of each pair's chosen and rejected rows, with gradients. Speed-up: a pair's two rows packed
    in one over their shared prompt (rlhf.shared_rewards); each row alone (rlhf.rewards_of_rows, the plain path)
    gives the same rewards, to float rounding (tests/test_reward.py)."""
    pairs_of = [[j, j + len(chosen)] for j in range(len(chosen))]  # chosen j and rejected j share a prompt
    r = shared_rewards(model, chosen + rejected, pairs_of, max_len, device)  # (2b,)
    return r[:len(chosen)], r[len(chosen):]


def train(init: Transformer, pairs: list, tok, cfg, dist, dtype, tag: str = "reward"):
    """cfg.epochs (§3.2.2: one) of the ranking loss with cfg.margin on `pairs`. Returns (reward model, loss curve); the
    model is whole on every rank (under FSDP a consolidated copy), so that rank 0 alone can save and evaluate it."""
    device = dist.device
    rm = reward_model_from(init, seed=cfg.seed).to(device)
    net = common.wrap_model(rm, dist, cfg.fsdp, cfg.compile, param_dtype=dtype if device.type == "cuda" else None)
    opt = common.make_optimizer(net, cfg.lr, cfg.weight_decay)
    max_len = rm.args.max_seq_len
    chosen = [encode_reply(tok, p.messages, p.chosen, max_len) for p in pairs]
    rejected = [encode_reply(tok, p.messages, p.rejected, max_len) for p in pairs]
    m_all = margins_for([p.rating for p in pairs], cfg.margin)  # (N,)
    rng = random.Random(f"batches/{cfg.seed}")  # the same batches on every process and for every margin
    pair_len = [max(len(c), len(r)) for c, r in zip(chosen, rejected)]
    batches = [b for _ in range(cfg.epochs) for b in length_batches(pair_len, cfg.batch_size, rng)]
    steps = len(batches)
    warmup = max(cfg.min_warmup, math.ceil(cfg.warmup_frac * steps))  # §3.2.2: 3% of the steps, at least 5
    # tokens a pair costs packed over its prompt (shared_rewards), for the progress line's tokens/s and MFU
    pair_tokens = [len(c) + len(r) - common_prefix_len([c, r]) for c, r in zip(chosen, rejected)]
    tokens_per_step = sum(pair_tokens) // max(1, len(pairs)) * cfg.batch_size  # unpadded, roughly
    prog = common.Progress(tag, steps, tokens_per_step, rm.flops_per_token(sum(pair_tokens) // max(1, len(pairs))),
                           device, dtype, enabled=dist.is_main)
    curve = []
    net.train()
    for step, batch in enumerate(batches):
        lr = common.lr_at(step, steps, cfg.lr, warmup, cfg.final_lr_ratio)
        common.set_lr(opt, lr)
        idx = batch[dist.rank::dist.world_size]  # this process's share of the global batch
        with common.autocast(device, dtype):
            r_chosen, r_rejected = pair_rewards(net, [chosen[i] for i in idx], [rejected[i] for i in idx], max_len,
                                                device)  # (b,), (b,)
        loss = ranking_loss(r_chosen, r_rejected, m_all[idx].to(device))  # §3.2.2 eq. 2
        loss.backward()
        common.optimizer_step(opt, None, net, cfg.grad_clip)
        loss_g = common.all_reduce_mean(loss.item(), dist)
        acc_g = common.all_reduce_mean((r_chosen > r_rejected).float().mean().item(), dist)
        curve.append([step + 1, round(loss_g, 5), round(acc_g, 4)])
        if (step + 1) % cfg.log_interval == 0 or step == 0 or step + 1 == steps:
            prog.log(step + 1, loss=loss_g, acc=acc_g, lr=lr)
    return common.consolidated_copy(rm).eval(), curve  # FSDP: all ranks gather the shards (collective); else rm


# ---- 5. evaluation (Tables 7, 8) -------------------------------------------------------------------------------------
def accuracy(rm: Transformer, tok, pairs: list) -> dict:
    """Share of pairs where the RM scores the chosen reply higher (a tie counts half), overall, by rating, by the
    sources of the two replies and by the prompt's task kind."""
    if not pairs:
        return {"accuracy": None, "n": 0, "by_rating": {}, "n_by_rating": {}, "by_source": {}, "by_kind": {},
                "right": []}
    msgs = [p.messages for p in pairs]
    r = score(rm, tok, msgs + msgs, [p.chosen for p in pairs] + [p.rejected for p in pairs])  # pairs share prompts
    r_c, r_r = r[:len(pairs)], r[len(pairs):]
    right = ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).tolist()  # (N,): 1 right, 0.5 a tie, 0 wrong
    return {"accuracy": round(sum(right) / len(right), 4), "n": len(pairs), **accuracy_by_rating(pairs, right),
            "by_source": accuracy_by_source(pairs, right), "by_kind": accuracy_by_kind(pairs, right), "right": right}


def accuracy_by_rating(pairs: list, right: list[float]) -> dict:
    """Table 8: {"by_rating": rating -> accuracy (None where no pair has it), "n_by_rating": rating -> pairs}."""
    by = {r: [ok for p, ok in zip(pairs, right) if p.rating == r] for r in RATINGS}
    return {"by_rating": {r: round(sum(x) / len(x), 4) if x else None for r, x in by.items()},
            "n_by_rating": {r: len(x) for r, x in by.items()}}


def paired_difference(pairs: list, right_a: list[float], right_b: list[float]) -> dict:
    """Two RMs judged on the same pairs (Table 28's margins), compared pair by pair (choice 10): rating -> {"diff": B's
    accuracy minus A's, "se": its paired standard error (the standard deviation of the per-pair differences over
    sqrt(n)), "n", "b_only" / "a_only": pairs that only B / only A ranks right}. Two RMs from the same start agree on
    most pairs, so their difference is far better measured than either accuracy."""
    out = {}
    for r in RATINGS:
        d = [b - a for p, a, b in zip(pairs, right_a, right_b) if p.rating == r]
        n = len(d)
        if not n:
            out[r] = {"diff": None, "se": None, "n": 0, "b_only": 0, "a_only": 0}
            continue
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        out[r] = {"diff": round(mean, 4), "se": round(math.sqrt(var / n), 4), "n": n,
                  "b_only": sum(x > 0 for x in d), "a_only": sum(x < 0 for x in d)}
    return out


def accuracy_by_source(pairs: list, right: list[float], min_n: int = 5) -> dict:
    """Accuracy by which model variant wrote the chosen and the rejected reply (choice 2: "sft_T0.7", "rlhf_v1_T1.2",
    ...), "chosen>rejected" -> {"accuracy", "n"}, for groups of at least min_n pairs: does the RM judge a newer model
    against an older one as well as two samples of one model? Pairs without sources (user data) are left out."""
    groups: dict[str, list[float]] = {}
    for p, ok in zip(pairs, right):
        if p.sources:
            groups.setdefault(f"{p.sources[0]}>{p.sources[1]}", []).append(ok)
    return {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])) if len(v) >= min_n}


def accuracy_by_kind(pairs: list, right: list[float], min_n: int = 5) -> dict:
    """Table 8 within each task kind of the prompt: kind -> {"accuracy", "n", "by_rating", "n_by_rating"}, for kinds
    with at least min_n pairs, the largest first: a level's accuracy also depends on which kinds of question fill it.
    Pairs without a kind (user data) are left out."""
    groups: dict[str, tuple[list, list[float]]] = {}
    for p, ok in zip(pairs, right):
        if p.kind:
            ps, oks = groups.setdefault(p.kind, ([], []))
            ps.append(p)
            oks.append(ok)
    return {kind: {"accuracy": round(sum(oks) / len(oks), 4), "n": len(oks), **accuracy_by_rating(ps, oks)}
            for kind, (ps, oks) in sorted(groups.items(), key=lambda kv: -len(kv[1][1])) if len(oks) >= min_n}


def evaluate(rm, tok, test: list) -> dict:
    return {axis: accuracy(rm, tok, [p for p in test if p.category == axis]) for axis in AXES}


def _print_eval(tag: str, ev: dict):
    for axis in AXES:
        e = ev[axis]
        if e["accuracy"] is None:
            continue
        levels = " / ".join("-" if e["by_rating"][r] is None else f"{100 * e['by_rating'][r]:.1f}"
                            for r in RATINGS)
        print(f"[{tag}] {axis} test: {100 * e['accuracy']:.1f}% of {e['n']} pairs; by rating (significantly better / "
              f"better / slightly better / negligible): {levels}", flush=True)


# ---- 6. the zero point (choice 8) -----------------------------------------------------------------------------------
def reply_safety_labels(pairs: list) -> tuple[list, list, list[bool], list[bool]]:
    """Every reply of the pairs with the rater's verdict on it: (dialogs, replies, is_safe, to a helpfulness prompt).
    A safety pair's label says which of its replies are safe (§3.2.1); in this world every reply to a helpfulness
    prompt is safe."""
    dialogs, replies, safe, helpful = [], [], [], []
    for p in pairs:
        lab = p.safety_label if p.category == "safety" else SAFETY_LABELS[1]
        chosen_safe, rejected_safe = {SAFETY_LABELS[0]: (True, False), SAFETY_LABELS[1]: (True, True),
                                      SAFETY_LABELS[2]: (False, False)}.get(lab, (None, None))
        for reply, ok in ((p.chosen, chosen_safe), (p.rejected, rejected_safe)):
            if ok is not None:
                dialogs.append(p.messages)
                replies.append(reply)
                safe.append(ok)
                helpful.append(p.category == "helpfulness")
    return dialogs, replies, safe, helpful


@torch.no_grad()
def calibrate(rm: Transformer, tok, pairs: list, threshold: float = 0.15, false_alarms: float = 0.05) -> dict:
    """Choice 8: an RM's zero point, the same rule for both RMs. §3.2.3's switch consults R_s < 0.15 only on
    helpfulness prompts (a safety prompt's reward is R_s whatever it is), so the level is set there: with t the raw
    score below which only `false_alarms` (5%) of the safe replies to the training mix's helpfulness prompts fall,
    logit(0.15) - t is added to every score (model.args.score_offset): sigmoid(score) < 0.15 exactly below t. The
    other figures: how many unsafe replies (those of the safety pairs) and safe replies to safety prompts fall below."""
    dialogs, replies, safe, helpful = reply_safety_labels(pairs)
    rm.args.score_offset = 0.0
    raw = score(rm, tok, dialogs, replies)  # (N,) raw scores, no offset
    is_safe, on_helpful = torch.tensor(safe, dtype=torch.bool), torch.tensor(helpful, dtype=torch.bool)
    ref = is_safe & on_helpful
    if not ref.any():
        return {"offset": 0.0, "unsafe_flagged": float("nan"), "safe_flagged": float("nan"), "n": len(safe)}
    t = torch.quantile(raw[ref], false_alarms).item()
    offset = math.log(threshold / (1 - threshold)) - t
    rm.args.score_offset = offset
    flagged = raw < t
    share = lambda mask: flagged[mask].float().mean().item() if mask.any() else float("nan")  # noqa: E731
    return {"offset": offset, "raw_threshold": t, "n": int(ref.sum()), "n_unsafe": int((~is_safe).sum()),
            "safe_flagged": share(ref), "unsafe_flagged": share(~is_safe),
            "safe_flagged_on_safety_prompts": share(is_safe & ~on_helpful)}


# ---- 7. preference data (§3.2.1) -------------------------------------------------------------------------------------
def variant_pairs(n_models: int, temperatures: list[float], n: int, rng: random.Random) -> list[tuple]:
    """Choice 2, which two variants answer each of n prompts: ((model, T), (model, T)) with model an index into
    --sample-from. The first is the latest model (0) at one of the two temperatures, the second a model drawn from
    all of them at the other temperature."""
    out = []
    for _ in range(n):
        ta, tb = rng.sample(list(temperatures), 2)
        out.append(((0, ta), (rng.randrange(n_models), tb)))
    return out


def sample_variants(models: list, tok, tasks: list, plan: list[tuple], max_new_tokens: int, seed: int) -> list:
    """Each task's two replies [(a, b), ...] following plan (variant_pairs): the tasks each variant answers are
    sampled together, in one batched call per (model, temperature)."""
    from generate import chat_replies
    replies: list[list] = [[None, None] for _ in tasks]
    variants = sorted({v for pair in plan for v in pair})
    for j, (m, temp) in enumerate(variants):
        who = [(i, side) for i, pair in enumerate(plan) for side in (0, 1) if pair[side] == (m, temp)]
        texts = chat_replies(models[m], tok, [tasks[i].messages for i, _ in who], max_new_tokens, temperature=temp,
                             top_p=0.9, seed=seed * 1000 + j, progress=f"reward sampling model {m} T={temp:g}")
        for (i, side), text in zip(who, texts):
            replies[i][side] = text
    return replies


def table_26(tok, records: list[dict]) -> dict:
    """Table 26 in miniature for one batch: comparisons, mean turns per dialogue (user turns of the prompt), and
    mean tokens per example, per prompt and per response (the two replies' mean)."""
    n = len(records)
    if not n:
        return {"comparisons": 0}
    prompt_tok = [len(tok.encode_dialog(r["prompt"])[0]) for r in records]
    def reply_tokens(text: str) -> int:  # a reply and its EOS
        return len(tok.encode(text, bos=False, eos=True))
    reply_tok = [(reply_tokens(r["chosen"]) + reply_tokens(r["rejected"])) / 2 for r in records]
    return {"comparisons": n,
            "turns": round(sum(sum(m["role"] == "user" for m in r["prompt"]) for r in records) / n, 2),
            "tokens_per_example": round((sum(prompt_tok) + sum(reply_tok)) / n, 1),
            "tokens_per_prompt": round(sum(prompt_tok) / n, 1), "tokens_per_response": round(sum(reply_tok) / n, 1)}


def collect_preferences(models: list, names: list[str], tok, annotator: Annotator, tasks: list, cfg: RewardConfig,
                        seed: int) -> tuple[list[dict], dict]:
    """One rated pair per prompt (choice 2) as JSONL-ready records, and counts of what was skipped or dropped. models:
    the chat models of --sample-from (latest first), names: their labels for each record's "sources"."""
    n_all = len(tasks)  # a prompt must leave room for a reply in the context: longer ones are skipped (and counted)
    tasks = [t for t in tasks if len(tok.encode_dialog(t.messages)[0]) + 8 <= models[0].args.max_seq_len]
    rng = random.Random(f"prefs/{seed}")
    plan = variant_pairs(len(models), cfg.temperatures, len(tasks), rng)
    replies = sample_variants(models, tok, tasks, plan, cfg.max_new_tokens, seed)
    records, stats = [], {"dropped_chosen_unsafe": 0, "skipped_long_prompts": n_all - len(tasks),
                          "identical_samples": 0}
    for task, pair, (a, b) in zip(tasks, plan, replies):
        if a == b:  # a confident model often says the same thing twice: nothing to compare
            stats["identical_samples"] += 1
            continue
        la, lb = (f"{names[m]}_T{t:g}" for m, t in pair)
        if rng.random() < 0.5:  # who is shown first must not matter
            (la, a), (lb, b) = (lb, b), (la, a)
        axis = "safety" if task.is_safety else "helpfulness"
        p = annotator.preference(task.messages, a, b, axis, rng)
        if axis == "safety" and p.safety_label == DROPPED_SAFETY_LABEL:  # §3.2.1: left out
            stats["dropped_chosen_unsafe"] += 1
            continue
        chosen_src, rejected_src = (la, lb) if p.chosen is a else (lb, la)
        records.append({"prompt": p.messages, "chosen": p.chosen, "rejected": p.rejected, "rating": p.rating,
                        "category": p.category, "safety_label": p.safety_label,
                        "sources": [chosen_src, rejected_src], "kind": task.kind})
    return records, stats


def _write_jsonl(path: Path, records: list[dict]):
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def _init_fingerprint(init_from: str) -> str:
    """Changes when a checkpoint is rewritten, so the cached pairs are re-collected from the new model."""
    p = Path(init_from)
    files = [p / "params.json", p / "config.json"] + sorted(p.glob("consolidated.*.pth")) + sorted(
        p.glob("*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))  # Meta's layout or Hugging Face's
    parts = [str(p.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def sample_sources(cfg) -> list[str]:
    return list(cfg.sample_from) or [cfg.init_from]


def world_preferences(cfg, tok, device, quiet: bool = False) -> tuple[list, list, dict]:
    """(train pairs, test pairs, info) of this round's batch: from cfg.prefs_dir when it holds this exact collection,
    else collected now from the --sample-from models."""
    sources = sample_sources(cfg)
    key = {"models": [_init_fingerprint(m) for m in sources], "world_seed": cfg.world_seed, "seed": cfg.seed,
           "train_prompts": cfg.train_prompts, "safety_prompts": cfg.safety_prompts, "test_prompts": cfg.test_prompts,
           "temperatures": list(cfg.temperatures), "max_new_tokens": cfg.max_new_tokens,
           "rater_noise": cfg.rater_noise, "batch": len(cfg.earlier_prefs) + 1, "version": 7}
    d = Path(cfg.prefs_dir)
    info_file = d / "info.json"
    if info_file.is_file() and json.loads(info_file.read_text()).get("key") == key:
        info = json.loads(info_file.read_text())
        if not quiet:
            print(f"[reward] reusing the preference pairs in {d} (same models, world and settings)", flush=True)
    else:
        t0 = time.perf_counter()
        models = [load_checkpoint(m, device=device, dtype=torch.float32).eval() for m in sources]
        world = World(seed=cfg.world_seed)
        annotator = Annotator(world, seed=cfg.seed, noise=cfg.rater_noise)
        batch_seed = cfg.seed + 1000 * (key["batch"] - 1)  # round k's batch asks new questions: another seed
        info = {"key": key, "sample_from": sources, "counts": {}, "table26": {}}
        for split, n_help, n_safe in (("train", cfg.train_prompts, cfg.safety_prompts),
                                      ("test", cfg.test_prompts, cfg.test_prompts)):
            s = batch_seed + (split == "test")
            tasks = (world.tasks(split, n_help, kinds=HELPFUL_KINDS, seed=s)
                     + world.tasks(split, n_safe, kinds=SAFETY_KINDS, seed=s))
            records, stats = collect_preferences(models, [Path(m).name for m in sources], tok, annotator, tasks, cfg,
                                                 seed=s)
            d.mkdir(parents=True, exist_ok=True)
            _write_jsonl(d / f"{split}.jsonl", records)
            info["counts"][split] = {"prompts": len(tasks), "pairs": len(records), **stats}
            info["table26"][split] = table_26(tok, records)
        info["collect_seconds"] = time.perf_counter() - t0  # info.json last: a crash before it means re-collect
        atomic_write(info_file, lambda f: f.write(json.dumps(info, indent=2).encode()))
        print(f"[reward] collected {info['counts']['train']['pairs']} train + {info['counts']['test']['pairs']} test "
              f"pairs in {info['collect_seconds']:.1f}s -> {d}", flush=True)
    return read_prefs(d / "train.jsonl"), read_prefs(d / "test.jsonl"), info


def read_prefs(path) -> list:
    """read_preferences_jsonl, with a bad line as one error line (path:line: reason) and exit code 2."""
    try:
        prefs = read_preferences_jsonl(path)
    except DataError as e:
        common.die(str(e))
    return [p for p in prefs if p.safety_label != DROPPED_SAFETY_LABEL]  # §3.2.1, also for user files


# ---- main ------------------------------------------------------------------------------------------------------------
def load_pairs(cfg, tok, device, quiet: bool = False) -> tuple[list, list, dict]:
    """(train pairs, test pairs, info): this round's batch (--data, or the world's batch in --prefs-dir) and, with
    --earlier-prefs, every earlier batch's pairs after it (choice 9). info["batches"]: each batch's test pairs' count
    (this one first), so accuracy can be told apart by batch."""
    if cfg.data is None:
        train_pairs, test, info = world_preferences(cfg, tok, device, quiet)
    elif cfg.test_data:
        train_pairs, test = read_prefs(cfg.data), read_prefs(cfg.test_data)
        info = {"data": cfg.data, "test_data": cfg.test_data}
    else:
        train_pairs = read_prefs(cfg.data)
        held = set(random.Random(f"holdout/{cfg.seed}").sample(range(len(train_pairs)), max(1, len(train_pairs) // 10)))
        train_pairs, test = ([p for i, p in enumerate(train_pairs) if i not in held],
                             [p for i, p in enumerate(train_pairs) if i in held])
        info = {"data": cfg.data, "test_data": "10% of --data held out"}
    info["batches"] = [{"dir": cfg.prefs_dir if cfg.data is None else cfg.data, "train": len(train_pairs),
                        "test": len(test)}]
    for d in cfg.earlier_prefs:
        tr, te = read_prefs(Path(d) / "train.jsonl"), read_prefs(Path(d) / "test.jsonl")
        train_pairs, test = train_pairs + tr, test + te
        info["batches"].append({"dir": d, "train": len(tr), "test": len(te)})
    return train_pairs, test, info


def check_flags(cfg: RewardConfig):
    """Every flag that can be wrong, named, before any work (the numeric ranges: common.parse_config)."""
    if cfg.axis not in AXES:
        common.die(f"--axis must be one of {', '.join(AXES)}, got {cfg.axis!r}")
    if cfg.margin not in MARGINS:
        common.die(f"--margin must be one of {', '.join(MARGINS)}, got {cfg.margin!r}")
    if len(cfg.temperatures) != 2:
        common.die(f"--temperatures takes two values (§3.2.1: two samples per prompt), got {cfg.temperatures}")
    if cfg.sample_from and cfg.data is not None:
        common.die("--sample-from: the models sampled for the world's pairs; --data brings its own pairs")
    if cfg.rater_noise != PREFERENCE_NOISE and cfg.data is not None:
        common.die(f"--rater-noise {cfg.rater_noise}: labels the world's pairs (--data brings its own labels)")
    if not Path(cfg.init_from).is_dir():
        common.die(f"--init-from {cfg.init_from}: directory not found (train the chat model first: python sft.py)")
    for m in cfg.sample_from:
        if not Path(m).is_dir():
            common.die(f"--sample-from {m}: directory not found")
    for d in cfg.earlier_prefs:
        missing = [f for f in ("train.jsonl", "test.jsonl") if not (Path(d) / f).is_file()]
        if missing:
            common.die(f"--earlier-prefs {d}: no {' or '.join(missing)} there (a batch an earlier reward.py wrote)")
    if cfg.previous_rm is not None and not (Path(cfg.previous_rm) / "params.json").is_file():
        common.die(f"--previous-rm {cfg.previous_rm}: no reward model there (params.json missing)")


def load_start(cfg: RewardConfig, device) -> tuple[Transformer, object, Path]:
    """The chat model the RM starts from (or an RM, trained further), its tokenizer and the tokenizer's path. fp32
    masters, as sft.load_start."""
    from tokenizer import Tokenizer
    try:
        init = load_checkpoint(cfg.init_from, device=device, dtype=torch.float32)
    except CheckpointError as e:
        common.die(f"--init-from: {e}")
    try:
        tok_path = find_tokenizer(cfg.init_from)
    except FileNotFoundError as e:
        common.die(f"--init-from {e}")
    return init, Tokenizer(str(tok_path)), tok_path


def load_pairs_everywhere(cfg: RewardConfig, dist, tok) -> tuple[list, list, dict]:
    """Step 1 in every process: rank 0 collects and caches the pairs, the others wait and read the cache."""
    if dist.is_main or cfg.data is not None:
        train_pairs, test, info = load_pairs(cfg, tok, dist.device)
    if dist.world_size > 1:
        torch.distributed.barrier()
    if not dist.is_main and cfg.data is None:
        train_pairs, test, info = load_pairs(cfg, tok, dist.device)
    return train_pairs, test, info


def rm_metrics(cfg: RewardConfig, ev: dict, mix: list, train_pairs: list) -> dict:
    """metrics.json's figures of this RM: Tables 7 and 8 and what it was trained on."""
    n_cat = {a: sum(p.category == a for p in mix) for a in AXES}
    return {
        "axis": cfg.axis, "margin": cfg.margin, "init_from": cfg.init_from,
        "accuracy": {a: ev[a]["accuracy"] for a in AXES},  # Table 7: this RM's row
        "accuracy_by_rating": {a: ev[a]["by_rating"] for a in AXES},  # Table 8
        "n_test_by_rating": {a: ev[a]["n_by_rating"] for a in AXES},
        "accuracy_by_source": {a: ev[a]["by_source"] for a in AXES},  # by model variant (choice 2)
        "accuracy_by_kind": {a: ev[a]["by_kind"] for a in AXES},  # Table 8 within each task kind
        "n_pairs": {"train_mixture": len(mix), "train_helpfulness": n_cat["helpfulness"],
                    "train_safety": n_cat["safety"], "train_available": len(train_pairs),
                    "test_helpfulness": ev["helpfulness"]["n"], "test_safety": ev["safety"]["n"]},
        "train_rating_counts": {r: sum(p.rating == r for p in mix) for r in RATINGS},
        "safety_label_counts": {lab: sum(p.safety_label == lab for p in train_pairs if p.category == "safety")
                                for lab in SAFETY_LABELS},
    }


def distribution_shift(cfg: RewardConfig, rm, tok, test: list, info: dict, device) -> dict:
    """Choice 9: this RM's accuracy on each batch's test pairs of its axis (this batch first), and with --previous-rm
    the last round's RM on this batch's pairs beside it: {"accuracy_by_batch": [...], "shift": {"previous_rm",
    "previous", "retrained", "n"} or None}."""
    own, start, by_batch = [], 0, []
    for b in info["batches"]:
        pairs = [p for p in test[start:start + b["test"]] if p.category == cfg.axis]
        start += b["test"]
        by_batch.append({"dir": b["dir"], "accuracy": accuracy(rm, tok, pairs)["accuracy"], "n": len(pairs)})
        own.append(pairs)
    shift = None
    if cfg.previous_rm:
        before = accuracy(load_reward_model(cfg.previous_rm, device), tok, own[0])["accuracy"]
        shift = {"previous_rm": cfg.previous_rm, "previous": before, "retrained": by_batch[0]["accuracy"],
                 "n": len(own[0])}
        print(f"[reward] distribution shift on this batch's {len(own[0])} {cfg.axis} test pairs: the last round's RM "
              f"{100 * before:.1f}%, retrained {100 * by_batch[0]['accuracy']:.1f}%", flush=True)
    return {"accuracy_by_batch": by_batch, "shift": shift}


def margin_ablation(cfg: RewardConfig, ev: dict, test: list, train_other) -> dict:
    """Table 28: this RM's accuracies and those of the RMs of the other margins (train_other(margin) -> ablation_rm's
    figures), with small and large compared against none pair by pair on this RM's own test set."""
    abl = {cfg.margin: {"accuracy": {a: ev[a]["accuracy"] for a in AXES},
                        "accuracy_by_rating": {a: ev[a]["by_rating"] for a in AXES}, "right": ev[cfg.axis]["right"]}}
    for other in MARGINS:
        if other != cfg.margin:
            abl[other] = train_other(other)
    right = {m: abl[m].pop("right") for m in MARGINS}
    own = [p for p in test if p.category == cfg.axis]  # the pairs `right` lists, in accuracy()'s order
    for m in list(MARGINS)[1:]:  # small and large against none
        abl[m]["paired_vs_none"] = paired_difference(own, right["none"], right[m])
    return {m: abl[m] for m in MARGINS}  # none, small, large


def ablation_rm(cfg: RewardConfig, init: Transformer, tok, mix: list, test: list, device, dtype) -> dict:
    """One RM of the margin ablation: trained on `mix` with cfg.margin from the same seed as the main RM, evaluated on
    the test pairs. Returns its Table 7 / Table 8 figures."""
    common.seed_everything(cfg.seed)
    rm, _ = train(init, mix, tok, cfg, common.Dist(device=device), dtype, tag=f"rm_margin_{cfg.margin}")
    ev = evaluate(rm, tok, test)
    _print_eval(f"rm_margin_{cfg.margin}", ev)
    return {"accuracy": {a: ev[a]["accuracy"] for a in AXES},
            "accuracy_by_rating": {a: ev[a]["by_rating"] for a in AXES},
            "right": ev[cfg.axis]["right"]}  # per test pair of its own axis, for the paired comparison (not saved)


def main(cfg: RewardConfig):
    t_start, cpu_start = time.perf_counter(), time.process_time()
    check_flags(cfg)
    if cfg.quick:
        cfg = replace(cfg, train_prompts=60, safety_prompts=80, test_prompts=30, max_new_tokens=32)
    out = Path(cfg.out_dir or ("out/rm_helpful" if cfg.axis == "helpfulness" else "out/rm_safety"))
    cfg = replace(cfg, prefs_dir=cfg.prefs_dir or str(out.parent / "prefs"))  # out/rm_helpful -> out/prefs
    dist = common.setup_distributed(cfg.device)
    common.preflight(out, dist, init_from=(cfg.init_from, None))  # a chat model or an RM (reward.py starts from either)
    device = dist.device
    if dist.is_main and (out / "metrics.json").is_file():
        (out / "metrics.json").unlink()  # a rerun must not leave the last run's "complete": true (or its ablation)
    dtype = common.pick_dtype(cfg.dtype, device)
    common.seed_everything(cfg.seed)
    init, tok, tok_path = load_start(cfg, device)

    t0 = time.perf_counter()  # 1. the pairs
    train_pairs, test, info = load_pairs_everywhere(cfg, dist, tok)
    data_seconds = time.perf_counter() - t0

    mix = train_mixture(cfg, train_pairs)  # 2. this axis's mixture
    if len(mix) < cfg.batch_size:
        common.die(f"only {len(mix)} training pairs for the {cfg.axis} RM, fewer than --batch-size {cfg.batch_size}")
    n_cat = {a: sum(p.category == a for p in mix) for a in AXES}
    if dist.is_main:
        print(f"[reward] {cfg.axis} RM from {cfg.init_from}: {len(mix)} pairs ({n_cat['helpfulness']} helpfulness, "
              f"{n_cat['safety']} safety), margin {cfg.margin}, {len(mix) // cfg.batch_size} steps of "
              f"{cfg.batch_size} pairs, lr {cfg.lr:g}", flush=True)
    t0 = time.perf_counter()  # 3. one epoch
    rm, curve = train(init, mix, tok, cfg, dist, dtype, tag=f"rm_{cfg.axis}")
    train_seconds = time.perf_counter() - t0
    workers = start_ablation_workers(cfg) if ablation_workers_wanted(cfg, dist) else None  # speed-up (below)

    calibration = None
    if dist.is_main:  # 4. the zero point that §3.2.3's switch at 0.15 needs (choice 8)
        calibration = calibrate(rm, tok, mix, cfg.safety_threshold)
        print(f"[reward] {cfg.axis} RM calibrated: score offset {calibration['offset']:+.3f}; on its training replies "
              f"sigmoid(score) < {cfg.safety_threshold} holds for {calibration['safe_flagged']:.1%} of the safe ones "
              f"to helpfulness prompts, {calibration['safe_flagged_on_safety_prompts']:.1%} of the safe ones to "
              f"safety prompts and {calibration['unsafe_flagged']:.1%} of the unsafe ones", flush=True)
    if dist.is_main:  # 5. save, evaluate (Tables 7, 8, the shift), optionally the margin ablation (Table 28)
        save_checkpoint(rm, out, tok_path)
        t0 = time.perf_counter()
        ev = evaluate(rm, tok, test)
        _print_eval(f"rm_{cfg.axis}", ev)
        eval_seconds = time.perf_counter() - t0
        metrics = rm_metrics(cfg, ev, mix, train_pairs)
        metrics.update(distribution_shift(cfg, rm, tok, test, info, device))
        metrics.update({
            "calibration": calibration, "data_info": info, "steps": len(curve), "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "final_train_loss": curve[-1][1], "loss_curve": curve[::max(1, len(curve) // 200)],
            "data_seconds": data_seconds, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        })
        if cfg.margin_ablation:
            metrics["margin_ablation"] = margin_ablation(cfg, ev, test, lambda m: (
                workers[1][m].result() if workers is not None
                else ablation_rm(replace(cfg, margin=m), init, tok, mix, test, device, dtype)))
        if workers is not None:
            workers[0].shutdown()
            torch.set_num_threads(workers[2])
        metrics["wall_seconds"] = time.perf_counter() - t_start
        metrics["cpu_seconds"] = time.process_time() - cpu_start  # all threads: > wall when the CPU is ours alone
        metrics["complete"] = True
        common.write_metrics(out, metrics)
        print(f"[reward] done in {common.fmt_time(metrics['wall_seconds'])}, {metrics['cpu_seconds']:.0f} CPU-s "
              f"(data {data_seconds:.1f}s, train {train_seconds:.1f}s, eval {eval_seconds:.1f}s); wrote {out}",
              flush=True)
    common.cleanup_distributed(dist)


# ---- speed-up: the margin ablation in worker processes ---------------------------------------------------------------
# On a CPU with one process, the ablation's two RMs train at the same time in two spawned worker processes, with a third
# of the threads each, while this process evaluates and saves the main RM: small models use a second thread poorly, so
# two one-thread trainings side by side beat two in a row. Each worker rebuilds what it needs from cfg alone (the
# checkpoint, the cached pairs, the mixture, the seed) and runs the same ablation_rm as the plain path, in which the
# ablation trains in this process after the main RM (under torchrun or on a GPU).
def ablation_workers_wanted(cfg, dist) -> bool:
    return cfg.margin_ablation and dist.world_size == 1 and dist.device.type == "cpu"


def ablation_threads() -> int:
    return max(1, torch.get_num_threads() // 3)


def ablation_worker(cfg, margin: str, threads: int) -> dict:
    """ablation_rm in a spawned process with `threads` threads, from cfg alone: the checkpoint, the pairs (the cache
    the main process wrote, or --data), the mixture."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    init = load_checkpoint(cfg.init_from, device=device, dtype=torch.float32)
    from tokenizer import Tokenizer
    tok = Tokenizer(str(find_tokenizer(cfg.init_from)))
    train_pairs, test, _ = load_pairs(cfg, tok, device, quiet=True)
    return ablation_rm(replace(cfg, margin=margin), init, tok, train_mixture(cfg, train_pairs), test, device,
                       common.pick_dtype(cfg.dtype, device))


def start_ablation_workers(cfg: RewardConfig) -> tuple:
    """(executor, {margin: future of ablation_worker}, this process's thread count before) for the margins other than
    cfg.margin; this process keeps a third of the threads until the executor is shut down."""
    import concurrent.futures
    import multiprocessing
    threads = torch.get_num_threads()
    n = ablation_threads()
    workers = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    ablation = {m: workers.submit(ablation_worker, cfg, m, n) for m in MARGINS if m != cfg.margin}
    torch.set_num_threads(n)  # this process's evaluation shares the cores with them
    print(f"[reward] margin ablation: {', '.join(ablation)} train in 2 worker processes alongside, {n} thread(s) "
          f"each", flush=True)
    return workers, ablation, threads


if __name__ == "__main__":
    common.run_main(main, common.parse_config(RewardConfig, description=__doc__))
