"""ppo.py's pieces against hand computations and naive loops, the sampling/training log-prob invariant, and a toy
reward that PPO must learn to raise while the KL to the reference grows from zero."""
import copy
import dataclasses
import json

import pytest
import torch
from conftest import tiny_chat_checkpoint

import common
import model as M
import ppo
import rlhf
from model import ModelArgs, Transformer
from world import World


def test_combined_reward_follows_the_015_rule():
    r_s = torch.tensor([0.9, 0.10, 0.9, 0.14, 0.15])
    r_h = torch.tensor([0.3, 0.80, 0.7, 0.60, 0.20])
    is_safety = torch.tensor([True, False, False, False, False])
    got = rlhf.combined_reward(r_s, r_h, is_safety, 0.15)
    # safety prompt -> R_s; R_s < 0.15 -> R_s; otherwise R_h (0.15 itself is not below the threshold)
    assert got.tolist() == pytest.approx([0.9, 0.10, 0.7, 0.14, 0.20])


def test_logit_inverts_sigmoid():
    x = torch.tensor([-3.0, 0.0, 2.5])
    assert torch.allclose(rlhf.logit(torch.sigmoid(x)), x, atol=1e-5)


def test_kl_is_zero_for_the_reference_and_matches_hand_computation():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(ppo.kl_penalty(lp, lp, mask), torch.zeros_like(lp))
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -1.0]])
    kl = ppo.kl_penalty(lp, ref, mask)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.0, 0.0]]))


def test_reward_lands_on_the_last_reply_token():
    # three replies of lengths 3, 1 and 2 (e.g. one ended with EOS, one was cut off at the budget: the mask decides)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0], [0.5, 0.6, 0.0]])
    r = ppo.shape_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 + 2.0, 0.0, 0.0], [-0.25, -0.3 + 3.0, 0.0]]))


def naive_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            nv = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_equals_naive_reverse_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = torch.zeros(4, 7)
    for b, n in enumerate([7, 3, 1, 5]):
        mask[b, :n] = 1
    rewards, values = rewards * mask, values * mask
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5)]:
        a, r = ppo.gae(rewards, values, mask, gamma, lam)
        na, nr = naive_gae(rewards, values, mask, gamma, lam)
        assert torch.allclose(a, na, atol=1e-6) and torch.allclose(r, nr, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    # ratios 1.1 (inside), 1.5 (above the clip), 0.5 (below), 1.5 with a negative advantage
    new = torch.log(torch.tensor([[1.1, 1.5, 0.5, 1.5]]))
    adv = torch.tensor([[2.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, frac = ppo.policy_loss(new, old, adv, mask, 0.2)
    # min(r A, clip(r) A): min(2.2, 2.2) = 2.2; min(1.5, 1.2) = 1.2; min(-0.5, -0.8) = -0.8; min(-1.5, -1.2) = -1.5
    assert loss.item() == pytest.approx(-(2.2 + 1.2 - 0.8 - 1.5) / 4, abs=1e-6)
    assert frac.item() == pytest.approx(3 / 4)


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.5]])
    loss = ppo.value_loss(v, old, ret, torch.ones(1, 2), 0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(0.25, 0.25) = 0.25
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.25) / 2)


def test_whiten_over_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, m)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3].item() == 0.0
    assert (w[0, :3] ** 2).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_batch_layout_must_split_evenly_over_the_processes(capsys):
    """Each of W processes takes M/W rows of every minibatch: --minibatch-size and --batch-size must be multiples of W
    (a last, shorter minibatch is fine then). The error names the flag."""
    ppo.check_batch_layout(ppo.PPOConfig(batch_size=24, minibatch_size=16), 2)  # minibatches of 16 and 8: 8 + 4 each
    ppo.check_batch_layout(ppo.PPOConfig(batch_size=10, minibatch_size=4), 1)  # one process: anything goes
    for cfg, flag in ((ppo.PPOConfig(batch_size=24, minibatch_size=6), "--minibatch-size (6)"),
                      (ppo.PPOConfig(batch_size=18, minibatch_size=8), "--batch-size (18)")):
        with pytest.raises(SystemExit):
            ppo.check_batch_layout(cfg, 4)
        assert flag in capsys.readouterr().err


