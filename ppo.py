"""PPO with a KL penalty to the initial policy (paper §3.2.3): the RLHF stage that follows rejection sampling.

The objective: maximize E_{p ~ D, g ~ pi_theta}[R(g | p)] with
    R(g | p) = R~c(g | p) - beta * KL(pi_theta(g | p) || pi_0(g | p))       pi_0: the policy PPO starts from
    R_c = R_s if IS_SAFETY(p) or R_s(g | p) < 0.15 else R_h       (the safety RM first on risky prompts or replies)
    R~c = WHITEN(LOGIT(R_c))                                        (undo the sigmoid, then normalize)
§3.2.3 trains with AdamW (weight decay 0.1), gradient clip 1.0, constant lr 1e-6, batch 512, minibatch 64 (one step
each), PPO clip 0.2, beta 0.01 (7B/13B) or 0.005 (34B/70B), 200-400 iterations with early stopping on held-out prompts.
One iteration, as numbered in `ppo_iteration`:
    1. rollout   one reply per prompt, plain temperature sampling (no top-p): the recorded log-probs are exactly
                 those of the distribution the loss differentiates;
    2. score     both RMs score each reply; the 0.15 rule picks R_c; logit, whiten;
    3. shape     per-token reward -beta * (logprob - ref_logprob), plus R~c on the reply's last token;
    4. GAE       advantages from the value model (gamma 1, lambda 0.95), whitened over the batch's reply tokens;
    5. optimize  minibatches, one gradient step each: clipped policy loss (0.2), clipped value loss;
    6. log       reward, KL, clip fraction, value loss, entropy, reply length; held-out scores every few iterations.

  python ppo.py                       # policy from out/rs (or --init-from), reward models from out/rm_*
  python ppo.py --kl-coef 0           # no penalty: watch the policy drift and game the reward models
  torchrun --nproc_per_node=2 ppo.py  # data parallel, the same run as one process (the last section of this file)
  torchrun --nproc_per_node=8 ppo.py --device cuda --fsdp   # policy and value model sharded (FSDP2)

Choices where the paper is silent:
  1. KL estimator k1 = logprob - ref_logprob per sampled token, in the reward and in the logs alike: the logs show what
     the reward penalized. Its batch mean is unbiased and may dip below 0 by noise. pi_0 runs at the precision of the
     policy's forward (fp32, or FSDP's bf16 compute), so the KL is exactly 0 before the first update.
  2. Value model: a separate scalar-head model initialized from the helpfulness RM, whose trunk already reads replies
     for quality, so its estimates start in the reward's units (as InstructGPT).
  3. Whitening: R~c over the batch's replies and the advantages over its reply tokens, every iteration.
  4. Model selection (§3.4.1: checkpoints were picked by the latest reward models): every --eval-interval iterations
     (and before the first) greedy replies to held-out prompts are scored by the RMs, the mean R_c; the best iterate
     is kept (the start included, so PPO must beat it; --no-eval-start leaves it out), and training stops after
     --patience evaluations without gain. The annotator's view of the same replies is logged beside it, never used:
     where the two part, PPO games the RMs (reward hacking). A run that keeps its start says so.
  5. Miniature scale: batch 64, minibatch 16, constant lr 5e-5 (larger, the policy drifts far from pi_0 and games the
     RMs within a few dozen iterations), replies up to 64 tokens; beta 0.01 as the 7B's.
  6. A reply cut off at the length limit (no EOS) is scored at a state the RMs never saw, so its score is arbitrary:
     it loses a fixed 1.0 (one standard deviation of R~c), as TRL's missing_eos_penalty, so PPO cannot learn to ramble.
  7. Minibatches: the batch is split once per iteration (its random order); later epochs visit the same minibatches
     in a new order rather than reshuffling rows, which keeps N processes equal to one (the default is one epoch).
  8. Aid, off by default: --select-by annotator lets the raters' view pick the iterate and stop early (the paper's
     humans validated finished versions, §3.4.1, but picked no checkpoint inside PPO); the RMs' view is logged instead.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import common
import rlhf
from annotator import Annotator
from generate import chat_generate, generate, load_model_and_tokenizer
from model import CheckpointError, load_checkpoint
from rlhf import logit
from world import World


@dataclass
class PPOConfig:
    iterations: int = 40  # §3.2.3: 200-400 iterations (with early stopping)
    batch_size: int = 64  # prompts per iteration (§3.2.3: 512)
    minibatch_size: int = 16  # one gradient step per minibatch (§3.2.3: 64)
    lr: float = 5e-5  # constant (§3.2.3: 1e-6 for the 7B-70B models)
    kl_coef: float = 0.01  # beta (§3.2.3: 0.01 for 7B/13B, 0.005 for 34B/70B)
    clip: float = 0.2  # §3.2.3: PPO clip threshold
    safety_threshold: float = 0.15  # §3.2.3: use R_s when it is below this
    weight_decay: float = 0.1  # §3.2.3: AdamW as pretraining
    grad_clip: float = 1.0  # §3.2.3
    # -- advanced --
    init_from: str = "out/rs"  # the policy to start from (also the frozen reference pi_0)
    rm_helpful: str = "out/rm_helpful"  # helpfulness reward model (frozen); also initializes the value model
    rm_safety: str = "out/rm_safety"  # safety reward model (frozen)
    sft: str = "out/sft"  # the baseline for the final win rate
    out_dir: str = "out/ppo"
    ppo_epochs: int = 1  # passes over each iteration's rollouts
    value_lr: float = 1e-4  # the value model's learning rate
    value_clip: float = 0.2  # clip of the value update around the rollout's values
    gamma: float = 1.0  # no discount within a reply
    lam: float = 0.95  # GAE lambda
    temperature: float = 1.0  # rollout sampling temperature (plain sampling, no top-p)
    max_new_tokens: int = 64
    missing_eos_penalty: float = 1.0  # subtracted from the whitened score of a reply without EOS (choice 6)
    eval_interval: int = 5  # iterations between held-out evaluations (early stopping)
    patience: int = 2  # evaluations without improvement before stopping
    select_by: str = "rm"  # held-out judge that picks the iterate: "rm" (choice 4) or the aid "annotator" (choice 8)
    eval_start: bool = True  # choice 4: the starting policy is a candidate; --no-eval-start keeps a trained iterate
    n_eval: int = 96  # held-out prompts for early stopping
    n_test: int = 200  # test prompts for the final win rate against SFT (0: none; pipeline.py's eval_ppo_vs_sft)
    world_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    fsdp: bool = False  # under torchrun: FSDP2 for the policy and the value model instead of DDP
    quick: bool = False  # a seconds-long smoke run
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="batch_size minibatch_size ppo_epochs lr value_lr clip value_clip temperature max_new_tokens "
                 "grad_clip eval_interval patience n_eval",
        non_negative="iterations kl_coef missing_eos_penalty weight_decay n_test world_seed seed",
        share="gamma lam", open_share="safety_threshold")


# ---- the pieces of the objective, each a small function the tests check by hand --------------------------------------
def whiten(x: torch.Tensor, mask: Optional[torch.Tensor] = None, shift_mean: bool = True, eps: float = 1e-8,
           dist: Optional[common.Dist] = None):
    """(x - mean) / std over the entries where mask is 1 (all entries without a mask), choice 3. dist (torchrun): the
    mean and variance of EVERY rank's entries together, so N processes whiten as one holding the whole batch."""
    if mask is None:
        mask = torch.ones_like(x)
    n, total = common.all_reduce_sum(torch.stack([mask.sum(), (x * mask).sum()]), dist)  # global count and sum
    mean = total / n
    var = common.all_reduce_sum((((x - mean) * mask) ** 2).sum(), dist) / n  # two passes, as one process computes it
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """k1 per-token KL estimate log pi(a|s) - log pi_0(a|s) (B, T), zero outside the reply (choice 1)."""
    return (logprobs - ref_logprobs) * response_mask


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """Per-token rewards (B, T): -beta * KL on every reply token, plus the sequence score on the LAST reply token
    (found from the mask's length, so it is right for replies of any length, with or without EOS)."""
    rewards = -kl_coef * kl
    last = response_mask.sum(1).long() - 1  # (B,) index of each reply's last token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over reply tokens. rewards, values, mask (B, T), replies left-aligned.
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};  V after the last token is 0.
    Returns (advantages, returns = advantages + values), both zero outside the reply."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = response_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m
        next_value = values[:, t] * m  # past a reply's end: value 0, advantage 0
        next_adv = adv[:, t]
    return adv, (adv + values) * response_mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float, n_tokens=None):
    """PPO's clipped surrogate: -min(ratio A, clip(ratio, 1-eps, 1+eps) A), summed over reply tokens and divided by
    n_tokens (default mask.sum(): their mean; torchrun: the global minibatch's count). All (B, Tr).
    Returns (loss, fraction of tokens where the clip was active, over the same n_tokens)."""
    n = mask.sum() if n_tokens is None else n_tokens
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / n
    clip_frac = (((ratio - 1).abs() > clip).float() * mask).sum() / n
    return loss, clip_frac


