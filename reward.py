"""Reward models (paper §3.2.2): a helpfulness RM and a safety RM, trained on binary preference pairs (§3.2.1).

  python reward.py --axis helpfulness --out-dir out/rm_helpful     # collects out/prefs, trains: ~90 CPU-seconds
  python reward.py --axis safety --out-dir out/rm_safety           # reuses out/prefs: ~50 CPU-seconds
  python reward.py --axis helpfulness --margin-ablation            # + Table 28: none / small / large margin
  python reward.py --axis helpfulness --quick --out-dir /tmp/rm    # a smoke run in seconds
  python reward.py --axis safety --data my_prefs.jsonl --test-data my_test.jsonl --init-from /path/to/llama-2-7b-chat
  torchrun --nproc_per_node=8 reward.py --axis helpfulness --device cuda --batch-size 512
  torchrun --nproc_per_node=8 reward.py --axis safety --init-from /path/to/llama-2-7b-chat --device cuda --fsdp

Steps: 1. preference pairs: sampled from the chat model and rated by the world's annotator (§3.2.1), cached in
out/prefs/ so that both axes train on one collection (or read from --data); 2. the mixture of §3.2.2 for this axis;
3. one epoch of the margin ranking loss; 4. accuracy of the RM on the helpfulness and the safety test sets (Table 7),
by rating (Table 8), and with --margin-ablation for every margin (Table 28). Writes params.json (head "scalar"),
consolidated.00.pth, tokenizer.model and metrics.json to --out-dir.

What a reward model is here: the chat model's trunk with its next-token head (`output`, C x V) replaced by a regression
head (`score`, C x 1, model.py's head="scalar"), and two new transformer blocks between them (choice 11; --head-layers 0
is the paper's form). The forward pass gives one number per position, (B, T); the reward of a reply is the number at
the reply's LAST token, the only position whose state has seen the prompt and the whole reply.

Deviations from the paper, and choices where it is silent:
  1. Where the reward is read (not stated): at the last token of the reply. A reply is scored as a finished chat turn,
     "<s>[INST] prompt [/INST] reply </s>" (tokenizer.encode_dialog), so for text the last token is the EOS, in
     training and in score() alike. Token-id replies (a policy's samples, as generated) are scored as given: a
     finished sample ends with EOS like the training data; a truncated one (no EOS) is read at its last token, a state
     the RM never saw in training: callers that want to punish truncation must do it themselves (PPO commonly does).
     The index is computed from the row lengths and the padding side, never by looking for a pad or EOS id.
  2. Preference data: the paper's raters compared samples of two model variants at different temperatures. Here both
     samples come from the --init-from model at temperatures 0.7 and 1.2 (one model: we have no second variant), and,
     so that every rating level is represented, each prompt adds pairs with the world's replies with deliberate
     defects (World.reply_variants: verbose, partial, wrong, off topic, refusal, harmful compliance). Per prompt:
     sample vs sample, defect vs sample, defect vs reference. A well-trained chat model often samples the same reply
     twice (~80% of prompts here): that pair would compare a reply with itself, so another defect vs sample pair
     takes its place. Helpfulness prompts are judged on the helpfulness axis, safety prompts (harmful, borderline) on
     the safety axis, and safety pairs whose chosen reply is unsafe while the other is safe are dropped (§3.2.1).
  3. Mixtures (§3.2.2). Safety RM = every safety pair + round(n_safety / 9) helpfulness pairs, so that helpfulness
     is 10% of the mix, as the paper. Helpfulness RM = every helpfulness pair + "an equal part of the remaining data
     uniformly sampled from Meta Safety and from the open-source datasets". We have no open-source data (Table 6: 1.50M
     comparisons, 44k of them Anthropic Harmless), so the helpfulness RM keeps only the safety share of that equal
     part: --helpful-safety-share x n_helpful safety pairs, sampled without replacement. The default 1/3 is Table 6's
     arithmetic: Meta's 1.42M comparisons are safety and helpfulness together (the split is not published); if half
     are safety, safety is (0.71M + 0.04M) / 2.21M = 34% of the pool that part is drawn from, and at any split it is
     at most half. Earlier versions took the whole equal part from safety (share 1), which no reading gives: both RMs
     then learned the safety pairs as well as the noisy labels allow (seed 1: 85.5% and 85.2% on the safety test set,
     where an oracle that knows the annotator's noise-free scores gets 86.6%), and Table 7's safety column was a coin
     flip. It still can be: the helpfulness RM on the safety test set, seed 1 (share 1 / 0.5 / 1/3 / 0.25 / 0.1):
     85.5 / 85.5 / 85.7 / 80.8 / 74.8% against the safety RM's 85.2%, and on its own test set 79.3 / 79.5 / 78.3 /
     78.5 / 81.5%; seed 0 at 1/3: 78.6% against 84.5% (BENCHMARKS.md, eleventh session). Helpfulness and safety prompts
     are drawn separately (not at the world's 70/30 mix): 500 and 700 by default.
  4. Hyperparameters: 1 epoch, AdamW as pretraining, cosine to 10%, warmup 3% of the steps but at least 5: as the
     paper. Batch 32 pairs instead of 512 (~3,000 pairs make ~90 steps, not ~6). Peak lr 1e-4 instead of 1e-5:
     pretrain.py runs the miniature at 10x Llama 2's pretraining peak (3e-3 vs 3e-4), and so does this. Measured on
     the default data: 3e-4 and 1e-3 were no better (within +-2 points), so the paper's ratio is kept.
  5. The new `score` head starts small and random, std 1/sqrt(dim), so rewards start at unit scale, as a 7B's head
     initialised at std 0.02 does (0.02 * sqrt(4096) = 1.3). A zero head (rewards all 0 at the start) learned more
     slowly here: Adam moves each of its 128 weights by ~lr per step, so in ~90 steps at 1e-4 the rewards could not
     grow past ~1 and the loss stayed near log 2; it lost 3 points of accuracy on the helpfulness test set.
  6. The test sets come from the same collection procedure on world.tasks("test") prompts: their labels come from
     the same noisy annotator, so even a perfect RM cannot reach 100% on close pairs (the paper's human labels share
     this). How noisy (PREFERENCE_NOISE, --rater-noise): at 0.1, the world's first setting, a rater without
     noise (the annotator's own scores) gets 100% of the "significantly better" test pairs and 96-99.6% of the
     "better" ones (seeds 0-3): the two levels equally clean, so their order is set by the kinds of pair each holds,
     not by its labels as in the paper. At 0.2 it gets 99.3-99.8 / 84-91 / 67-72 / 48-60% by level, the paper's fall,
     but only 81-84% of the safety test pairs, where the safety RM must reach 80%. The default 0.15 gives 100 /
     94-97 / 72-84 / 55-68%, and 85-89% of the safety pairs (BENCHMARKS.md, thirteenth and fourteenth sessions).
     With the plain RM (--no-surprise, choice 12) Table 8 in miniature falls from "better" to "negligibly better /
     unsure" as the paper's does, but "significantly better" pairs score below "better" ones
     here. Measured by the source of each test pair (seed 0, 597 helpfulness pairs, BENCHMARKS.md): a refusal, a
     partial, verbose or garbled reply against a good one is told apart 92-100% of the time, but a wrong fact or sum
     against a right one only 43-44%, and a fact about another person 34-50%: chance. Those content errors are most
     of the "significantly better" level (the annotator knows the facts: a gap of ~0.9). What the RM learns is form:
     a second epoch raised "reference > reply with a closer" from 72% to 86% and lowered "model sample > wrong fact"
     from 44% to 31% (the samples carry the writers' closer, the wrong replies do not); 2 epochs, lr 3e-4, batch 16,
     or 3 epochs at 3e-4 all left that level at 67-71%. Telling a wrong fact needs the RM to recall the fact again
     at the reply's end, two steps of retrieval a 4-layer 0.87M model does not learn from ~300 such pairs; earlier
     runs with 4x the data reached 80% there. Choice 9 adds such pairs; an annotator that knew every score without
     noise would get 90.7% of these test pairs (at noise 0.1). Choice 11's head blocks raise the content pairs on one
     seed of three, and leave the level below "better".
  7. No mid-run checkpoints: an RM trains in about a minute here; the model is written once, at the end.
  8. The safety RM's zero point (calibrate_safety). §3.2.3 switches to the safety RM whenever R_s < 0.15, which
     presumes that a low sigmoid score means "unsafe". The ranking loss fixes only differences of scores, so without
     a calibration the level is an accident of the initialization: here an uncalibrated safety RM put 60-77% of the
     replies to harmless questions below 0.15, so PPO optimized its helpfulness replies against the safety RM, which
     cannot tell a right answer from a wrong one. After training, the offset that puts 0.15 at the 5th percentile of
     the safe replies' scores in its training pairs is stored in params.json (score_offset); every user of the RM
     (RS, PPO, evaluation) then reads calibrated scores. Accuracies are unchanged (they compare differences).
  9. More content pairs (--content-pairs K, default 0): K extra train pairs per prompt of a content defect (a wrong
     fact or sum, another person's fact) against the reference. They cost no sampling; the test pairs are the ones
     collected without them, so accuracies stay comparable. Measured on the default run's SFT model (seed 0,
     BENCHMARKS.md): K = 1 raised the helpfulness RM from 71.0% to 72.5% and the safety RM from 83.5% to 85.9% on
     their own test sets; K = 2 gave 72.7% and 85.4%, "significantly better" 70% -> 78% but "better" 89% -> 81%.
     What the pairs teach is "another person" (reference > off topic 50% -> 85%), not "a wrong fact" (44% -> 56%):
     an RM trained on 2,000 such pairs alone gets 94% of its train pairs but 56-65% of the test pairs right, so it
     remembers which claims were false instead of checking them. K = 0 stays the default: the gains are one seed and
     within two standard errors, and the RM weighs the writers' closer less (reference > closer 72% -> 55% at K = 2),
     the habit RLHF removes in this world. Drawing the usual defects 3x as often from the content kinds, instead of
     adding pairs, was worse (67.7%): samples carry the closer and content defects do not, so the RM learned "sounds
     like a sample" (sample > wrong 44% -> 79%, reference > closer 72% -> 14%).
 10. A defect paired with a model sample ends as the sample does (closer_matched): with the writers' closer when the
     sample has one. Before, the defects (built from the closer-free reference) lost to samples that mostly carry the
     closer, so "has a closer" went with "chosen" (train pairs: 388 with the closer on the chosen reply only, 245 on
     the rejected only) and on the Zen 5 CPU the RM learned to prefer it (reference > closer 29%): RS and PPO then won
     55% against SFT. With matching (same machine, seed 0, BENCHMARKS.md): reference > closer 86%, helpfulness test
     73.9% (69.7%), RS and PPO 71.3% and 69.1% against SFT (evaluate.py). Test pairs are collected the same way, so they changed too.
 11. Two head blocks (--head-layers 2, --head-lr-mult 10). The paper's RM is the chat model's own architecture with a
     new head, and a 7B or 70B trunk has layers to spare. The miniature's 4-layer chat model recalls a fact in its
     last layers, at the position just before it writes the fact, so no layer is left in which a later position could
     read that recall and compare it with what was written (choice 6). Two new transformer blocks on top of the trunk
     give it room: they start as the identity (output projections wo and w2 at zero, so the RM starts as the plain
     one, initialised from the chat model as §3.2.2 asks), and train at 10x the lr, since zero-initialised weights
     hardly move in one epoch at the trunk's 1e-4 (two blocks at 1x: 74.2% on seed 0, as plain). Measured on the
     default runs' SFT models and pairs, seeds 0 / 1 / 2 (Zen 4, BENCHMARKS.md), plain -> two blocks:
     helpfulness RM on its test set 73.9 -> 78.7%, 80.9 -> 80.7%, 76.5 -> 77.0%; safety RM on its test set
     86.2 -> 87.4%, 88.0 -> 89.8%, 87.9 -> 89.7%; Table 7's pattern (each RM best on its own test set) held on 1 of
     the 3 seeds plain and on all 3 with the blocks (plain, the helpfulness RM beat the safety RM on safety pairs).
     What the blocks teach is not yet fact checking: on seed 0 "reference > wrong fact" rose from 42% to 67%, on
     seed 1 it stayed at 50%, and the "significantly better" level stays below "better" for the helpfulness RM on
     every seed (79 / 92% on seed 0). Tried on seed 0 and 1 and not kept: three blocks (78.7% on seed 0, no better
     than two), the plain trunk's top two layers at 10x (76.2%, 80.0%).
 12. --surprise (on by default; --no-surprise is the paper's RM): the RM also reads how surprised the chat model is by
     each token. The RM keeps the chat model's final norm and next-token head; after the trunk's last block they give,
     for every token, -log p(token) where it was predicted and its gap to the most likely token, and a (C, 2) matrix
     that starts at zero adds the two numbers to the residual stream, where the head blocks can attend to them
     (model.Transformer.surprise). Why: the chat model knows the facts (it recalls them when it writes them), but the
     scalar head must recall a fact a second time, at the reply's end, to see that a written one is wrong (choice 11).
     The chat model's own next-token probabilities already do that check: on the seed 0 helpfulness test pairs, "the
     reply with the lower summed surprise wins" alone is right on 98% of the "significantly better" pairs (83% of
     "sample > wrong fact", 100% of "reference > wrong fact"). Measured on the default runs' SFT models and pairs (Zen
     4, BENCHMARKS.md), without -> with: helpfulness RM on its test set 79.7 -> 87.2% (seed 0), 77.9 -> 84.8% (seed 1);
     its "significantly better" 79.6 -> 93.2%, 76.9 -> 93.1% (Table 8 monotone on seed 1, 1.5 points short on seed 0);
     the safety RM on its test set 84.1 -> 85.5%, 88.8 -> 88.3%. It costs Table 7 part of its margin: the helpfulness
     RM, which now sees wrong facts, is nearly as good as the safety RM on the safety pairs (the safety RM's edge was
     the off-topic content pairs, and both RMs now get those right; with the safety share at 1/3, choice 3, Table 7
     still holds on seeds 0-2, by 1.0-1.4 points). And at the rater noise of 0.1 the helpfulness RM's "significantly
     better" and "better" levels then tie near their common ceiling (92-96%; 5 of 9 orders of Tables 8 and 28 wrong by
     0.3-0.8 points, twelfth session). With the default noise of 0.15 (choice 6) on four seeds (Zen 3, fourteenth
     session): each RM above its target on its own test set (helpfulness 84.2-85.3%, safety 83.4-88.5%), Table 7 on all
     four, Table 8's fall on six of the eight RM-seed pairs (the two misses: the top two levels 0.1 and 0.6 points
     apart, one pair), where the plain RM at 0.1 missed seven of the eight (the helpfulness RM by 10-18 points), and the
     plain RM at 0.15, on the same pairs, misses six of the eight (helpfulness RM 75.5-78.1%, its top level 8-14 points
     under "better"): the noise makes the labels fall by level, the surprise lets the RM check the wrong facts that fill
     the top level. Why it is the default: the paper's 7B-70B RMs know the facts their chat model knows; this 4-layer
     one does not without it. What is left at the top, by the prompt's task kind (accuracy_by_kind, the report's Table
     8 by kind; helpfulness RM, seeds 0 / 1 / 2, Zen 3, fifteenth session): fact questions fall level by level on all
     three (99.1 / 96.4 / 81.4 / 66.7%, 100 / 98.0 / 75.6 / 57.9%, 97.6 / 94.1 / 80.5 / 59.0%, 116-127 pairs at the
     top), sums are the kind the RM judges worst at the top (79.2%, 86.4%, 85.2% of 53-59 pairs: a wrong sum is
     checked by a trunk that adds as well as the SFT model, which gets 75-87% of held-out sums right), and stories
     and follow-ups (7-64 pairs a cell) wobble by a few points either way. Seed 2's tie of the top two levels
     (92.7 / 93.3%) is sums, stories and follow-ups each a little better one level down, not one broken kind.
 13. How to read Tables 8 and 28 at this size (the report prints both readings). Table 8's levels are different
     pairs, so a step from one level to the next carries both levels' standard errors (~2-3 points at the top, where
     the paper's step is 13). Table 28's three RMs are judged on the same pairs and differ only where they disagree
     (paired_difference): on ~260-290 "significantly better" pairs they disagree on 2-9, so the margin's effect is
     measured to ~0.5-1 point, not the ~1.5 of each accuracy. Four seeds (Zen 3, sixteenth session, BENCHMARKS.md):
     the top step of Table 8 is +5.6 / +4.1 / -0.6 / +2.4 points (one standard error 2.7-3.2) for the helpfulness RM
     and +2.9 / +2.3 / +2.0 / -0.1 (1.9-2.5) for the safety RM, pooled +2.9 +- 1.5 and +1.8 +- 1.1; every lower step
     is +9.8 to +27.7 points, 1.5-4.9 standard errors above zero. The margins against none on "significantly
     better", pair by pair: small +0.8 / +1.4 / 0.0 / -0.8, large +0.8 / -0.4 / +0.4 / +0.4 points (0.5-1.1 each),
     pooled +0.4 +- 0.3 and +0.3 +- 0.4 (9 pairs won against 5 lost, 12 against 9). So a margin moves a handful of
     pairs in one epoch from the same start; no seed shows it costing more than one paired standard error (seed 3's
     small margin: 1 pair won, 3 lost), and its gain is smaller than the paper's +1.6 (79.1 -> 80.7), which the
     pooled error would resolve.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import common
from annotator import Annotator, DROPPED_SAFETY_LABEL, PREFERENCE_NOISE, RATINGS, SAFETY_LABELS
from data import DataError, read_preferences_jsonl
from world import DEMO_CLOSERS, World
from rlhf import common_prefix_len, encode_reply, score, shared_rewards
from model import CheckpointError, Transformer, _atomic_write, find_tokenizer, load_checkpoint, save_checkpoint

AXES = ("helpfulness", "safety")
HELPFUL_KINDS = ("fact", "arith", "story", "multiturn")
SAFETY_KINDS = ("harmful", "borderline")
HELPFUL_SAFETY_SHARE = 1 / 3  # the helpfulness RM's safety pairs per helpfulness pair (docstring, choice 3)
PREFERENCE_NOISE = PREFERENCE_NOISE  # the annotator's noise on a score gap (choice 6; the field `data` hides data)
# Table 27: margin m(r) per rating, in the order of RATINGS (significantly better ... negligibly better / unsure)
MARGINS = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}


@dataclass
class RewardConfig:
    axis: str = "helpfulness"  # helpfulness | safety (§3.2.2: two separate reward models)
    margin: str = "small"  # none | small | large: Table 27's margin m(r) in the loss
    init_from: str = "out/sft"  # the chat model the RM starts from (§3.2.2), also the policy that is sampled
    out_dir: Optional[str] = None  # default: out/rm_helpful or out/rm_safety
    data: Optional[str] = None  # preference JSONL {prompt, chosen, rejected, rating, category}; None = the world
    test_data: Optional[str] = None  # test pairs for --data (default: 10% of --data held out)
    prefs_dir: Optional[str] = None  # cache of the collected pairs, shared by both axes; default: prefs/ beside out-dir
    world_seed: int = 0  # seed of the built-in world
    train_prompts: int = 500  # world train prompts of the helpful kinds (fact, arith, story, multiturn); 3 pairs each
    safety_prompts: int = 700  # world train prompts of the safety kinds (harmful, borderline); see docstring, choice 3
    test_prompts: int = 200  # world test prompts per category
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.2])  # §3.2.1: two samples, two temperatures
    max_new_tokens: int = 64  # length limit of the sampled replies
    head_layers: int = 2  # new transformer blocks between the chat model's trunk and the score head (choice 11; 0 = paper)
    head_lr_mult: float = 10.0  # the head blocks' lr as a multiple of --lr (choice 11)
    surprise: bool = True  # the chat model's surprise at each token enters the RM (choice 12; off: the paper's RM)
    helpful_safety_share: float = HELPFUL_SAFETY_SHARE  # the helpfulness RM's safety pairs per helpfulness pair
    content_pairs: int = 0  # train prompts only: extra pairs per prompt of a content defect against the reference
    rater_noise: float = PREFERENCE_NOISE  # the annotator's noise when it labels the world's pairs (choice 6)
    safety_threshold: float = 0.15  # §3.2.3: R_s below it marks a reply unsafe; the safety RM is calibrated to it
    max_train_pairs: int = 0  # use at most this many pairs of the mixture (0 = all): for quick runs
    batch_size: int = 32  # pairs per optimizer step, all processes together (§3.2.2: 512)
    lr: float = 1e-4  # peak lr (§3.2.2: 1e-5; 10x as pretrain.py scales, see docstring)
    epochs: int = 1  # §3.2.2: one epoch (training longer over-fits)
    warmup_frac: float = 0.03  # §3.2.2: warmup over 3% of the steps...
    min_warmup: int = 5  # ...but at least 5 steps
    final_lr_ratio: float = 0.1  # §3.2.2: cosine down to 10% of the peak
    weight_decay: float = 0.1  # as pretraining (§2.2)
    grad_clip: float = 1.0  # as pretraining (§2.2)
    margin_ablation: bool = False  # also train the other margins on the same data (Table 28)
    quick: bool = False  # a seconds-long smoke run: 60 + 80 train and 30 + 30 test prompts, replies of <= 32 tokens
    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model (shapes vary per batch: mostly useful on GPUs)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    seed: int = 0
    log_interval: int = 25
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="train_prompts safety_prompts test_prompts max_new_tokens head_lr_mult batch_size lr epochs "
                 "grad_clip log_interval",
        non_negative="world_seed temperatures head_layers helpful_safety_share content_pairs rater_noise "
                     "max_train_pairs min_warmup weight_decay seed",
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
def reward_model_from(chat_model: Transformer, seed: int = 0, head_layers: int = 0,
                      surprise: bool = False) -> Transformer:
    """A scalar-head copy of a chat model (§3.2.2): every weight but the next-token head, and a new `score` head with
    small random weights, std 1/sqrt(dim) (docstring, choice 5). head_layers > 0 puts that many new transformer blocks
    between the copied trunk and the score head (choice 11): nn.Linear's default init, but each block's two output
    projections (wo, w2) at zero, so a block adds nothing to the residual stream and the new model scores exactly as
    the plain one until training moves them. surprise=True (choice 12) also keeps the chat model's final norm and
    next-token head (surprise_norm, surprise_output) and adds the features' (C, 2) matrix surprise_in, at zero: it too
    scores exactly as the plain one at the start."""
    if chat_model.args.head == "scalar":  # starting from another reward model: keep its head (and head blocks) too
        rm = Transformer(chat_model.args)
        rm.load_state_dict(chat_model.state_dict())
        return rm.to(next(chat_model.parameters()).device)
    L = chat_model.args.n_layers
    with torch.random.fork_rng(devices=[]):  # the new blocks' init is a function of the seed alone
        torch.manual_seed(seed + 1)
        rm = Transformer(replace(chat_model.args, head="scalar", n_layers=L + head_layers,
                                 surprise_layer=L if surprise else 0))
    sd = chat_model.state_dict()
    trunk = {k: v for k, v in sd.items() if not k.startswith("output.")}
    if surprise:  # choice 12: the chat model's own final norm and next-token head, read after its last block
        trunk.update({"surprise_norm.weight": sd["norm.weight"], "surprise_output.weight": sd["output.weight"]})
    missing, unexpected = rm.load_state_dict(trunk, strict=False)
    assert not unexpected and set(missing) == {"score.weight"} | ({"surprise_in.weight"} if surprise else set()) | {
        k for k in rm.state_dict() if k.startswith(tuple(f"layers.{i}." for i in range(L, L + head_layers)))}, missing
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # (1, C): rewards start at unit scale, as a 7B's head at std 0.02 does (0.02 * sqrt(4096))
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=g) * rm.args.dim ** -0.5)
        for block in rm.layers[L:]:  # (C, C) and (C, F): the head blocks start as the identity
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        if surprise:  # (C, 2): adds nothing until training moves it
            rm.surprise_in.weight.zero_()
    return rm.to(next(chat_model.parameters()).device)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def head_block_lr(first_new: int, mult: float):
    """lr_mult for common.make_optimizer: `mult` for the parameters of blocks first_new, first_new + 1, ... (the head
    blocks of choice 11), 1 for the rest; parameters are matched by name, so DDP's "module." and torch.compile's
    "_orig_mod." prefixes do not matter."""
    def lr_mult(name: str) -> float:
        m = _LAYER.search(name)
        return mult if (m and int(m.group(1)) >= first_new) or "surprise_in." in name else 1.0
    return lr_mult


# ---- 3. preference data (§3.2.1) -------------------------------------------------------------------------------------
def _sample_replies(policy, tok, tasks, temperature: float, max_new_tokens: int, gen, batch: int = 256) -> list[str]:
    from generate import generate
    out = []
    ticker = common.Ticker(f"reward sampling T={temperature:g}", len(tasks))
    for i in range(0, len(tasks), batch):
        prompts = [tok.encode_dialog(t.messages)[0] for t in tasks[i:i + batch]]
        for ids in generate(policy, prompts, max_new_tokens, temperature=temperature, top_p=0.9, eos_id=tok.eos_id,
                            generator=gen):
            out.append(tok.decode([t for t in ids if t != tok.eos_id]).strip())  # the rater reads text
        ticker.tick(len(out))
    return out


def closer_matched(defect: tuple[str, str], sample: str) -> tuple[str, str]:
    """The (label, text) defect ending the way the model sample it is paired with ends (docstring, choice 10): with
    the writers' closer when the sample has one. The closer defect and refusals are left as they are."""
    label, text = defect
    closer = next((c for c in DEMO_CLOSERS if sample.rstrip().endswith(c)), None)
    if closer is None or label in ("closer", "refusal") or text.rstrip().endswith(closer):
        return defect
    return label, f"{text} {closer}"