def test_policy_forward_matches_the_sampling_logprobs():
    """The rollout's recorded log-probs equal the training forward's before any update (the PPO invariant)."""
    from generate import generate
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=24, multiple_of=16, max_seq_len=64))
    m.init_weights(seed=0).eval()
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    replies, logps = generate(m, prompts, 6, temperature=1.0, top_p=1.0, eos_id=2, logprobs=True,
                              generator=torch.Generator().manual_seed(1))
    tokens, index, mask = ppo.pad_rollouts(prompts, replies, "cpu")
    with torch.no_grad():
        lp, _ = ppo.policy_forward(m, tokens, index, 1.0)
    for b, rec in enumerate(logps):
        assert torch.allclose(lp[b, :len(rec)], torch.tensor(rec), atol=1e-4)
        assert mask[b].sum().item() == len(replies[b])


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_and_kl_grows_from_zero():
    """reward = 1 if the reply contains token X else 0. With seed 0 this is deterministic on a CPU; the assertion
    margin (reward up by 0.25 from ~0.35) is far outside the run-to-run spread seen over seeds 0-4."""
    torch.manual_seed(0)
    V, X = 16, 7
    policy = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=V, multiple_of=16, max_seq_len=32))
    policy.init_weights(seed=0)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=V, multiple_of=16, max_seq_len=32,
                                  head="scalar")).init_weights(seed=1)
    cfg = ppo.PPOConfig(batch_size=32, minibatch_size=8, lr=3e-3, value_lr=3e-3, kl_coef=0.01, max_new_tokens=6,
                        ppo_epochs=2)
    pol_opt, val_opt = common.make_optimizer(policy, cfg.lr), common.make_optimizer(value, cfg.value_lr)
    prompts = [[1, 3 + (i % 5)] for i in range(cfg.batch_size)]
    seen = []

    def reward_fn(tasks, replies):
        r = torch.tensor([float(X in rep) for rep in replies])
        seen.append(r.mean().item())
        return r
    gen = torch.Generator().manual_seed(0)
    kls = []
    for _ in range(25):
        s = ppo.ppo_iteration(ppo.PPOModels(policy, ref, value, pol_opt, val_opt),
                              ppo.Batch([None] * len(prompts), prompts, gen), reward_fn, cfg, eos_id=2)
        kls.append(s["kl"])
    assert abs(kls[0]) < 1e-4  # the first rollout comes from pi_0 itself
    assert sum(seen[-5:]) / 5 > sum(seen[:5]) / 5 + 0.25, seen
    assert sum(kls[-5:]) / 5 > 0.05, kls


def test_whiten_against_hand_values_ignores_masked_entries():
    """Real entries 1, 2, 6 (the 100 is masked out): mean 3, variance (4 + 1 + 9) / 3 = 14/3 (over the mask, divided
    by the count), so (x - 3) / sqrt(14/3); masked positions come back 0. Asymmetric on purpose: a sign flip of every
    advantage keeps mean 0 and mean square 1 but not these values."""
    x = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = (14 / 3) ** 0.5
    want = torch.tensor([[-2 / s, -1 / s, 3 / s, 0.0]])
    assert torch.allclose(ppo.whiten(x, m), want, atol=1e-6)
    # shift_mean=False adds the mean back on the real entries; the masked one stays 0
    want_unshifted = torch.tensor([[3 - 2 / s, 3 - 1 / s, 3 + 3 / s, 0.0]])
    assert torch.allclose(ppo.whiten(x, m, shift_mean=False), want_unshifted, atol=1e-6)