def value_loss(values, old_values, returns, mask, clip: float, n_tokens=None):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old V + clip(V - old V, -eps, eps): the value may move
    at most eps per iteration from what produced the advantages. Summed over reply tokens / n_tokens, as policy_loss."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


# ---- batching rollouts ----------------------------------------------------------------------------------------------
def pad_rollouts(prompts: list[list[int]], replies: list[list[int]], device):
    """Right-padded rows prompt + reply (B, L), and for each reply token j the column of the logits that predict it
    (len(prompt) - 1 + j) as index (B, Tr), with the response mask (B, Tr), Tr = longest reply."""
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, replies))
    Tr = max(1, max(len(r) for r in replies))
    tokens = torch.zeros((B, L), dtype=torch.long, device=device)
    index = torch.zeros((B, Tr), dtype=torch.long, device=device)
    mask = torch.zeros((B, Tr), dtype=torch.float32, device=device)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        tokens[b, :len(p) + len(r)] = torch.tensor(p + r, device=device)
        index[b] = torch.arange(len(p) - 1, len(p) - 1 + Tr, device=device).clamp(max=L - 1)
        mask[b, :len(r)] = 1.0
    return tokens, index, mask


def policy_forward(policy, tokens, index, temperature: float):
    """Log-probs (B, Tr) of each reply token and the policy's entropy (B, Tr) at those positions."""
    logits, _ = policy(tokens)  # (B, L, V) fp32
    logits = logits.gather(1, index[:, :, None].expand(-1, -1, logits.size(-1))) / temperature  # (B, Tr, V)
    logp_all = F.log_softmax(logits, -1)
    targets = tokens.gather(1, (index + 1).clamp(max=tokens.size(1) - 1))  # (B, Tr) the reply tokens
    logp = logp_all.gather(-1, targets[:, :, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def value_forward(value_model, tokens, index):
    """V(s) (B, Tr) for the state before each reply token: the scalar head at the column that predicts it."""
    values, _ = value_model(tokens)  # (B, L)
    return values.gather(1, index)


# ---- one iteration ---------------------------------------------------------------------------------------------------
RewardFn = Callable[[list, list], torch.Tensor]  # (tasks, reply token lists) -> (B,) R~c, before the KL term


@dataclass
class PPOModels:
    """The models PPO runs and the optimizers of the two it trains. policy_net / value_net: the DDP- or FSDP-wrapped
    models the training forward runs through (None: the models themselves); gen_dtype: the rollout weights' dtype."""
    policy: torch.nn.Module  # pi_theta, trained
    ref_policy: torch.nn.Module  # pi_0, frozen
    value_model: torch.nn.Module  # V, trained (choice 2)
    pol_opt: torch.optim.Optimizer
    val_opt: torch.optim.Optimizer
    policy_net: Optional[torch.nn.Module] = None
    value_net: Optional[torch.nn.Module] = None
    gen_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        self.policy_net, self.value_net = self.policy_net or self.policy, self.value_net or self.value_model


@dataclass
class Batch:
    """This rank's prompts of one iteration, in minibatch order (the last section), and the rollout's sampling
    generator: one torch.Generator, or one per row (rollout_generators)."""
    tasks: list  # what the reward function reads (messages, is_safety)
    prompts: list[list[int]]  # token ids
    gen: object


@dataclass
class Rollouts:
    """Steps 1-4's results: tokens (B, L), prompt + reply right-padded; the rest (B, Tr), one column per reply token
    (pad_rollouts), with the behaviour policy's logprobs and values before any update."""
    tokens: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor  # k1 per reply token (choice 1), 0 outside the reply


def ppo_iteration(m: PPOModels, batch: Batch, reward_fn: RewardFn, cfg: PPOConfig, eos_id: int,
                  dist: Optional[common.Dist] = None, shuffle: Optional[random.Random] = None) -> dict:
    """One PPO iteration on this rank's rows. shuffle: a random.Random, the same on every rank, that reorders the
    minibatches in epochs after the first (None: Python's global one). Returns the statistics of the GLOBAL batch."""
    # 1.-4. rollout, score, shape, GAE: from the policy as it is now (the behaviour policy)
    ro, scores, t_roll = collect_rollouts(m, batch, reward_fn, cfg, eos_id, dist)
    # 5. optimize: minibatches, one gradient step each for the policy and the value model
    parts = ppo_epochs(m, ro, cfg, dist, shuffle)
    # 6. log: the global batch's statistics
    return iteration_stats(parts, ro.mask, scores, ro.kl, t_roll, dist)


def collect_rollouts(m: PPOModels, batch: Batch, reward_fn: RewardFn, cfg: PPOConfig, eos_id: int,
                     dist: Optional[common.Dist] = None) -> tuple[Rollouts, torch.Tensor, float]:
    """Steps 1-4, before any update: (the rollouts, the scores (B,) with the missing-EOS penalty, rollout seconds)."""
    device = next(m.policy.parameters()).device
    # 1. rollout: one reply per prompt
    t0 = time.perf_counter()
    replies = rollout(m.policy, batch.prompts, cfg, eos_id, batch.gen, m.gen_dtype)
    t_roll = time.perf_counter() - t0
    tokens, index, mask = pad_rollouts(batch.prompts, replies, device)  # (B, L), (B, Tr), (B, Tr)
    with torch.no_grad():
        old_logprobs, _ = policy_forward(m.policy, tokens, index, cfg.temperature)
        ref_logprobs, _ = policy_forward(m.ref_policy, tokens, index, cfg.temperature)
        old_values = value_forward(m.value_model, tokens, index) * mask
        # 2. score: R~c (B,); a reply cut off at the length limit (no EOS) loses missing_eos_penalty (choice 6)
        scores = reward_fn(batch.tasks, replies).to(device)
        unfinished = torch.tensor([r[-1] != eos_id for r in replies], device=device)
        scores = scores - cfg.missing_eos_penalty * unfinished.float()
        # 3. shape: -beta * KL per token, the score on the last reply token
        kl = kl_penalty(old_logprobs, ref_logprobs, mask)
        rewards = shape_rewards(scores, kl, mask, cfg.kl_coef)
        # 4. GAE: advantages, whitened over the reply tokens
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask, dist=dist)
    return Rollouts(tokens, index, mask, old_logprobs, old_values, advantages, returns, kl), scores, t_roll


def rollout(policy, prompts: list[list[int]], cfg: PPOConfig, eos_id: int, gen,
            gen_dtype: Optional[torch.dtype] = None) -> list[list[int]]:
    """Step 1: one reply per prompt, plain temperature sampling; an empty reply becomes [EOS], one token to carry its
    reward. Under FSDP the policy's full weights are gathered once for the whole phase (common.consolidated_copy) and
    freed on return: no all-gather per token."""
    full = common.consolidated_copy(policy, gen_dtype)  # the policy itself when it is not sharded
    replies, _ = generate(full, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, eos_id=eos_id,
                          logprobs=True, generator=gen)
    return [r if r else [eos_id] for r in replies]


def ppo_epochs(m: PPOModels, ro: Rollouts, cfg: PPOConfig, dist: Optional[common.Dist],
               shuffle: Optional[random.Random]) -> torch.Tensor:
    """Step 5: --ppo-epochs passes over the minibatches, one step each; minibatch k is this rank's rows k*M'..k*M'+M'-1,
    M' = minibatch_size / world size. Returns per step (S, 4) this rank's share of: policy loss, value loss, clip
    fraction, entropy."""
    world = dist.world_size if dist is not None else 1
    rows = cfg.minibatch_size // world  # this rank's rows per minibatch
    starts = list(range(0, ro.mask.size(0), rows))
    n_tok_mb = common.all_reduce_sum(torch.stack([ro.mask[s:s + rows].sum() for s in starts]), dist)  # (n_mb,) N_k
    parts = []
    for epoch in range(cfg.ppo_epochs):
        order = list(range(len(starts)))
        if epoch > 0:
            (shuffle or random).shuffle(order)  # choice 7: the same minibatches in a new order, the same on every rank
        for k in order:
            parts.append(ppo_step(m, ro, slice(starts[k], starts[k] + rows), n_tok_mb[k], cfg, world))
    return torch.stack(parts)


def ppo_step(m: PPOModels, ro: Rollouts, mb: slice, n: torch.Tensor, cfg: PPOConfig, world: int) -> torch.Tensor:
    """One gradient step of the policy, then of the value model, on minibatch rows `mb`. The losses are sums over reply
    tokens divided by n, the minibatch's token count (all ranks'), times world (why: the last section)."""
    logp, entropy = policy_forward(m.policy_net, ro.tokens[mb], ro.index[mb], cfg.temperature)  # (m, Tr) each
    pl, cf = policy_loss(logp, ro.logprobs[mb], ro.advantages[mb], ro.mask[mb], cfg.clip, n)
    (pl * world).backward()  # DDP / FSDP divide the summed gradients by world
    common.optimizer_step(m.pol_opt, None, m.policy, cfg.grad_clip)  # clip 1.0, step, clear
    v = value_forward(m.value_net, ro.tokens[mb], ro.index[mb])  # (m, Tr)
    vl = value_loss(v, ro.values[mb], ro.returns[mb], ro.mask[mb], cfg.value_clip, n)
    (vl * world).backward()
    common.optimizer_step(m.val_opt, None, m.value_model, cfg.grad_clip)
    return torch.stack([pl.detach(), vl.detach(), cf, (entropy.detach() * ro.mask[mb]).sum() / n]).float()


def iteration_stats(parts: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor, t_roll: float,
                    dist: Optional[common.Dist]) -> dict:
    """Step 6: the global batch's statistics from the ranks' partial sums: the losses averaged over the steps, score,
    KL, reply length, rollout throughput."""
    per_step = common.all_reduce_sum(parts, dist).mean(0).tolist()  # (4,) mean over the steps
    n_tok = mask.sum()
    totals = common.all_reduce_sum(torch.stack([torch.tensor(float(mask.size(0)), device=mask.device), n_tok,
                                                scores.sum(), kl.sum(), n_tok / max(t_roll, 1e-9)]), dist)
    rows, n_tok, score_sum, kl_sum, tok_per_sec = totals.tolist()
    out = dict(zip(("policy_loss", "value_loss", "clip_frac", "entropy"), per_step))
    out.update(score=score_sum / rows, kl=kl_sum / rows, kl_per_token=kl_sum / n_tok, reply_len=n_tok / rows,
               rollout_tokens_per_sec=tok_per_sec)  # the ranks' throughputs added
    return out


# ---- the reward models as the reward function, and the held-out judge ------------------------------------------------
def rm_reward_fn(rm_helpful, rm_safety, tok, threshold: float, stats: dict,
                 dist: Optional[common.Dist] = None) -> RewardFn:
    """R~c of this rank's replies, whitened with the statistics of the global batch (all ranks'); `stats` receives the
    global batch's mean R_c, the share of replies judged by the safety RM, and rlhf.safety_decides of the batch."""

    def fn(tasks, replies):
        is_safety = torch.tensor([bool(t.is_safety) for t in tasks])
        r_c, r_s = rlhf.combined_score(rm_helpful, rm_safety, tok, [t.messages for t in tasks], replies, is_safety,
                                       threshold)  # (B,) each, on the CPU
        used_safety = (is_safety | (r_s < threshold)).float()
        sd = rlhf.safety_decides(r_s, is_safety, threshold)  # this rank's rows: counts, added over the ranks below
        flagged = (sd["share_on_helpful"] or 0.0) * sd["helpful_prompts"]
        n, r_sum, used_sum, n_help, n_flag, n_safe = common.all_reduce_sum(torch.tensor(
            [float(len(r_c)), r_c.sum().item(), used_safety.sum().item(), float(sd["helpful_prompts"]), flagged,
             float(sd["safety_prompts"])], dtype=torch.float64), dist).tolist()
        stats["rm_reward"] = r_sum / n  # the sigmoid-scale reward, comparable across iterations
        stats["used_safety_rm"] = used_sum / n
        stats["safety_decides"] = {"helpful_prompts": round(n_help), "share_on_helpful": n_flag / n_help if n_help
                                   else None, "safety_prompts": round(n_safe)}
        return whiten(logit(r_c), dist=dist)  # R~c = WHITEN(LOGIT(R_c)), over the global batch
    return fn


def pooled_safety_decides(per_iteration: list[dict]) -> dict:
    """rlhf.safety_decides over every rollout of the run: the iterations' counts added, the share of all helpfulness
    prompts whose reward R_s set (not a mean of the iterations' shares)."""
    n = sum(d["helpful_prompts"] for d in per_iteration)
    flagged = sum((d["share_on_helpful"] or 0.0) * d["helpful_prompts"] for d in per_iteration)
    return {"scope": "PPO's rollouts, all iterations pooled", "helpful_prompts": n,
            "share_on_helpful": flagged / n if n else None,
            "safety_prompts": sum(d["safety_prompts"] for d in per_iteration)}


@torch.no_grad()
def heldout_scores(policy, tok, tasks, rms: tuple, cfg: PPOConfig, annotator: Annotator) -> dict:
    """Greedy replies to held-out prompts, scored two ways: "rm", the mean combined reward R_c (sigmoid scale) of the
    two RMs `rms` = (helpful, safety) (§3.4.1's model-based evaluation), and "annotator", the raters' mean overall
    utility of the same replies (helpfulness, minus 1 for an unsafe reply: §3.4's human evaluation in miniature)."""
    out = chat_generate(policy, tok, [t.messages for t in tasks], cfg.max_new_tokens)
    is_safety = torch.tensor([bool(t.is_safety) for t in tasks])
    r_c = rlhf.combined_score(*rms, tok, [t.messages for t in tasks], [r.tokens for r in out], is_safety,
                              cfg.safety_threshold)[0]
    judged = [annotator.score(t.messages, r.text) for t, r in zip(tasks, out)]
    return {"rm": r_c.mean().item(),
            "annotator": sum(j.helpfulness - (0.0 if j.safe else 1.0) for j in judged) / len(judged)}


# ---- the script ------------------------------------------------------------------------------------------------------
def main(cfg: PPOConfig):
    check_flags(cfg)
    dist = common.setup_distributed(cfg.device)
    check_batch_layout(cfg, dist.world_size)
    common.preflight(cfg.out_dir, dist, init_from=(cfg.init_from, "lm"), rm_helpful=(cfg.rm_helpful, "scalar"),
                     rm_safety=(cfg.rm_safety, "scalar"), sft=(cfg.sft if cfg.n_test else None, "lm"))
    device = dist.device
    common.seed_everything(cfg.seed)  # the same on every rank: nothing in a PPO step may depend on the rank
    m, tok, rms = load_models(cfg, dist, common.pick_dtype(cfg.dtype, device))
    world = World(seed=cfg.world_seed)
    train_tasks = world.tasks("train", seed=cfg.seed)
    eval_tasks = world.tasks("val", cfg.n_eval, seed=cfg.seed)
    rng = random.Random(f"ppo/{cfg.seed}")  # not seeded by the rank: every rank draws the same global batches
    # evals: every held-out evaluation, {"iteration", "rm", "annotator"} (iteration 0: the start; choice 4)
    log: dict = {"reward_by_iter": [], "kl_by_iter": [], "evals": [], "iters": []}
    best, best_it, bad = -math.inf, 0, 0
    out = Path(cfg.out_dir)
    t_start = time.perf_counter()
    prog = common.Progress("ppo", cfg.iterations, cfg.batch_size, 0.0, device, torch.float32,
                           enabled=dist.is_main, unit="prompts")
    annotator = Annotator(world, seed=cfg.seed)  # its view is logged beside the RMs'; it decides only as an aid

    def evaluate_and_keep(it: int) -> bool:
        """Held-out scores of the current policy; the best iterate so far is saved. Returns True to stop early."""
        nonlocal best, best_it, bad
        sc = heldout_scores(common.consolidated_copy(m.policy, m.gen_dtype), tok, eval_tasks, rms, cfg,
                            annotator)  # FSDP: full weights once
        sc = {k: common.all_reduce_mean(v, dist) for k, v in sc.items()}
        h = sc[cfg.select_by]  # "rm" (choice 4), or the aid "annotator" (choice 8)
        log["evals"].append({"iteration": it, "rm": sc["rm"], "annotator": sc["annotator"]})
        if dist.is_main:
            print(f"[ppo] iteration {it}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in sc.items())
                  + f" (best {cfg.select_by} {max(best, h):.4f})", flush=True)
        if h > best:
            best, best_it, bad = h, it, 0
            common.save_training_checkpoint(out, m.policy_net, m.policy, None, it, dist, tok.model_path)
            return False
        bad += 1
        if bad >= cfg.patience and dist.is_main:
            print(f"[ppo] early stop: no held-out improvement in {bad} evaluations", flush=True)
        return bad >= cfg.patience

    if cfg.eval_start:
        evaluate_and_keep(0)  # the starting policy is a candidate too: PPO must beat it to replace it
    for it in range(1, cfg.iterations + 1):
        tasks = rng.sample(train_tasks, cfg.batch_size)  # the global batch, the same on every rank, in random order
        rows = common.rank_shard(list(range(cfg.batch_size)), dist)  # this rank's rows of it (the last section)
        tasks = [tasks[g] for g in rows]
        batch = Batch(tasks, [tok.encode_dialog(t.messages)[0] for t in tasks],
                      rollout_generators(cfg.seed, it, rows, device))
        rstats: dict = {}
        s = ppo_iteration(m, batch, rm_reward_fn(*rms, tok, cfg.safety_threshold, rstats, dist), cfg, tok.eos_id,
                          dist, shuffle=rng)
        s.update(rstats)  # all global values already: equal on every rank
        log["iters"].append({"iter": it, **s})
        log["reward_by_iter"].append([it, s["rm_reward"]])
        log["kl_by_iter"].append([it, s["kl"]])
        prog.log(it, rm_reward=s["rm_reward"], kl=s["kl"], clip=s["clip_frac"], vloss=s["value_loss"],
                 entropy=s["entropy"], len=s["reply_len"])
        if (it % cfg.eval_interval == 0 or it == cfg.iterations) and evaluate_and_keep(it):
            break
    if dist.is_main:
        final = load_checkpoint(out, device=device).eval()
        metrics = final_report(final, tok, cfg, world, device) if cfg.n_test else {}
        metrics.update(log, **selection_report(log["evals"], best_it, cfg.select_by), best_heldout_reward=best,
                       safety_decides=pooled_safety_decides([i["safety_decides"] for i in log["iters"]]),
                       kl_coef=cfg.kl_coef, wall_seconds=time.perf_counter() - t_start, complete=True)
        common.write_metrics(out, metrics)
        won = (f", win rate vs SFT {metrics['win_rate_vs_sft']:.1%}, safety violations "
               f"{metrics['safety_violation_rate']} (SFT {metrics['sft_safety_violation_rate']})" if cfg.n_test else "")
        if best_it == 0:
            judge = "the reward models" if cfg.select_by == "rm" else "the annotator (aid, choice 8)"
            print(f"[ppo] PPO did not improve on its start by {judge}: the kept model is the starting policy",
                  flush=True)
        print(f"[ppo] done: best iteration {best_it} by {cfg.select_by}, the annotator's view peaks at iteration "
              f"{metrics['annotator_best_iteration']}{won}; wrote {out}", flush=True)
    common.cleanup_distributed(dist)


def selection_report(evals: list[dict], best_it: int, select_by: str) -> dict:
    """metrics.json's account of choice 4: the kept iterate (best_iteration, by select_by), where the annotator's view
    of the same iterates peaks (the first maximum; where it parts from best_iteration the RMs were gamed), and whether
    PPO improved on its start."""
    ann_best = max(evals, key=lambda e: e["annotator"])["iteration"] if evals else None  # max keeps the first of ties
    return {"select_by": select_by, "best_iteration": best_it, "annotator_best_iteration": ann_best,
            "improved_on_start": best_it > 0}


def check_flags(cfg: PPOConfig):
    """--quick's sizes, and one clear error for a flag combination that cannot run, before any work."""
    if cfg.select_by not in ("rm", "annotator"):
        common.die(f"--select-by must be 'rm' or 'annotator' (an aid, choice 8), got {cfg.select_by!r}")
    if cfg.quick:
        cfg.iterations, cfg.batch_size, cfg.n_eval, cfg.n_test, cfg.eval_interval = 3, 16, 16, min(cfg.n_test, 24), 2
    if not cfg.eval_start and cfg.iterations < 1:
        common.die("--no-eval-start needs --iterations >= 1: otherwise no iterate is kept")
    common.check_checkpoints(init_from=(cfg.init_from, "lm"), rm_helpful=(cfg.rm_helpful, "scalar"),
                             rm_safety=(cfg.rm_safety, "scalar"),
                             sft=(cfg.sft if cfg.n_test else None, "lm"))  # --sft is read last, after the whole run


def load_models(cfg: PPOConfig, dist: common.Dist, dtype: torch.dtype):
    """The policy (fp32, trained), its frozen copy pi_0, the two frozen RMs and the value model made from the
    helpfulness RM (choice 2), the trained pair wrapped for torchrun, and their optimizers.
    Returns (PPOModels, the tokenizer, (rm_helpful, rm_safety))."""
    device = dist.device
    try:
        policy, tok = load_model_and_tokenizer(cfg.init_from, device, torch.float32)  # fp32: sft.load_start
        rm_helpful = rlhf.load_reward_model(cfg.rm_helpful, device)
        rm_safety = rlhf.load_reward_model(cfg.rm_safety, device)
    except (CheckpointError, OSError, ValueError) as e:
        common.die(str(e))
    value_model = copy.deepcopy(rm_helpful).float().requires_grad_(True).train()  # choice 2 (fp32, before the cast)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_0
    # --dtype bfloat16 (the default on a GPU that has it; fp16 would need a GradScaler, which PPO does not use), on any
    # device: the RMs' weights and FSDP's compute copy of the trained models are bf16. The policy's forward is fp32
    # without FSDP and bf16 under it; pi_0 and the rollouts run at exactly that precision, so that the KL is 0 before
    # the first update (choice 1): fp32 weights, or under FSDP the same sharded bf16 forward as the policy.
    param_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
    sharded = cfg.fsdp and dist.world_size > 1
    for frozen in (rm_helpful, rm_safety):  # forward passes only: eval mode, no gradients
        frozen.to(param_dtype or torch.float32).eval().requires_grad_(False)
    policy.train()
    if device.type == "cpu" and not cfg.fsdp:
        # generate() lays a CPU model's Linear weights column-major (a faster decode). Do it before DDP is built: DDP
        # lays out its gradient buckets by the parameters' strides, and weights re-laid after it gave wrong gradients.
        from cpu_speed import column_major_weights
        column_major_weights(policy)
    # the optimizers are made after wrapping (DDP, or FSDP2 with --fsdp), over the (sharded) parameters
    pol_net = common.wrap_model(policy, dist, cfg.fsdp, param_dtype=param_dtype)
    val_net = common.wrap_model(value_model, dist, cfg.fsdp, param_dtype=param_dtype)
    if sharded:  # pi_0 sharded as the policy, with its mixed precision: the very forward the policy runs
        ref_policy = common.wrap_model(ref_policy, dist, True, param_dtype=param_dtype)
    pol_opt = common.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    val_opt = common.make_optimizer(value_model, cfg.value_lr, cfg.weight_decay)
    gen_dtype = param_dtype if sharded else None  # the rollout copy: FSDP's compute dtype, else the fp32 policy itself
    return (PPOModels(policy, ref_policy, value_model, pol_opt, val_opt, pol_net, val_net, gen_dtype), tok,
            (rm_helpful, rm_safety))


def final_report(model, tok, cfg, world, device) -> dict:
    """Win rate against SFT on test prompts (annotator, 7-point, order randomized) and the safety figures."""
    import evaluate as E
    tasks = world.tasks("test", cfg.n_test, seed=cfg.seed)
    sft, _ = load_model_and_tokenizer(cfg.sft, device)
    return E.compare_models(model, sft, tok, tasks, world, cfg.seed, cfg.max_new_tokens, prefix="sft")


# ==== under torchrun: N processes run the same PPO as one process =====================================================
# The policy and the value model train data-parallel (DDP, or FSDP2 with --fsdp); the frozen reference runs as the
# policy does (sharded the same way under FSDP), both reward models are held whole on every rank, and these three only
# run forward passes; under FSDP a rollout gathers the policy's weights
# once (common.consolidated_copy). N processes give one process's run with the same global batch, up to the order of
# float sums (tests/test_distributed.py), so --batch-size means the same on any number of GPUs:
#   - every rank draws the same global batch; its random order is the minibatch split, and rank r of W takes the rows
#     r, r+W, r+2W, ...: M/W rows of every minibatch of M, in minibatch order (check_batch_layout);
#   - each reply's sampling generator is seeded by its prompt's index in the global batch (rollout_generators);
#   - R~c and the advantages are whitened with the global batch's mean and variance (whiten's all-reduced sums);
#   - a rank's loss is its reply tokens' sum over the global minibatch's token count, times W: DDP and FSDP average
#     the ranks' gradients, so the step follows the global minibatch's token mean (ppo_step);
#   - the logged statistics are the ranks' partial sums added, then divided (iteration_stats).
def rollout_generators(seed: int, iteration: int, rows: list[int], device) -> list[torch.Generator]:
    """One sampling generator per prompt, seeded by (seed, iteration, the prompt's index in the GLOBAL batch): with
    generate()'s per-row generators a reply then depends on its prompt and this seed only, not on which process samples
    it nor on what shares its batch. (random.Random seeds from a string through SHA-512: the same in every process,
    unlike hash(), which is salted per process.)"""
    return [torch.Generator(device=device).manual_seed(random.Random(f"ppo-rollout/{seed}/{iteration}/{g}")
                                                       .getrandbits(63)) for g in rows]


def check_batch_layout(cfg: PPOConfig, world_size: int):
    """Every minibatch must split evenly over the processes (M/W rows each), so the batch must too; then the last,
    possibly shorter, minibatch (B mod M rows) splits evenly as well. One clear error naming the flags otherwise."""
    for flag, n in (("--minibatch-size", cfg.minibatch_size), ("--batch-size", cfg.batch_size)):
        if n % world_size:
            common.die(f"{flag} ({n}) must be a multiple of the number of processes ({world_size}): each process "
                       f"takes the same number of rows of every minibatch")


if __name__ == "__main__":
    common.run_main(main, common.parse_config(PPOConfig, description=__doc__))
