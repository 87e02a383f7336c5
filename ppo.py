"""PPO with a KL penalty to the initial policy (paper §3.2.3): the RLHF stage that follows rejection sampling.

  python ppo.py                       # policy from out/rs (or --init-from), reward models from out/rm_*
  python ppo.py --kl-coef 0           # no penalty: watch the policy drift and game the reward models
  torchrun --nproc_per_node=2 ppo.py  # data parallel: each rank rolls out its share of the prompts
  torchrun --nproc_per_node=8 ppo.py --device cuda --fsdp   # policy and value model sharded (FSDP2)

Under torchrun the policy and the value model train data-parallel (DDP, or FSDP2 with --fsdp); the frozen reference
policy and both reward models are held whole on every rank (bf16 on CUDA, eval mode, no gradients): they only run
forward passes. Under FSDP each rollout phase first gathers the policy's full weights once (common.consolidated_copy),
generates on them with no communication, then frees them: never an all-gather per generated token (§3.2.3).

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
  4. Early stopping and model selection: every --eval-interval iterations (and once before the first), greedy replies
     to held-out prompts are scored, the best iterate is kept (the starting policy included: PPO must beat it to
     replace it), and training stops after --patience evaluations without improvement. --select-by annotator (the
     default) scores them by the raters (§3.4's human evaluation, which the paper ran between RLHF versions);
     --select-by rm by the mean combined reward of the RMs (§3.4's model-based evaluation). Both are logged. The RMs
     alone cannot catch their own blind spots: here a run selected by them drifted into polite refusals of arithmetic
     questions, which the helpfulness RM scores like answers.
  5. Miniature scale: batch 64 prompts (paper 512), minibatch 16 (64), lr 5e-5 constant (1e-6), replies up to 64
     tokens; beta 0.01 as the paper's 7B/13B. At lr 1e-4 the KL reached 8 nats per reply within 40 iterations and
     the policy learned to refuse arithmetic questions politely (the helpfulness RM cannot check a sum).
  6. A reply that reaches the length limit without EOS is scored by the RMs at its last token, a state they never saw
     in training, and its score there is arbitrary: PPO would learn to ramble if that score happened to be high. Such a
     reply loses a fixed 1.0 (one standard deviation of the whitened score), as TRL's missing_eos_penalty does.
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
import data
from generate import generate
from model import CheckpointError, Transformer, load_checkpoint
from reward import combined_reward, logit


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
    patience: int = 4  # evaluations without improvement before stopping
    select_by: str = "annotator"  # held-out judge of the iterates (choice 4): "annotator" or "rm"
    n_eval: int = 96  # held-out prompts for early stopping
    n_test: int = 200  # test prompts for the final win rate against SFT
    world_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    fsdp: bool = False  # under torchrun: FSDP2 for the policy and the value model instead of DDP
    quick: bool = False  # a seconds-long smoke run


# ---- the pieces of the objective, each a small function the tests check by hand ---------------------------------------
def whiten(x: torch.Tensor, mask: Optional[torch.Tensor] = None, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the entries where mask is 1 (all entries without a mask)."""
    if mask is None:
        mask = torch.ones_like(x)
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
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


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float):
    """PPO's clipped surrogate: -min(ratio A, clip(ratio, 1-eps, 1+eps) A), mean over reply tokens.
    Returns (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()
    clip_frac = (((ratio - 1).abs() > clip).float() * mask).sum() / mask.sum()
    return loss, clip_frac


def value_loss(values, old_values, returns, mask, clip: float):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old V + clip(V - old V, -eps, eps): the value may move
    at most eps per iteration from what produced the advantages."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / mask.sum()


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


def rollout(policy, prompts: list[list[int]], cfg: PPOConfig, eos_id: int, gen: torch.Generator,
            gen_dtype: Optional[torch.dtype] = None) -> list[list[int]]:
    """Step 1: one reply per prompt, plain temperature sampling. Under FSDP the policy's full weights are gathered once
    for the whole phase (common.consolidated_copy) and freed on return: no all-gather per token (§3.2.3's 20x)."""
    full = common.consolidated_copy(policy, gen_dtype)  # the policy itself when it is not sharded
    replies, _ = generate(full, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, eos_id=eos_id,
                          logprobs=True, generator=gen)
    return replies


def ppo_iteration(policy, ref_policy, value_model, pol_opt, val_opt, tasks: list, prompts: list[list[int]],
                  reward_fn: RewardFn, cfg: PPOConfig, eos_id: int, gen: torch.Generator, dist=None,
                  policy_net=None, value_net=None, gen_dtype: Optional[torch.dtype] = None) -> dict:
    device = next(policy.parameters()).device
    policy_net, value_net = policy_net or policy, value_net or value_model
    # 1. rollout: plain temperature sampling; the recorded log-probs are the behaviour policy's
    t0 = time.perf_counter()
    replies = rollout(policy, prompts, cfg, eos_id, gen, gen_dtype)
    replies = [r if r else [eos_id] for r in replies]  # an empty reply still gets one token to carry its reward
    t_roll = time.perf_counter() - t0
    tokens, index, mask = pad_rollouts(prompts, replies, device)
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
        # 4. GAE, advantages whitened over all reply tokens of the batch
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
    # 5. PPO epochs: shuffled minibatches, one gradient step each, for the policy and the value model
    stats = {"policy_loss": [], "value_loss": [], "clip_frac": [], "entropy": []}
    B = len(prompts)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B)  # the global RNG, seeded per rank by common.seed_everything
        for s in range(0, B, cfg.minibatch_size):
            mb = perm[s:s + cfg.minibatch_size].to(device)
            logp, entropy = policy_forward(policy_net, tokens[mb], index[mb], cfg.temperature)
            pl, cf = policy_loss(logp, old_logprobs[mb], advantages[mb], mask[mb], cfg.clip)
            pl.backward()
            common.optimizer_step(pol_opt, None, policy, cfg.grad_clip)  # clip 1.0, step, clear
            v = value_forward(value_net, tokens[mb], index[mb])
            vl = value_loss(v, old_values[mb], returns[mb], mask[mb], cfg.value_clip)
            vl.backward()
            common.optimizer_step(val_opt, None, value_model, cfg.grad_clip)
            stats["policy_loss"].append(pl.item())
            stats["value_loss"].append(vl.item())
            stats["clip_frac"].append(cf.item())
            stats["entropy"].append(((entropy * mask[mb]).sum() / mask[mb].sum()).item())
    # 6. what to log
    n_tok = mask.sum().item()
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out.update(score=scores.mean().item(), kl=(kl.sum(1)).mean().item(), kl_per_token=kl.sum().item() / n_tok,
               reply_len=n_tok / B, rollout_tokens_per_sec=n_tok / max(t_roll, 1e-9))
    return out


