"""PPO with a KL penalty to the initial policy (paper §3.2.3): the RLHF stage that follows rejection sampling.

  python ppo.py                       # policy from out/rs (or --init-from), reward models from out/rm_*
  python ppo.py --kl-coef 0           # no penalty: watch the policy drift and game the reward models
  torchrun --nproc_per_node=2 ppo.py  # data parallel: the same run as one process, the batch split in two
  torchrun --nproc_per_node=8 ppo.py --device cuda --fsdp   # policy and value model sharded (FSDP2)

Under torchrun the policy and the value model train data-parallel (DDP, or FSDP2 with --fsdp); the frozen reference
policy and both reward models are held whole on every rank (bf16 on CUDA, eval mode, no gradients): they only run
forward passes. Under FSDP each rollout phase first gathers the policy's full weights once (common.consolidated_copy),
generates on them with no communication, then frees them: never an all-gather per generated token (§3.2.3).

N processes run the same PPO as one process with the same global batch (up to the order of float sums; checked by
tests/test_distributed.py), so --batch-size means the same thing on any number of GPUs and a result does not depend on
how many there were:
  - every rank draws the same global batch of --batch-size prompts (an RNG not seeded by the rank); its random order
    is the minibatch split, and rank r of W takes the rows at positions r, r+W, r+2W, ...: M/W rows of every
    minibatch of M (--minibatch-size; both flags must be multiples of W);
  - a reply's sampling generator is seeded by (seed, iteration, its prompt's index in the global batch), one generator
    per row (generate.py), so a reply does not depend on which rank samples it or beside which other prompts;
  - R~c and the advantages are whitened with the global batch's mean and variance (all-reduced sums and counts);
  - each rank's loss is its reply tokens' sum over the global minibatch's token count, times W, because DDP and FSDP
    average gradients over ranks: the step is one process's step on the global minibatch's token mean;
  - the logged statistics are the global batch's (the ranks' partial sums added, then divided).

The objective (§3.2.3): maximize E_{p ~ D, g ~ pi_theta}[R(g | p)] with
    R(g | p) = R~c(g | p) - beta * KL(pi_theta(g | p) || pi_0(g | p))
    R_c = R_s if IS_SAFETY(p) or R_s(g | p) < 0.15 else R_h       (safety RM first on risky prompts or replies)
    R~c = WHITEN(LOGIT(R_c))                                        (undo the sigmoid, then normalize)
One iteration, as numbered in `ppo_iteration`:
    1. rollout   sample one reply per prompt from the policy with plain temperature sampling (no top-p), so the
                 recorded log-probs are exactly those of the distribution the loss differentiates;
    2. score     both reward models score each reply; the 0.15 rule picks R_c; logit, whiten;
    3. shape     per-token reward -beta * (logprob - ref_logprob), plus R~c on the reply's last token;
    4. GAE       advantages from the value model (gamma 1, lambda 0.95), whitened over the batch's reply tokens;
    5. optimize  minibatches, one gradient step each: clipped policy loss (0.2), clipped value loss;
    6. log       reward, KL, clip fraction, value loss, entropy, reply length; held-out score every few iterations.

Choices where the paper is silent (numbered for the README):
  1. KL estimator: k1 = logprob - ref_logprob per sampled token, used in the reward AND in the logs. Its batch mean
     is an unbiased estimate of KL(pi || pi_0) and may dip below 0 by noise; a different estimator in the logs
     (e.g. always-positive k3) would hide what the reward actually penalized.
  2. Value model: a separate scalar-head model initialized from the helpfulness reward model: its trunk already
     reads replies for quality, so value estimates start in the reward's units (InstructGPT did the same).
  3. Whitening of R~c: subtract the batch mean and divide by its std, per iteration; advantages are whitened too.
     "The batch" is the global one under torchrun: all ranks' replies (advantages: all ranks' reply tokens).
  4. Early stopping and model selection: every --eval-interval iterations (and once before the first), greedy replies
     to held-out prompts are scored, the best iterate is kept (the starting policy included: PPO must beat it to
     replace it; --no-eval-start leaves it out, so a trained iterate is kept), and training stops after --patience
     evaluations without improvement. --select-by annotator (the default) scores them by the raters (§3.4's human
     evaluation, which the paper ran between RLHF versions); --select-by rm by the mean combined reward of the RMs
     (§3.4's model-based evaluation). Both are logged. The RMs
     alone cannot catch their own blind spots: here a run selected by them drifted into polite refusals of arithmetic
     questions, which the helpfulness RM scores like answers.
  5. Miniature scale: batch 64 prompts (paper 512), minibatch 16 (64), lr 5e-5 constant (1e-6), replies up to 64
     tokens; beta 0.01 as the paper's 7B/13B. At lr 1e-4 the KL reached 8 nats per reply within 40 iterations and
     the policy learned to refuse arithmetic questions politely (the helpfulness RM cannot check a sum).
  6. A reply that reaches the length limit without EOS is scored by the RMs at its last token, a state they never saw
     in training, and its score there is arbitrary: PPO would learn to ramble if that score happened to be high. Such a
     reply loses a fixed 1.0 (one standard deviation of the whitened score), as TRL's missing_eos_penalty does.
  7. Minibatches: the batch is split once per iteration (its random order); with --ppo-epochs > 1, later epochs visit
     the same minibatches in a new random order, where PPO implementations usually reshuffle the rows. Reshuffled
     rows would land on other ranks than the ones holding them, or make each minibatch's per-rank share depend on the
     number of processes; the fixed split keeps N processes equal to one. (The default is one epoch.)
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
import generate as G
import rlhf
from annotator import Annotator
from world import World
from generate import generate
from model import CheckpointError, load_checkpoint
from rlhf import logit


@dataclass
class PPOConfig:
    init_from: str = "out/rs"  # the policy to start from (also the frozen reference pi_0)
    rm_helpful: str = "out/rm_helpful"  # helpfulness reward model (frozen); also initializes the value model
    rm_safety: str = "out/rm_safety"  # safety reward model (frozen)
    sft: str = "out/sft"  # the baseline for the final win rate
    out_dir: str = "out/ppo"
    iterations: int = 40  # §3.2.3: 200-400 iterations (with early stopping)
    batch_size: int = 64  # prompts per iteration (§3.2.3: 512)
    minibatch_size: int = 16  # one gradient step per minibatch (§3.2.3: 64)
    ppo_epochs: int = 1  # passes over each iteration's rollouts
    lr: float = 5e-5  # constant (§3.2.3: 1e-6 for the 7B-70B models)
    value_lr: float = 1e-4  # the value model's learning rate
    kl_coef: float = 0.01  # beta (§3.2.3: 0.01 for 7B/13B, 0.005 for 34B/70B)
    clip: float = 0.2  # §3.2.3: PPO clip threshold
    value_clip: float = 0.2  # clip of the value update around the rollout's values
    gamma: float = 1.0  # no discount within a reply
    lam: float = 0.95  # GAE lambda
    safety_threshold: float = 0.15  # §3.2.3: use R_s when it is below this
    temperature: float = 1.0  # rollout sampling temperature (plain sampling, no top-p)
    max_new_tokens: int = 64
    missing_eos_penalty: float = 1.0  # subtracted from the whitened score of a reply without EOS (choice 6)
    weight_decay: float = 0.1  # §3.2.3: AdamW as pretraining
    grad_clip: float = 1.0  # §3.2.3
    eval_interval: int = 5  # iterations between held-out evaluations (early stopping)
    # evaluations without improvement before stopping. 4 (until the eighteenth session) chose the same iterate as 2 on
    # seeds 0-3 (best at iteration 5 / 15 / 5 / 0, nothing better in the 2-4 evaluations after it) and spent 10 more
    # iterations (~30 s on 2 cores) on each (BENCHMARKS.md)
    patience: int = 2
    select_by: str = "annotator"  # held-out judge of the iterates (choice 4): "annotator" or "rm"
    eval_start: bool = True  # choice 4: the starting policy is a candidate; --no-eval-start keeps a trained iterate
    n_eval: int = 96  # held-out prompts for early stopping
    n_test: int = 200  # test prompts for the final win rate against SFT (0: none; pipeline.py's eval_ppo measures it)
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


# ---- the pieces of the objective, each a small function the tests check by hand ---------------------------------------
def whiten(x: torch.Tensor, mask: Optional[torch.Tensor] = None, shift_mean: bool = True, eps: float = 1e-8,
           dist: Optional[common.Dist] = None):
    """(x - mean) / std over the entries where mask is 1 (all entries without a mask).
    dist (under torchrun): the mean and the variance are those of EVERY rank's entries together (all-reduced sums and
    counts), so N processes whiten exactly as one process holding the whole batch would (choice 3); per-rank statistics
    would give each rank's rows their own zero and scale."""
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
    n_tokens: by default mask.sum(), the mean over these tokens; under torchrun the token count of the GLOBAL minibatch,
    so that the ranks' losses add up to its mean (ppo_iteration, step 5). All (B, Tr).
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