CONTENT_DEFECTS = ("wrong", "off_topic")  # World.reply_variants whose flaw is what they say, not how (choice 9)


def collect_preferences(policy, tok, world: World, annotator: Annotator, tasks: list, temperatures,
                        max_new_tokens: int, seed: int, content_pairs: int = 0) -> tuple[list[dict], dict]:
    """Three rated pairs per prompt (docstring, choice 2), plus `content_pairs` pairs of a content defect against the
    reference (choice 9), as JSONL-ready records, and counts of what was dropped."""
    rng = random.Random(f"prefs/{seed}")
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    n_all = len(tasks)  # a prompt must leave room for a reply in the context: longer ones are skipped (and counted)
    tasks = [t for t in tasks if len(tok.encode_dialog(t.messages)[0]) + 8 <= policy.args.max_seq_len]
    samples = [_sample_replies(policy, tok, tasks, t, max_new_tokens, gen) for t in temperatures[:2]]
    records, stats = [], {"dropped_chosen_unsafe": 0, "skipped_long_prompts": n_all - len(tasks),
                      "identical_samples": 0, "identical_pairs_skipped": 0}
    for i, task in enumerate(tasks):
        model_replies = [(f"sample_T{t:g}", s[i]) for t, s in zip(temperatures, samples)]
        variants = world.reply_variants(task, rng)
        reference, defects = variants[0], variants[1:]
        d1, d2, d3 = (rng.choice(defects) for _ in range(3))
        s1 = rng.choice(model_replies)
        pairs = [tuple(model_replies),  # the paper's pair: two model samples
                 (closer_matched(d1, s1[1]), s1),  # a deliberate defect against a model sample
                 (d2, reference)]  # a defect against the ideal reply
        if model_replies[0][1] == model_replies[1][1]:  # a confident model often says the same thing twice: nothing
            s3 = rng.choice(model_replies)  # to compare, so another defect against a sample instead
            pairs[0] = (closer_matched(d3, s3[1]), s3)
            stats["identical_samples"] += 1
        content = [d for d in defects if d[0] in CONTENT_DEFECTS]
        pairs += [(rng.choice(content), reference) for _ in range(content_pairs if content else 0)]
        axis = "safety" if task.is_safety else "helpfulness"
        for (la, a), (lb, b) in pairs:
            if a == b:  # e.g. a sample that is exactly the reference: skipped, no rater compares a reply to itself
                stats["identical_pairs_skipped"] += 1
                continue
            if rng.random() < 0.5:  # who is shown first must not matter
                (la, a), (lb, b) = (lb, b), (la, a)
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
    _atomic_write(path, lambda f: f.write(text.encode()))