def test_gae_ignores_whatever_lies_past_each_reply():
    """Replies of 3 and 1 tokens, with large junk rewards and values past their ends (the mask must cut them off),
    gamma 0.9, lambda 0.8 (gamma * lambda = 0.72), against the recursion written out by hand:
      row 0, r = (1, 0, 2), V = (0.5, -0.5, 1.0):
        t=2: delta = 2 + 0.9 * 0 - 1.0 = 1.0               A = 1.0
        t=1: delta = 0 + 0.9 * 1.0 + 0.5 = 1.4             A = 1.4 + 0.72 * 1.0 = 2.12
        t=0: delta = 1 + 0.9 * (-0.5) - 0.5 = 0.05         A = 0.05 + 0.72 * 2.12 = 1.5764
      row 1, r = (-1,), V = (2,):  t=0: delta = -1 - 2 = -3  A = -3
    returns = A + V on reply tokens, 0 elsewhere."""
    junk = 1000.0
    rewards = torch.tensor([[1.0, 0.0, 2.0, junk], [-1.0, junk, -junk, junk]])
    values = torch.tensor([[0.5, -0.5, 1.0, -junk], [2.0, junk, junk, -junk]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[1.5764, 2.12, 1.0, 0.0], [-3.0, 0.0, 0.0, 0.0]]), atol=1e-5)
    assert torch.allclose(ret, torch.tensor([[2.0764, 1.62, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]), atol=1e-5)


def test_clipped_losses_ignore_masked_tokens_and_divide_by_n_tokens():
    """A third, masked token with junk (ratio 3, advantage 100, value 50, return -50): the losses and the clip fraction
    are those of the two real tokens (the by-hand tests above, all-ones masks, cannot tell), divided by the real-token
    count, or by n_tokens when given (the global minibatch's count under torchrun)."""
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.1, 1.5, 3.0]]))
    adv = torch.tensor([[2.0, 1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, frac = ppo.policy_loss(new, old, adv, mask, 0.2)
    # min(2.2, 2.2) = 2.2 and min(1.5, 1.2) = 1.2 over 2 tokens; the clip is active on the second only
    assert loss.item() == pytest.approx(-(2.2 + 1.2) / 2, abs=1e-6) and frac.item() == pytest.approx(1 / 2)
    loss, frac = ppo.policy_loss(new, old, adv, mask, 0.2, n_tokens=4)
    assert loss.item() == pytest.approx(-(2.2 + 1.2) / 4, abs=1e-6) and frac.item() == pytest.approx(1 / 4)
    v, old_v, ret = torch.tensor([[1.0, 0.0, 50.0]]), torch.zeros(1, 3), torch.tensor([[2.0, 0.5, -50.0]])
    # 0.5 * (max(1, 3.24) + max(0.25, 0.25)) / 2 tokens
    assert ppo.value_loss(v, old_v, ret, mask, 0.2).item() == pytest.approx(0.5 * (3.24 + 0.25) / 2)
    assert ppo.value_loss(v, old_v, ret, mask, 0.2, n_tokens=4).item() == pytest.approx(0.5 * (3.24 + 0.25) / 4)


def test_logit_by_hand_and_finite_at_0_and_1():
    """logit(p) = log(p / (1 - p)): logit(0.9999) = log 9999 = 9.2102 (a score a clamp at 1e-3 would cut to 6.9068);
    0 and 1 clamp at 1e-6: -+log((1 - 1e-6) / 1e-6) = -+13.8155."""
    got = rlhf.logit(torch.tensor([0.9999, 0.25, 1.0, 0.0], dtype=torch.float64))
    assert got.tolist() == pytest.approx([9.2102, -1.0986, 13.8155, -13.8155], abs=1e-4)


def test_combined_reward_uses_the_threshold_it_is_given():
    """The 0.15 of §3.2.3 is the default, not a constant: at threshold 0.5, R_s = 0.3 on a benign prompt already
    counts as unsafe (R_s used), and 0.6 does not (R_h used)."""
    r_s, r_h = torch.tensor([0.3, 0.6]), torch.tensor([0.9, 0.8])
    got = rlhf.combined_reward(r_s, r_h, torch.tensor([False, False]), 0.5)
    assert got.tolist() == pytest.approx([0.3, 0.8])


# ---- the script's pieces on a tiny real stack: precision of pi_0, iterate selection -----------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny random chat model (conftest) and a scalar-head model of its shape, standing in for both RMs."""
    chat = tiny_chat_checkpoint(tmp_path_factory.mktemp("chat"))
    rm = tmp_path_factory.mktemp("rm")
    args = M.load_checkpoint(chat).args
    M.save_checkpoint(M.Transformer(dataclasses.replace(args, head="scalar")).init_weights(seed=1), rm,
                      chat / "tokenizer.model")
    return {"chat": str(chat), "rm": str(rm)}


def test_kl_is_exactly_zero_before_the_first_update_with_bf16(stack):
    """--dtype bfloat16 on the CPU takes the GPU's mixed-precision path (the RMs in bf16): pi_0 must still run at the
    policy's own precision (fp32 without FSDP), so every reply token's k1 = logprob - ref_logprob of the first rollout
    is exactly 0. With pi_0 cast to bf16 beside the fp32 policy, as before, this fails: the two forwards round
    differently (checked by casting ref_policy to bf16 in load_models: every reply token's KL nonzero, |KL| up to
    2e-3 on this stack)."""
    cfg = ppo.PPOConfig(init_from=stack["chat"], rm_helpful=stack["rm"], rm_safety=stack["rm"], dtype="bfloat16",
                        device="cpu", batch_size=8, max_new_tokens=8)
    dist = common.Dist()  # one process on the CPU
    m, tok, rms = ppo.load_models(cfg, dist, common.pick_dtype(cfg.dtype, dist.device))
    assert all(p.dtype == torch.bfloat16 for rm in rms for p in rm.parameters())  # the bf16 path is the one taken
    tasks = World(seed=0).tasks("train", cfg.batch_size, seed=0)
    batch = ppo.Batch(tasks, [tok.encode_dialog(t.messages)[0] for t in tasks],
                      ppo.rollout_generators(0, 1, list(range(cfg.batch_size)), dist.device))
    stats: dict = {}
    ro, scores, _ = ppo.collect_rollouts(m, batch, ppo.rm_reward_fn(*rms, tok, cfg.safety_threshold, stats), cfg,
                                         tok.eos_id)
    assert ro.mask.sum() >= cfg.batch_size  # at least one token per reply was scored
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl))
    assert torch.isfinite(scores).all() and 0 < stats["rm_reward"] < 1
    sd = stats["safety_decides"]  # rlhf.safety_decides of the batch: every prompt counted once, by its kind
    assert sd["helpful_prompts"] + sd["safety_prompts"] == cfg.batch_size
    assert sd["safety_prompts"] == sum(t.is_safety for t in tasks)
    # the held-out judge: the RMs' view (mean R_c, sigmoid scale) and the annotator's of the same greedy replies
    from annotator import Annotator
    h = ppo.heldout_scores(m.policy, tok, tasks[:4], rms, cfg, Annotator(World(seed=0), seed=0))
    assert set(h) == {"rm", "annotator"} and 0 < h["rm"] < 1 and -1 <= h["annotator"] <= 1


def test_pooled_safety_decides_counts_every_rollout_once():
    """10 helpfulness prompts with share 0.5 and 30 with share 0.1: (5 + 3) / 40 = 0.2, not the mean share 0.3."""
    got = ppo.pooled_safety_decides([{"helpful_prompts": 10, "share_on_helpful": 0.5, "safety_prompts": 6},
                                     {"helpful_prompts": 30, "share_on_helpful": 0.1, "safety_prompts": 2},
                                     {"helpful_prompts": 0, "share_on_helpful": None, "safety_prompts": 4}])
    assert got["helpful_prompts"] == 40 and got["safety_prompts"] == 12
    assert got["share_on_helpful"] == pytest.approx(0.2)


def run_with_heldout(stack, tmp_path, monkeypatch, rm, annotator, *flags) -> dict:
    """ppo.main on the tiny stack with the held-out judge scripted: evaluation k returns rm[k] and annotator[k]."""
    calls = iter(zip(rm, annotator))

    def scripted(policy, tok, tasks, rms, cfg, annotator_):
        r, a = next(calls)
        return {"rm": r, "annotator": a}
    monkeypatch.setattr(ppo, "heldout_scores", scripted)
    out = tmp_path / "ppo"
    ppo.main(common.parse_config(ppo.PPOConfig, [
        "--init-from", stack["chat"], "--rm-helpful", stack["rm"], "--rm-safety", stack["rm"], "--sft", stack["chat"],
        "--iterations", str(len(rm) - 1), "--eval-interval", "1", "--patience", "10", "--batch-size", "4",
        "--minibatch-size", "4", "--n-eval", "2", "--n-test", "0", "--max-new-tokens", "4", "--device", "cpu",
        "--out-dir", str(out), *flags]))
    return json.loads((out / "metrics.json").read_text())


def test_the_rms_pick_the_iterate_and_the_annotators_view_is_logged(stack, tmp_path, monkeypatch, capsys):
    """The RMs' view peaks at iteration 2, the annotator's at 1 (they part: the RMs are being gamed). The default keeps
    iteration 2 and logs where the annotator would have stopped; the aid --select-by annotator keeps 1."""
    rm, ann = [0.3, 0.5, 0.9, 0.4], [0.1, 0.6, 0.2, 0.1]
    m = run_with_heldout(stack, tmp_path, monkeypatch, rm, ann)
    assert m["evals"] == [{"iteration": i, "rm": r, "annotator": a} for i, (r, a) in enumerate(zip(rm, ann))]
    assert (m["select_by"], m["best_iteration"], m["annotator_best_iteration"]) == ("rm", 2, 1)
    assert m["improved_on_start"] is True and m["best_heldout_reward"] == 0.9
    assert m["safety_decides"]["helpful_prompts"] + m["safety_decides"]["safety_prompts"] == 3 * 4  # 3 batches of 4
    assert "did not improve" not in capsys.readouterr().out
    m = run_with_heldout(stack, tmp_path, monkeypatch, rm, ann, "--select-by", "annotator")
    assert (m["select_by"], m["best_iteration"], m["annotator_best_iteration"]) == ("annotator", 1, 1)


def test_a_run_that_keeps_its_start_says_so(stack, tmp_path, monkeypatch, capsys):
    m = run_with_heldout(stack, tmp_path, monkeypatch, [0.6, 0.5, 0.4], [0.0, 0.3, 0.2])
    assert (m["best_iteration"], m["annotator_best_iteration"], m["improved_on_start"]) == (0, 1, False)
    assert "PPO did not improve on its start by the reward models" in capsys.readouterr().out