# ---- one iteration -----------------------------------------------------------------------------------------------------
RewardFn = Callable[[list, list], torch.Tensor]  # (tasks, reply token lists) -> (B,) R~c, before the KL term


def rollout_generators(seed: int, iteration: int, rows: list[int], device) -> list[torch.Generator]:
    """One sampling generator per prompt, seeded by (seed, iteration, the prompt's index in the GLOBAL batch): with
    generate()'s per-row generators a reply then depends on its prompt and this seed only, not on which process samples
    it nor on what shares its batch, so N processes roll out exactly the replies of one. (Python's random.Random seeds
    from a string through SHA-512: the same in every process, unlike hash(), which is salted per process.)"""
    return [torch.Generator(device=device).manual_seed(random.Random(f"ppo-rollout/{seed}/{iteration}/{g}")
                                                       .getrandbits(63)) for g in rows]


def rollout(policy, prompts: list[list[int]], cfg: PPOConfig, eos_id: int, gen,
            gen_dtype: Optional[torch.dtype] = None) -> list[list[int]]:
    """Step 1: one reply per prompt, plain temperature sampling. Under FSDP the policy's full weights are gathered once
    for the whole phase (common.consolidated_copy) and freed on return: no all-gather per token (§3.2.3's 20x)."""
    full = common.consolidated_copy(policy, gen_dtype)  # the policy itself when it is not sharded
    replies, _ = generate(full, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, eos_id=eos_id,
                          logprobs=True, generator=gen)
    return replies