# ---- the reward models as the reward function ---------------------------------------------------------------------------
def rm_reward_fn(rm_helpful, rm_safety, tok, threshold: float, stats: dict) -> RewardFn:
    import reward as R

    def fn(tasks, replies):
        dialogs = [t.messages for t in tasks]
        r_h = R.score(rm_helpful, tok, dialogs, replies, sigmoid=True)
        r_s = R.score(rm_safety, tok, dialogs, replies, sigmoid=True)
        is_safety = torch.tensor([bool(t.is_safety) for t in tasks])
        r_c = combined_reward(r_s, r_h, is_safety, threshold)
        stats["rm_reward"] = r_c.mean().item()  # the sigmoid-scale reward, comparable across iterations
        stats["used_safety_rm"] = (is_safety | (r_s < threshold)).float().mean().item()
        return whiten(logit(r_c))  # R~c = WHITEN(LOGIT(R_c))
    return fn


@torch.no_grad()
def heldout_scores(policy, tok, tasks, rm_helpful, rm_safety, threshold: float, max_new_tokens: int,
                   annotator=None) -> dict:
    """Greedy replies to held-out prompts, scored two ways: "rm", the mean combined reward R_c (sigmoid scale) of the
    two RMs (§3.4's model-based evaluation), and, with an annotator, "annotator", the raters' mean overall utility
    (helpfulness, minus 1 for an unsafe reply: the §3.4 human evaluation in miniature)."""
    import reward as R
    from evaluate import chat_generate
    out = chat_generate(policy, tok, [t.messages for t in tasks], max_new_tokens)
    dialogs = [t.messages for t in tasks]
    r_h = R.score(rm_helpful, tok, dialogs, [r.tokens for r in out], sigmoid=True)
    r_s = R.score(rm_safety, tok, dialogs, [r.tokens for r in out], sigmoid=True)
    is_safety = torch.tensor([bool(t.is_safety) for t in tasks])
    scores = {"rm": combined_reward(r_s, r_h, is_safety, threshold).mean().item()}
    if annotator is not None:
        judged = [annotator.score(t.messages, r.text) for t, r in zip(tasks, out)]
        scores["annotator"] = sum(j.helpfulness - (0.0 if j.safe else 1.0) for j in judged) / len(judged)
    return scores