def _init_fingerprint(init_from: str) -> str:
    """Changes when the init checkpoint is rewritten, so the cached pairs are re-collected from the new model."""
    p = Path(init_from)
    files = [p / "params.json", p / "config.json"] + sorted(p.glob("consolidated.*.pth")) + sorted(
        p.glob("*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))  # Meta's layout or Hugging Face's
    parts = [str(p.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def world_preferences(cfg, policy, tok, quiet: bool = False) -> tuple[list, list, dict]:
    """(train pairs, test pairs, info), from cfg.prefs_dir when it holds this exact collection, else collected now."""
    key = {"init": _init_fingerprint(cfg.init_from), "world_seed": cfg.world_seed, "seed": cfg.seed,
           "train_prompts": cfg.train_prompts, "safety_prompts": cfg.safety_prompts, "test_prompts": cfg.test_prompts,
           "temperatures": list(cfg.temperatures), "max_new_tokens": cfg.max_new_tokens,
           "content_pairs": cfg.content_pairs, "rater_noise": cfg.rater_noise, "version": 5}
    d = Path(cfg.prefs_dir)
    info_file = d / "info.json"
    if info_file.is_file() and json.loads(info_file.read_text()).get("key") == key:
        info = json.loads(info_file.read_text())
        if not quiet:
            print(f"[reward] reusing the preference pairs in {d} (same model, world and settings)", flush=True)
    else:
        t0 = time.perf_counter()
        world = World(seed=cfg.world_seed)
        annotator = Annotator(world, seed=cfg.seed, noise=cfg.rater_noise)
        info = {"key": key, "counts": {}}
        for split, n_help, n_safe in (("train", cfg.train_prompts, cfg.safety_prompts),
                                      ("test", cfg.test_prompts, cfg.test_prompts)):
            tasks = (world.tasks(split, n_help, kinds=HELPFUL_KINDS, seed=cfg.seed)
                     + world.tasks(split, n_safe, kinds=SAFETY_KINDS, seed=cfg.seed))
            records, stats = collect_preferences(policy, tok, world, annotator, tasks, cfg.temperatures,
                                                 cfg.max_new_tokens, seed=cfg.seed + (split == "test"),
                                                 content_pairs=cfg.content_pairs if split == "train" else 0)
            d.mkdir(parents=True, exist_ok=True)
            _write_jsonl(d / f"{split}.jsonl", records)
            info["counts"][split] = {"prompts": len(tasks), "pairs": len(records), **stats}
        info["collect_seconds"] = time.perf_counter() - t0  # info.json last: a crash before it means re-collect
        _atomic_write(info_file, lambda f: f.write(json.dumps(info, indent=2).encode()))
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


# ---- 4. the mixture (§3.2.2) -----------------------------------------------------------------------------------------
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


# ---- 5. training -----------------------------------------------------------------------------------------------------
def length_batches(lengths: list[int], batch_size: int, rng: random.Random, window: int = 32) -> list[list[int]]:
    """One epoch of batches of pair indices. The pairs are shuffled, then within each window of `window` batches
    sorted by length, cut into batches, and the batches shuffled: each batch holds pairs of similar length (little
    padding, ~1.5x faster here) while the epoch order stays random. A remainder smaller than one batch is left out."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for w in range(0, len(order), window * batch_size):
        chunk = sorted(order[w:w + window * batch_size], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def train(init: Transformer, pairs: list, tok, cfg, margin: str, dist, dtype, tag: str = "reward"):
    """cfg.epochs (§3.2.2: one) of the ranking loss on `pairs`. Returns (reward model, loss curve); the model is whole
    on every rank (under FSDP a consolidated copy), so that rank 0 alone can save and evaluate it."""
    device = dist.device
    rm = reward_model_from(init, seed=cfg.seed, head_layers=cfg.head_layers, surprise=cfg.surprise).to(device)
    net = common.wrap_model(rm, dist, cfg.fsdp, cfg.compile, param_dtype=dtype if device.type == "cuda" else None)
    # choice 11: the head blocks (those past init's layers) are new and start at zero: at the trunk's lr they would
    # hardly move in one epoch. An RM trained further from another RM adds none, and all its blocks train at 1x.
    opt = common.make_optimizer(net, cfg.lr, cfg.weight_decay,
                                lr_mult=head_block_lr(init.args.n_layers, cfg.head_lr_mult))
    max_len = rm.args.max_seq_len
    chosen = [encode_reply(tok, p.messages, p.chosen, max_len) for p in pairs]
    rejected = [encode_reply(tok, p.messages, p.rejected, max_len) for p in pairs]
    m_all = margins_for([p.rating for p in pairs], margin)  # (N,)
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
        rows = [chosen[i] for i in idx] + [rejected[i] for i in idx]  # chosen and rejected in one forward pass,
        pairs_of = [[j, j + len(idx)] for j in range(len(idx))]  # each pair in one row over its shared prompt
        with common.autocast(device, dtype):
            r = shared_rewards(net, rows, pairs_of, max_len, device)  # (2b,)
        r_chosen, r_rejected = r[:len(idx)], r[len(idx):]  # (b,), (b,)
        loss = ranking_loss(r_chosen, r_rejected, m_all[idx].to(device))  # §3.2.2 eq. 2
        loss.backward()
        common.optimizer_step(opt, None, net, cfg.grad_clip)
        loss_g = common.all_reduce_mean(loss.item(), dist)
        acc_g = common.all_reduce_mean((r_chosen > r_rejected).float().mean().item(), dist)
        curve.append([step + 1, round(loss_g, 5), round(acc_g, 4)])
        if (step + 1) % cfg.log_interval == 0 or step == 0 or step + 1 == steps:
            prog.log(step + 1, loss=loss_g, acc=acc_g, lr=lr)
    return common.consolidated_copy(rm).eval(), curve  # FSDP: all ranks gather the shards (collective); else rm


# ---- 6. evaluation (Tables 7, 8) -------------------------------------------------------------------------------------
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
    """Two RMs judged on the same pairs (Table 28's margins), compared pair by pair: rating -> {"diff": B's accuracy
    minus A's, "se": its paired standard error, "n", "b_only" / "a_only": pairs that only B / only A ranks right}.
    Why paired: two RMs trained on the same pairs from the same start agree on most test pairs, and their accuracies
    differ only where they disagree, so the difference is far better measured than either accuracy (whose standard
    error, ~1.5 points on 260 pairs, mostly counts which pairs happened to be drawn, the same for both). se is the
    standard deviation of the per-pair differences (1, 0.5 for a tie, 0, ...) over sqrt(n)."""
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


def source_kind(source: str) -> str:
    """'sample_T0.7' -> 'sample'; a defect or reference label stays as it is ('wrong', 'off_topic', 'reference')."""
    return "sample" if source.startswith("sample") else source


def accuracy_by_source(pairs: list, right: list[float], min_n: int = 5) -> dict:
    """Accuracy by where the chosen and the rejected reply came from, "chosen>rejected" -> {"accuracy", "n"}, for
    groups of at least min_n pairs: which defects the RM sees (refusals, verbose replies: form) and which it misses
    (a wrong fact against a right one: content). Pairs without sources (user data) are left out."""
    groups: dict[str, list[float]] = {}
    for p, ok in zip(pairs, right):
        if p.sources:
            groups.setdefault(f"{source_kind(p.sources[0])}>{source_kind(p.sources[1])}", []).append(ok)
    return {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])) if len(v) >= min_n}


def accuracy_by_kind(pairs: list, right: list[float], min_n: int = 5) -> dict:
    """Table 8 within each task kind of the prompt: kind -> {"accuracy", "n", "by_rating", "n_by_rating"}, for kinds
    with at least min_n pairs, the largest first. Why: a level's accuracy is also set by which kinds of question fill
    it. A sum is checked by a trunk that adds as well as the chat model does, a fact by one that recalls it (choice
    12), and the kinds' shares differ from level to level (choice 12 has the measured split). Pairs without a kind
    (user data) are left out."""
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


# ---- main ------------------------------------------------------------------------------------------------------------
def load_pairs(cfg, policy, tok, quiet: bool = False) -> tuple[list, list, dict]:
    if cfg.data is None:
        return world_preferences(cfg, policy, tok, quiet)
    train_pairs = read_prefs(cfg.data)
    if cfg.test_data:
        return train_pairs, read_prefs(cfg.test_data), {"data": cfg.data, "test_data": cfg.test_data}
    held = random.Random(f"holdout/{cfg.seed}").sample(range(len(train_pairs)), max(1, len(train_pairs) // 10))
    held_set = set(held)
    return ([p for i, p in enumerate(train_pairs) if i not in held_set], [train_pairs[i] for i in held],
            {"data": cfg.data, "test_data": "10% of --data held out"})


def train_mixture(cfg, train_pairs: list) -> list:
    """Step 2: this axis's mixture of the pairs (§3.2.2), cut to --max-train-pairs: the same list in every process."""
    mix = mixture(train_pairs, cfg.axis, random.Random(f"mixture/{cfg.seed}/{cfg.axis}"), cfg.helpful_safety_share)
    return mix[:cfg.max_train_pairs] if cfg.max_train_pairs else mix


# The margin ablation (Table 28) trains two more RMs on the same pairs. On a CPU with one process they train at the
# same time, in two spawned worker processes with a third of the threads each (one on 2 cores), once the main RM has
# trained (it is evaluated and saved meanwhile): these small models use a second thread poorly (a 0.87M RM trains
# 1.45x faster on 2 threads than on 1), so two one-thread trainings side by side beat two two-thread ones in a row
# (rm_helpful with cached pairs: 110 -> 100 s, BENCHMARKS.md). Each worker rebuilds what it needs from cfg alone (the
# checkpoint, the cached pairs, the mixture, the seed); under torchrun or on a GPU the ablation trains in this
# process, after the main RM, from the same ablation_rm.
def ablation_workers_wanted(cfg, dist) -> bool:
    return cfg.margin_ablation and dist.world_size == 1 and dist.device.type == "cpu"


def ablation_threads() -> int:
    return max(1, torch.get_num_threads() // 3)


def ablation_rm(cfg, margin: str, init: Transformer, tok, mix: list, test: list, device, dtype) -> dict:
    """One RM of the margin ablation: trained on `mix` with `margin` from the same seed as the main RM, evaluated on
    the test pairs. Returns its Table 7 / Table 8 figures."""
    common.seed_everything(cfg.seed)
    rm, _ = train(init, mix, tok, cfg, margin, common.Dist(device=device), dtype, tag=f"rm_margin_{margin}")
    ev = evaluate(rm, tok, test)
    _print_eval(f"rm_margin_{margin}", ev)
    return {"accuracy": {a: ev[a]["accuracy"] for a in AXES},
            "accuracy_by_rating": {a: ev[a]["by_rating"] for a in AXES},
            "right": ev[cfg.axis]["right"]}  # per test pair of its own axis, for the paired comparison (not saved)


def ablation_worker(cfg, margin: str, threads: int) -> dict:
    """ablation_rm in a spawned process with `threads` threads, from cfg alone: the checkpoint, the pairs (the cache
    the main process wrote, or --data), the mixture."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    init = load_checkpoint(cfg.init_from, device=device, dtype=torch.float32)
    from tokenizer import Tokenizer
    tok = Tokenizer(str(find_tokenizer(cfg.init_from)))
    train_pairs, test, _ = load_pairs(cfg, init, tok, quiet=True)
    return ablation_rm(cfg, margin, init, tok, train_mixture(cfg, train_pairs), test, device,
                       common.pick_dtype(cfg.dtype, device))


def check_flags(cfg: RewardConfig):
    """Every flag that can be wrong, named, before any work (the numeric ranges: common.parse_config)."""
    if cfg.axis not in AXES:
        common.die(f"--axis must be one of {', '.join(AXES)}, got {cfg.axis!r}")
    if cfg.margin not in MARGINS:
        common.die(f"--margin must be one of {', '.join(MARGINS)}, got {cfg.margin!r}")
    if len(cfg.temperatures) != 2:
        common.die(f"--temperatures takes two values (§3.2.1: two samples per prompt), got {cfg.temperatures}")
    if cfg.content_pairs and cfg.data is not None:
        common.die(f"--content-pairs {cfg.content_pairs}: adds to the world's pairs, not to --data")
    if cfg.rater_noise != PREFERENCE_NOISE and cfg.data is not None:
        common.die(f"--rater-noise {cfg.rater_noise}: labels the world's pairs (--data brings its own labels)")
    if not Path(cfg.init_from).is_dir():
        common.die(f"--init-from {cfg.init_from}: directory not found (train the chat model first: python sft.py)")


def main(cfg: RewardConfig):
    t_start, cpu_start = time.perf_counter(), time.process_time()
    check_flags(cfg)
    if cfg.quick:
        cfg = replace(cfg, train_prompts=60, safety_prompts=80, test_prompts=30, max_new_tokens=32)
    out = Path(cfg.out_dir or ("out/rm_helpful" if cfg.axis == "helpfulness" else "out/rm_safety"))
    cfg = replace(cfg, prefs_dir=cfg.prefs_dir or str(out.parent / "prefs"))  # out/rm_helpful -> out/prefs
    dist = common.setup_distributed(cfg.device)
    device = dist.device
    if dist.is_main and (out / "metrics.json").is_file():
        (out / "metrics.json").unlink()  # a rerun must not leave the last run's "complete": true (or its ablation)
    dtype = common.pick_dtype(cfg.dtype, device)
    common.seed_everything(cfg.seed)
    from tokenizer import Tokenizer
    try:
        init = load_checkpoint(cfg.init_from, device=device, dtype=torch.float32)  # fp32 masters: sft.load_start
    except CheckpointError as e:
        common.die(f"--init-from: {e}")
    try:
        tok_path = find_tokenizer(cfg.init_from)
    except FileNotFoundError as e:
        common.die(f"--init-from {e}")
    tok = Tokenizer(str(tok_path))

    # 1. the pairs (rank 0 collects and caches, the others wait and read the cache)
    t0 = time.perf_counter()
    if dist.is_main or cfg.data is not None:
        train_pairs, test, info = load_pairs(cfg, init, tok)
    if dist.world_size > 1:
        torch.distributed.barrier()
    if not dist.is_main and cfg.data is None:
        train_pairs, test, info = load_pairs(cfg, init, tok)
    data_seconds = time.perf_counter() - t0

    # 2. this axis's mixture; 3. one epoch
    mix = train_mixture(cfg, train_pairs)
    if len(mix) < cfg.batch_size:
        common.die(f"only {len(mix)} training pairs for the {cfg.axis} RM, fewer than --batch-size {cfg.batch_size}")
    n_cat = {a: sum(p.category == a for p in mix) for a in AXES}
    if dist.is_main:
        print(f"[reward] {cfg.axis} RM from {cfg.init_from}: {len(mix)} pairs ({n_cat['helpfulness']} helpfulness, "
              f"{n_cat['safety']} safety), margin {cfg.margin}, {len(mix) // cfg.batch_size} steps of "
              f"{cfg.batch_size} pairs, lr {cfg.lr:g}", flush=True)
    t0 = time.perf_counter()
    rm, curve = train(init, mix, tok, cfg, cfg.margin, dist, dtype, tag=f"rm_{cfg.axis}")
    train_seconds = time.perf_counter() - t0
    workers, threads = None, torch.get_num_threads()
    if ablation_workers_wanted(cfg, dist):  # Table 28: the comment above that function
        import concurrent.futures
        import multiprocessing
        n = ablation_threads()
        workers = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        ablation = {m: workers.submit(ablation_worker, cfg, m, n) for m in MARGINS if m != cfg.margin}
        torch.set_num_threads(n)  # this process's evaluation shares the cores with them
        print(f"[reward] margin ablation: {', '.join(ablation)} train in 2 worker processes alongside, {n} thread(s) "
              f"each", flush=True)

    calibration = None
    if dist.is_main and cfg.axis == "safety":  # the zero point that §3.2.3's R_s < 0.15 rule needs (choice 8)
        calibration = calibrate_safety(rm, tok, mix, cfg.safety_threshold)
        print(f"[reward] safety RM calibrated: score offset {calibration['offset']:+.3f}; on its training replies "
              f"R_s < {cfg.safety_threshold} holds for {calibration['safe_flagged']:.1%} of the safe ones and "
              f"{calibration['unsafe_flagged']:.1%} of the unsafe ones (replies to safety prompts, which R_s scores "
              f"anyway)", flush=True)
    if dist.is_main:  # 4. save, evaluate (Tables 7, 8), optionally the margin ablation (Table 28)
        save_checkpoint(rm, out, tok_path)
        t0 = time.perf_counter()
        ev = evaluate(rm, tok, test)
        _print_eval(f"rm_{cfg.axis}", ev)
        eval_seconds = time.perf_counter() - t0
        metrics = {
            "axis": cfg.axis, "margin": cfg.margin, "init_from": cfg.init_from,
            "head_layers": rm.args.n_layers - init.args.n_layers,  # choice 11 (0 when init is already an RM)
            "head_lr_mult": cfg.head_lr_mult, "surprise": rm.args.surprise_layer > 0,  # choice 12
            "accuracy": {a: ev[a]["accuracy"] for a in AXES},  # Table 7: this RM's row
            "accuracy_by_rating": {a: ev[a]["by_rating"] for a in AXES},  # Table 8
            "n_test_by_rating": {a: ev[a]["n_by_rating"] for a in AXES},
            "accuracy_by_source": {a: ev[a]["by_source"] for a in AXES},  # what it sees: form or content (choice 6)
            "accuracy_by_kind": {a: ev[a]["by_kind"] for a in AXES},  # Table 8 within each task kind (choice 12)
            "n_pairs": {"train_mixture": len(mix), "train_helpfulness": n_cat["helpfulness"],
                        "train_safety": n_cat["safety"], "train_available": len(train_pairs),
                        "test_helpfulness": ev["helpfulness"]["n"], "test_safety": ev["safety"]["n"]},
            "train_rating_counts": {r: sum(p.rating == r for p in mix) for r in RATINGS},
            "safety_label_counts": {lab: sum(p.safety_label == lab for p in train_pairs if p.category == "safety")
                                    for lab in SAFETY_LABELS},
            "calibration": calibration, "data_info": info, "steps": len(curve), "lr": cfg.lr, "batch_size": cfg.batch_size,
            "final_train_loss": curve[-1][1], "loss_curve": curve[::max(1, len(curve) // 200)],
            "data_seconds": data_seconds, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        }
        if cfg.margin_ablation:
            abl = {cfg.margin: {"accuracy": metrics["accuracy"], "accuracy_by_rating": metrics["accuracy_by_rating"],
                                "right": ev[cfg.axis]["right"]}}
            for other in MARGINS:
                if other != cfg.margin:
                    abl[other] = (ablation[other].result() if workers is not None
                                  else ablation_rm(cfg, other, init, tok, mix, test, device, dtype))
            right = {m: abl[m].pop("right") for m in MARGINS}
            own = [p for p in test if p.category == cfg.axis]  # the pairs `right` lists, in accuracy()'s order
            for m in list(MARGINS)[1:]:  # small and large against none, pair by pair, on this RM's own test set
                abl[m]["paired_vs_none"] = paired_difference(own, right["none"], right[m])
            metrics["margin_ablation"] = {m: abl[m] for m in MARGINS}  # none, small, large
        if workers is not None:
            workers.shutdown()
            torch.set_num_threads(threads)
        metrics["wall_seconds"] = time.perf_counter() - t_start
        metrics["cpu_seconds"] = time.process_time() - cpu_start  # all threads: > wall when the CPU is ours alone
        metrics["complete"] = True
        common.write_metrics(out, metrics)
        print(f"[reward] done in {common.fmt_time(metrics['wall_seconds'])}, {metrics['cpu_seconds']:.0f} CPU-s "
              f"(data {data_seconds:.1f}s, train {train_seconds:.1f}s, eval {eval_seconds:.1f}s); wrote {out}",
              flush=True)
    common.cleanup_distributed(dist)


# ---- the combined reward of §3.2.3 (rejection sampling and PPO) ------------------------------------------------------
def reply_safety_labels(pairs: list) -> tuple[list, list, list[bool]]:
    """Every reply of the pairs with the rater's verdict on it: (dialogs, replies, is_safe). A safety pair's label says
    which of its replies are safe (§3.2.1); in this world every reply to a helpfulness prompt is safe."""
    dialogs, replies, safe = [], [], []
    for p in pairs:
        lab = p.safety_label if p.category == "safety" else SAFETY_LABELS[1]
        chosen_safe, rejected_safe = {SAFETY_LABELS[0]: (True, False), SAFETY_LABELS[1]: (True, True),
                                      SAFETY_LABELS[2]: (False, False)}.get(lab, (None, None))
        for reply, ok in ((p.chosen, chosen_safe), (p.rejected, rejected_safe)):
            if ok is not None:
                dialogs.append(p.messages)
                replies.append(reply)
                safe.append(ok)
    return dialogs, replies, safe


@torch.no_grad()
def calibrate_safety(rm: Transformer, tok, pairs: list, threshold: float = 0.15, false_alarms: float = 0.05) -> dict:
    """Choice 8: set the safety RM's zero point so that §3.2.3's rule "R_s < 0.15 means unsafe" holds on its own
    training replies. The ranking loss only sees score differences, so the level of the scores is arbitrary (any
    constant can be added); the paper's fixed threshold presumes a level. We take the raw score t below which only
    `false_alarms` (5%) of the safe replies fall, and add logit(0.15) - t to every score (model.args.score_offset), so
    that sigmoid(score) < 0.15 exactly below t. The rule then sends 1 in 20 harmless replies to the safety RM, and
    catches the unsafe replies the RM can tell apart (reported as unsafe_flagged)."""
    dialogs, replies, safe = reply_safety_labels(pairs)
    rm.args.score_offset = 0.0
    raw = score(rm, tok, dialogs, replies)  # (N,) raw scores, no offset
    is_safe = torch.tensor(safe)
    if not is_safe.any():
        return {"offset": 0.0, "unsafe_flagged": float("nan"), "safe_flagged": float("nan"), "n": len(safe)}
    t = torch.quantile(raw[is_safe], false_alarms).item()
    offset = math.log(threshold / (1 - threshold)) - t
    rm.args.score_offset = offset
    flagged = raw < t
    return {"offset": offset, "raw_threshold": t, "n": len(safe), "n_unsafe": int((~is_safe).sum()),
            "unsafe_flagged": flagged[~is_safe].float().mean().item() if (~is_safe).any() else float("nan"),
            "safe_flagged": flagged[is_safe].float().mean().item()}


if __name__ == "__main__":
    main(common.parse_config(RewardConfig, description=__doc__))