def ppo_iteration(policy, ref_policy, value_model, pol_opt, val_opt, tasks: list, prompts: list[list[int]],
                  reward_fn: RewardFn, cfg: PPOConfig, eos_id: int, gen, dist: Optional[common.Dist] = None,
                  policy_net=None, value_net=None, gen_dtype: Optional[torch.dtype] = None,
                  shuffle: Optional[random.Random] = None) -> dict:
    """One iteration on this rank's rows (tasks, prompts), which arrive in minibatch order: this rank's part of global
    minibatch k is its rows k*m .. k*m+m-1, m = minibatch_size / world_size (main's layout; in one process, simply
    consecutive rows, so the caller's random order is the minibatch split). gen: a torch.Generator for the whole
    rollout, or one per row (main: then the replies do not depend on the number of processes). shuffle: a
    random.Random, the same on every rank, that reorders the minibatches in epochs after the first (None: Python's
    global one). Every statistic returned is the GLOBAL batch's, the same on every rank."""
    device = next(policy.parameters()).device
    policy_net, value_net = policy_net or policy, value_net or value_model
    world = dist.world_size if dist is not None else 1
    # 1. rollout: plain temperature sampling; the recorded log-probs are the behaviour policy's
    t0 = time.perf_counter()
    replies = rollout(policy, prompts, cfg, eos_id, gen, gen_dtype)
    replies = [r if r else [eos_id] for r in replies]  # an empty reply still gets one token to carry its reward
    t_roll = time.perf_counter() - t0
    tokens, index, mask = pad_rollouts(prompts, replies, device)  # (B, L), (B, Tr), (B, Tr); B = this rank's rows
    with torch.no_grad():
        old_logprobs, _ = policy_forward(policy, tokens, index, cfg.temperature)
        ref_logprobs, _ = policy_forward(ref_policy, tokens, index, cfg.temperature)
        old_values = value_forward(value_model, tokens, index) * mask
        # 2. score: the reward models' combined, logit-ed and whitened score R~c (B,); a reply cut off at the length
        #    limit (no EOS) loses missing_eos_penalty: the RMs were trained on finished replies only (reward.py choice 1)
        scores = reward_fn(tasks, replies).to(device)
        unfinished = torch.tensor([r[-1] != eos_id for r in replies], device=device)
        scores = scores - cfg.missing_eos_penalty * unfinished.float()
        # 3. shape: -beta * KL per token, score at the last token
        kl = kl_penalty(old_logprobs, ref_logprobs, mask)
        rewards = shape_rewards(scores, kl, mask, cfg.kl_coef)
        # 4. GAE, advantages whitened over all reply tokens of the GLOBAL batch (every rank's)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask, dist=dist)
    # 5. PPO epochs: minibatches, one gradient step each, for the policy and the value model. A rank's loss is its
    #    reply tokens' SUM over the token count N_k of the whole global minibatch k, times world: DDP and FSDP average
    #    the ranks' gradients (divide by world), so the step follows the gradient of the global minibatch's token mean,
    #    as one process would. (Each rank's own mean instead would weigh a token by 1 / its rank's count.)
    m = cfg.minibatch_size // world  # this rank's rows per minibatch
    starts = list(range(0, len(prompts), m))
    n_tok_mb = common.all_reduce_sum(torch.stack([mask[s:s + m].sum() for s in starts]), dist)  # (n_mb,) N_k
    parts = []  # per step, this rank's share (sum / N_k) of: policy loss, value loss, clip fraction, entropy
    for epoch in range(cfg.ppo_epochs):
        order = list(range(len(starts)))
        if epoch > 0:
            (shuffle or random).shuffle(order)  # choice 7: the same minibatches in a new order, the same on every rank
        for k in order:
            mb, n = slice(starts[k], starts[k] + m), n_tok_mb[k]
            logp, entropy = policy_forward(policy_net, tokens[mb], index[mb], cfg.temperature)  # (m, Tr) each
            pl, cf = policy_loss(logp, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip, n)
            (pl * world).backward()  # DDP / FSDP divide the summed gradients by world
            common.optimizer_step(pol_opt, None, policy, cfg.grad_clip)  # clip 1.0, step, clear
            v = value_forward(value_net, tokens[mb], index[mb])  # (m, Tr)
            vl = value_loss(v, old_values[mb], returns[mb], mask[mb], cfg.value_clip, n)
            (vl * world).backward()
            common.optimizer_step(val_opt, None, value_model, cfg.grad_clip)
            parts.append(torch.stack([pl.detach(), vl.detach(), cf, (entropy.detach() * mask[mb]).sum() / n]).float())
    # 6. what to log: the global batch's values, from the ranks' partial sums (one all-reduce for the lot)
    per_step = common.all_reduce_sum(torch.stack(parts), dist).mean(0).tolist()  # (4,) mean over the steps
    n_tok = mask.sum()
    totals = common.all_reduce_sum(torch.stack([torch.tensor(float(len(prompts)), device=device), n_tok,
                                                scores.sum(), kl.sum(), n_tok / max(t_roll, 1e-9)]), dist)
    rows, n_tok, score_sum, kl_sum, tok_per_sec = totals.tolist()
    out = dict(zip(("policy_loss", "value_loss", "clip_frac", "entropy"), per_step))
    out.update(score=score_sum / rows, kl=kl_sum / rows, kl_per_token=kl_sum / n_tok, reply_len=n_tok / rows,
               rollout_tokens_per_sec=tok_per_sec)  # the ranks' throughputs added
    return out