def main(cfg: PPOConfig):
    import evaluate as E
    import reward as R
    if cfg.select_by not in ("annotator", "rm"):
        common.die(f"--select-by must be 'annotator' or 'rm', got {cfg.select_by!r}")
    if cfg.quick:
        cfg.iterations, cfg.batch_size, cfg.n_eval, cfg.n_test, cfg.eval_interval = 3, 16, 16, 24, 2
    dist = common.setup_distributed(cfg.device)
    device = dist.device
    dtype = common.pick_dtype(cfg.dtype, device)
    common.seed_everything(cfg.seed + dist.rank)
    try:
        policy, tok = E.load_model_and_tokenizer(cfg.init_from, device)
        rm_helpful = R.load_reward_model(cfg.rm_helpful, device)
        rm_safety = R.load_reward_model(cfg.rm_safety, device)
    except (CheckpointError, OSError, ValueError) as e:
        common.die(str(e))
    value_model = copy.deepcopy(rm_helpful).requires_grad_(True).train()  # choice 2 (fp32, before the cast below)
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
    # the trained pair: DDP, or FSDP2 (--fsdp); the optimizers are made after wrapping, over the (sharded) parameters
    pol_net = common.wrap_model(policy, dist, cfg.fsdp, param_dtype=param_dtype)
    val_net = common.wrap_model(value_model, dist, cfg.fsdp, param_dtype=param_dtype)
    pol_opt = common.make_optimizer(policy, cfg.lr, cfg.weight_decay)
    val_opt = common.make_optimizer(value_model, cfg.value_lr, cfg.weight_decay)

    world = data.World(seed=cfg.world_seed)
    train_tasks = world.tasks("train", seed=cfg.seed)
    eval_tasks = world.tasks("val", cfg.n_eval, seed=cfg.seed)
    rng = random.Random(f"ppo/{cfg.seed}/{dist.rank}")
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + dist.rank)
    log: dict = {"reward_by_iter": [], "kl_by_iter": [], "heldout_by_iter": [], "heldout_scores": [], "iters": []}
    best, best_it, bad = -math.inf, 0, 0
    out = Path(cfg.out_dir)
    per_rank = max(1, cfg.batch_size // dist.world_size)
    t_start = time.perf_counter()
    prog = common.Progress("ppo", cfg.iterations, per_rank * dist.world_size, 0.0, device, torch.float32,
                           enabled=dist.is_main, unit="prompts")
    annotator = data.Annotator(world, seed=cfg.seed) if cfg.select_by == "annotator" else None

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
            common.save_training_checkpoint(out, pol_net, policy, None, it, dist, Path(cfg.init_from) /
                                            "tokenizer.model")
            return False
        bad += 1
        if bad >= cfg.patience and dist.is_main:
            print(f"[ppo] early stop: no held-out improvement in {bad} evaluations", flush=True)
        return bad >= cfg.patience

    evaluate_and_keep(0)  # the starting policy is a candidate too: PPO must beat it to replace it
    for it in range(1, cfg.iterations + 1):
        batch = rng.sample(train_tasks, per_rank)  # each rank its own share of prompts
        prompts = [tok.encode_dialog(t.messages)[0] for t in batch]
        rstats: dict = {}
        s = ppo_iteration(policy, ref_policy, value_model, pol_opt, val_opt, batch, prompts,
                          rm_reward_fn(rm_helpful, rm_safety, tok, cfg.safety_threshold, rstats), cfg, tok.eos_id,
                          gen, dist, pol_net, val_net, gen_dtype=param_dtype)
        s.update(rstats)
        s = {k: common.all_reduce_mean(v, dist) for k, v in s.items()}
        log["iters"].append({"iter": it, **s})
        log["reward_by_iter"].append([it, s["rm_reward"]])
        log["kl_by_iter"].append([it, s["kl"]])
        prog.log(it, rm_reward=s["rm_reward"], kl=s["kl"], clip=s["clip_frac"], vloss=s["value_loss"],
                 entropy=s["entropy"], len=s["reply_len"])
        if (it % cfg.eval_interval == 0 or it == cfg.iterations) and evaluate_and_keep(it):
            break
    if dist.is_main:
        final = load_checkpoint(out, device=device).eval()
        metrics = final_report(final, tok, cfg, world, device)
        metrics.update(log, best_iteration=best_it, best_heldout_reward=best, kl_coef=cfg.kl_coef,
                       wall_seconds=time.perf_counter() - t_start, complete=True)
        common.write_metrics(out, metrics)
        print(f"[ppo] done: best iteration {best_it}, win rate vs SFT {metrics['win_rate_vs_sft']:.1%}, safety "
              f"violations {metrics['safety_violation_rate']} (SFT {metrics['sft_safety_violation_rate']}); "
              f"wrote {out}", flush=True)
    common.cleanup_distributed(dist)


def final_report(model, tok, cfg, world, device) -> dict:
    """Win rate against SFT on test prompts (annotator, 7-point, order randomized) and the safety figures."""
    import evaluate as E
    tasks = world.tasks("test", cfg.n_test, seed=cfg.seed)
    sft, _ = E.load_model_and_tokenizer(cfg.sft, device)
    return E.compare_models(model, sft, tok, tasks, world, cfg.seed, cfg.max_new_tokens, prefix="sft")


if __name__ == "__main__":
    main(common.parse_config(PPOConfig, description=__doc__))