# ---- the reward models as the reward function ---------------------------------------------------------------------------
def rm_reward_fn(rm_helpful, rm_safety, tok, threshold: float, stats: dict,
                 dist: Optional[common.Dist] = None) -> RewardFn:
    """R~c of this rank's replies, whitened with the statistics of the global batch (all ranks'); `stats` receives the
    global batch's mean R_c and the share of replies judged by the safety RM."""

    def fn(tasks, replies):
        is_safety = torch.tensor([bool(t.is_safety) for t in tasks])
        r_c, r_s = rlhf.combined_score(rm_helpful, rm_safety, tok, [t.messages for t in tasks], replies, is_safety,
                                    threshold)  # (B,) each, on the CPU
        used_safety = (is_safety | (r_s < threshold)).float()
        n, r_sum, used_sum = common.all_reduce_sum(torch.stack([torch.tensor(float(len(r_c))), r_c.sum(),
                                                                used_safety.sum()]), dist).tolist()
        stats["rm_reward"] = r_sum / n  # the sigmoid-scale reward, comparable across iterations
        stats["used_safety_rm"] = used_sum / n
        return whiten(logit(r_c), dist=dist)  # R~c = WHITEN(LOGIT(R_c)), over the global batch
    return fn


@torch.no_grad()
def heldout_scores(policy, tok, tasks, rm_helpful, rm_safety, threshold: float, max_new_tokens: int,
                   annotator=None) -> dict:
    """Greedy replies to held-out prompts, scored two ways: "rm", the mean combined reward R_c (sigmoid scale) of the
    two RMs (§3.4's model-based evaluation), and, with an annotator, "annotator", the raters' mean overall utility
    (helpfulness, minus 1 for an unsafe reply: the §3.4 human evaluation in miniature)."""
    from generate import chat_generate
    out = chat_generate(policy, tok, [t.messages for t in tasks], max_new_tokens)
    is_safety = torch.tensor([bool(t.is_safety) for t in tasks])
    scores = {"rm": rlhf.combined_score(rm_helpful, rm_safety, tok, [t.messages for t in tasks], [r.tokens for r in out],
                                     is_safety, threshold)[0].mean().item()}
    if annotator is not None:
        judged = [annotator.score(t.messages, r.text) for t, r in zip(tasks, out)]
        scores["annotator"] = sum(j.helpfulness - (0.0 if j.safe else 1.0) for j in judged) / len(judged)
    return scores


def main(cfg: PPOConfig):
    if cfg.select_by not in ("annotator", "rm"):
        common.die(f"--select-by must be 'annotator' or 'rm', got {cfg.select_by!r}")
    if cfg.quick:
        cfg.iterations, cfg.batch_size, cfg.n_eval, cfg.n_test, cfg.eval_interval = 3, 16, 16, min(cfg.n_test, 24), 2
    if not cfg.eval_start and cfg.iterations < 1:
        common.die("--no-eval-start needs --iterations >= 1: otherwise no iterate is kept")
    common.check_checkpoints(init_from=(cfg.init_from, "lm"), rm_helpful=(cfg.rm_helpful, "scalar"),
                             rm_safety=(cfg.rm_safety, "scalar"),
                             sft=(cfg.sft if cfg.n_test else None, "lm"))  # --sft is read last, after the whole run
    dist = common.setup_distributed(cfg.device)
    check_batch_layout(cfg, dist.world_size)
    device = dist.device
    dtype = common.pick_dtype(cfg.dtype, device)
    common.seed_everything(cfg.seed)  # the same on every rank: nothing in a PPO step may depend on the rank
    try:
        policy, tok = G.load_model_and_tokenizer(cfg.init_from, device, torch.float32)  # fp32: sft.load_start
        rm_helpful = rlhf.load_reward_model(cfg.rm_helpful, device)
        rm_safety = rlhf.load_reward_model(cfg.rm_safety, device)
    except (CheckpointError, OSError, ValueError) as e:
        common.die(str(e))
    value_model = copy.deepcopy(rm_helpful).float().requires_grad_(True).train()  # choice 2 (fp32, before the cast)
    ref_policy = copy.deepcopy(policy)  # pi_0
    # bf16 where the GPU has it (fp16 would need a GradScaler, which PPO does not use): for the frozen models' weights,
    # and for FSDP's compute copy of the trained ones and for the rollouts' gathered weights.
    half = device.type == "cuda" and dtype == torch.bfloat16
    param_dtype = torch.bfloat16 if half else None
    # The frozen models only run forward passes: whole on every rank (never sharded), eval mode, no gradients, bf16 on
    # CUDA (half the memory; their logits and scores come back in fp32).
    for frozen in (ref_policy, rm_helpful, rm_safety):
        frozen.to(param_dtype or torch.float32).eval().requires_grad_(False)
    policy.train()
    if device.type == "cpu" and not cfg.fsdp:
        # generate() stores a CPU model's Linear weights column-major (a faster decode; generate.py) and rollouts run
        # on the trained policy itself: do it now, before DDP is built. DDP lays out its gradient buckets by the
        # parameters' strides at construction; re-laid later (at the first rollout), its reduced gradients came back
        # wrong (torch 2.13, CPU/gloo: 0.09 off on a tiny model) and a 2-process run stepped elsewhere than one
        # process. One process does it here too, so both run the same matmul layouts. FSDP rolls out on a copy.
        from cpu_speed import column_major_weights
        column_major_weights(policy)
    # the trained pair: DDP, or FSDP2 (--fsdp); the optimizers are made after wrapping, over the (sharded) parameters
    pol_net = common.wrap_model(policy, dist, cfg.fsdp, param_dtype=param_dtype)
    val_net = common.wrap_model(value_model, dist, cfg.fsdp, param_dtype=param_dtype)
    pol_opt = common.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    val_opt = common.make_optimizer(value_model, cfg.value_lr, cfg.weight_decay)

    world = World(seed=cfg.world_seed)
    train_tasks = world.tasks("train", seed=cfg.seed)
    eval_tasks = world.tasks("val", cfg.n_eval, seed=cfg.seed)
    rng = random.Random(f"ppo/{cfg.seed}")  # not seeded by the rank: every rank draws the same global batches
    log: dict = {"reward_by_iter": [], "kl_by_iter": [], "heldout_by_iter": [], "heldout_scores": [], "iters": []}
    best, best_it, bad = -math.inf, 0, 0
    out = Path(cfg.out_dir)
    t_start = time.perf_counter()
    prog = common.Progress("ppo", cfg.iterations, cfg.batch_size, 0.0, device, torch.float32,
                           enabled=dist.is_main, unit="prompts")
    annotator = Annotator(world, seed=cfg.seed) if cfg.select_by == "annotator" else None

    def evaluate_and_keep(it: int) -> bool:
        """Held-out scores of the current policy; the best iterate so far is saved. Returns True to stop early."""
        nonlocal best, best_it, bad
        sc = heldout_scores(common.consolidated_copy(policy, param_dtype), tok, eval_tasks, rm_helpful, rm_safety,
                            cfg.safety_threshold, cfg.max_new_tokens, annotator)  # FSDP: full weights once
        sc = {k: common.all_reduce_mean(v, dist) for k, v in sc.items()}
        h = sc[cfg.select_by]
        log["heldout_by_iter"].append([it, h])
        log["heldout_scores"].append({"iter": it, **sc})
        if dist.is_main:
            print(f"[ppo] iteration {it}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in sc.items())
                  + f" (best {cfg.select_by} {max(best, h):.4f})", flush=True)
        if h > best:
            best, best_it, bad = h, it, 0
            common.save_training_checkpoint(out, pol_net, policy, None, it, dist, tok.model_path)
            return False
        bad += 1
        if bad >= cfg.patience and dist.is_main:
            print(f"[ppo] early stop: no held-out improvement in {bad} evaluations", flush=True)
        return bad >= cfg.patience

    if cfg.eval_start:
        evaluate_and_keep(0)  # the starting policy is a candidate too: PPO must beat it to replace it
    for it in range(1, cfg.iterations + 1):
        # The global batch, the same on every rank, in random order: global minibatch k is batch[k*M : (k+1)*M]
        # (M = minibatch_size). This rank takes the rows at positions rank, rank + W, ... (W processes), i.e. M/W rows
        # of each minibatch, in minibatch order (what ppo_iteration expects); each row's sampling generator is seeded
        # by its position in the global batch. So the rollouts, the minibatches and (with global whitening and loss
        # normalization inside ppo_iteration) the updates are those of one process with the same batch.
        batch = rng.sample(train_tasks, cfg.batch_size)
        rows = common.rank_shard(list(range(cfg.batch_size)), dist)  # global indices of this rank's rows
        tasks = [batch[g] for g in rows]
        prompts = [tok.encode_dialog(t.messages)[0] for t in tasks]
        rstats: dict = {}
        s = ppo_iteration(policy, ref_policy, value_model, pol_opt, val_opt, tasks, prompts,
                          rm_reward_fn(rm_helpful, rm_safety, tok, cfg.safety_threshold, rstats, dist), cfg,
                          tok.eos_id, rollout_generators(cfg.seed, it, rows, device), dist, pol_net, val_net,
                          gen_dtype=param_dtype, shuffle=rng)
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
        metrics.update(log, best_iteration=best_it, best_heldout_reward=best, kl_coef=cfg.kl_coef,
                       wall_seconds=time.perf_counter() - t_start, complete=True)
        common.write_metrics(out, metrics)
        won = (f", win rate vs SFT {metrics['win_rate_vs_sft']:.1%}, safety violations "
               f"{metrics['safety_violation_rate']} (SFT {metrics['sft_safety_violation_rate']})" if cfg.n_test else "")
        print(f"[ppo] done: best iteration {best_it}{won}; wrote {out}", flush=True)
    common.cleanup_distributed(dist)


def check_batch_layout(cfg: PPOConfig, world_size: int):
    """Every minibatch must split evenly over the processes (M/W rows each), so the batch must too; then the last,
    possibly shorter, minibatch (B mod M rows) splits evenly as well. One clear error naming the flags otherwise."""
    for flag, n in (("--minibatch-size", cfg.minibatch_size), ("--batch-size", cfg.batch_size)):
        if n % world_size:
            common.die(f"{flag} ({n}) must be a multiple of the number of processes ({world_size}): each process "
                       f"takes the same number of rows of every minibatch")


def final_report(model, tok, cfg, world, device) -> dict:
    """Win rate against SFT on test prompts (annotator, 7-point, order randomized) and the safety figures."""
    import evaluate as E
    tasks = world.tasks("test", cfg.n_test, seed=cfg.seed)
    sft, _ = G.load_model_and_tokenizer(cfg.sft, device)
    return E.compare_models(model, sft, tok, tasks, world, cfg.seed, cfg.max_new_tokens, prefix="sft")


if __name__ == "__main__":
    main(common.parse_config(PPOConfig, description=__doc__))
