"""The stages under torchrun (2 processes, gloo, CPU) against one process: SFT and reward models with FSDP2, and PPO
with DDP and with FSDP2, take the same steps as one process on the same global batch; rejection sampling runs to the
end; the checkpoints written under torchrun load in one process; generation under FSDP runs on gathered full weights,
with no per-token communication. pretrain.py's equivalent is in test_pretrain.py.

Tolerances: on the CPU in fp32 the two runs differ only in the order of float sums (a batch split in two, gradients
reduced across processes). Measured: SFT losses within 1.2e-6 and weights within 6e-8 after 5 steps, reward-model loss
curves identical to the 5 rounded decimals they are stored with; PPO's logged statistics within 5e-7 and weights within
1e-8 after one iteration (4 steps that moved them by 2e-4). The bounds below (1e-5) leave room for other CPUs and
thread counts and are still far below any real difference (a wrongly weighted loss moved SFT's first loss by 5e-4;
in PPO with one epoch, per-rank loss means or per-rank whitening of the advantages moved the weights by 2e-4, the
latter its policy loss by 4e-3; weights re-laid in memory after DDP was built made its gradients wrong: ppo.main)."""
import json
from random import Random

import pytest
import torch

import common
import generate as G
import rlhf
from world import World
import model as M
from dist_util import REPO, check, tiny_stack, torchrun


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return tiny_stack(tmp_path_factory.mktemp("stack"))


def metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def max_weight_diff(a, b) -> float:
    """Largest difference of two checkpoints' weights."""
    wa, wb = M.load_checkpoint(a).state_dict(), M.load_checkpoint(b).state_dict()
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_fsdp_generation_runs_on_gathered_full_weights_and_matches_one_process(tmp_path):
    from dist_util import tiny_args
    from generate import generate
    check(torchrun(REPO / "tests" / "dist_util.py", "generate", tmp_path / "gen.json", cwd=tmp_path))
    r0, r1 = (json.loads((tmp_path / f"gen.json.{r}").read_text()) for r in (0, 1))
    # the FSDP model itself holds half of each weight on each rank; generation got plain, full tensors
    assert all(local[0] == full[0] // 2 for local, full in r0["shards"].values())
    assert r0["plain"] and r0["same_logits"] and r0["copy_is_not_net"]
    # the ranks decoded 6 and 10 tokens: with any collective per token they would have hung instead
    assert [len(r) for r in r0["replies"]] == [6] * 3 and [len(r) for r in r1["replies"]] == [10] * 3
    # rank 0's rollouts are one process's, token for token (same weights, same seed)
    one = M.Transformer(tiny_args(40, max_seq_len=64)).init_weights(seed=0)
    want = generate(one, [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]], 6, temperature=1.0, top_p=1.0, eos_id=None,
                    generator=torch.Generator().manual_seed(1))
    assert r0["replies"] == want
    assert [r[:6] for r in r1["replies"]] == want  # rank 1: the same seed, 4 tokens further


def test_sft_fsdp_two_processes_match_one(tmp_path, stack):
    import sft
    flags = ["--init-from", stack["chat"], "--n-dialogs", "200", "--seq-len", "128", "--batch-size", "8",
             "--eval-n", "0", "--log-interval", "1000", "--n-val-dialogs", "60", "--max-steps", "5", "--warmup", "2"]
    flags = list(map(str, flags))
    sft.main(common.parse_config(sft.SFTConfig, flags + ["--out-dir", str(tmp_path / "one")]))
    # the init is a one-process checkpoint: a valid --init-from for an FSDP run
    check(torchrun(REPO / "sft.py", *flags, "--out-dir", tmp_path / "two", "--fsdp", cwd=tmp_path))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [s for s, _ in one["loss_curve"]] == [s for s, _ in two["loss_curve"]] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(one["loss_curve"], two["loss_curve"]):
        assert a == pytest.approx(b, abs=1e-5)  # the global batch's answer-token mean, however it is split
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5) and two["complete"]
    # the checkpoint written under FSDP loads in one process, with one process's weights
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def test_reward_fsdp_two_processes_match_one(tmp_path, stack):
    """The same RM from one process and from two under FSDP2: loss curve, accuracy and weights (bound 1e-5 of an lr
    unit; a wrong lr on one run would differ by ~1e-4 per step)."""
    import reward
    flags = list(map(str, ["--init-from", stack["chat"], "--train-prompts", "64", "--safety-prompts", "80",
                           "--test-prompts", "8", "--max-new-tokens", "6", "--batch-size", "8", "--log-interval",
                           "1000", "--prefs-dir", tmp_path / "prefs"]))  # collected once, by the one-process run
    reward.main(common.parse_config(reward.RewardConfig, flags + ["--out-dir", str(tmp_path / "one")]))
    check(torchrun(REPO / "reward.py", *flags, "--out-dir", tmp_path / "two", "--fsdp", cwd=tmp_path))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one["loss_curve"]) == len(two["loss_curve"]) > 5
    for (s1, l1, a1), (s2, l2, a2) in zip(one["loss_curve"], two["loss_curve"]):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=2e-5) and a1 == a2  # stored rounded to 5 decimals
    assert two["accuracy"] == one["accuracy"] and two["complete"]
    rm = rlhf.load_reward_model(tmp_path / "two")
    assert rm.args.head == "scalar" and rm.args.n_layers == M.load_checkpoint(stack["chat"]).args.n_layers
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def policy_that_stops(stack, out):
    """The stack's chat model, changed to end its replies after a random number of tokens: EOS gets a logit of about 4
    at every position (p ~ 0.13 per token; replies of 1 to 8 tokens, a third of them cut off at 8). The random model
    almost never samples EOS (1 in 400 tokens), and with every reply 8 tokens long each rank holds the same number of
    reply tokens: then a per-rank token mean would equal the global one, and the test could not tell them apart."""
    m = M.load_checkpoint(stack["chat"])
    eos = stack["tok"].eos_id
    with torch.no_grad():
        m.tok_embeddings.weight[:, 0] = 0.1  # one component every token shares: the final hidden states share it too
        h = m.trunk(torch.randint(3, m.args.vocab_size, (16, 20), generator=torch.Generator().manual_seed(0)))
        mean = h.mean((0, 1))  # (C,) the direction they share
        m.output.weight[eos] = 4.0 * mean / mean.square().sum()  # logit_eos = h . w ~ 4
    M.save_checkpoint(m, out, stack["tok"].model_path)
    return out


def test_ppo_two_processes_match_one_under_ddp_and_fsdp(tmp_path, stack):
    """One PPO iteration in one process, and under torchrun with 2 processes (DDP, then FSDP2): the same global batch,
    so the same replies, rewards, whitening, losses and update (ppo.py's docstring: N processes == 1 process).
    --no-eval-start keeps the trained iterate, so the saved weights are those after the update, not the start.
    Replies of different lengths (policy_that_stops) make the ranks' reply-token counts differ."""
    import ppo
    policy = policy_that_stops(stack, tmp_path / "policy")
    flags = list(map(str, ["--init-from", policy, "--sft", stack["chat"], "--rm-helpful", stack["rm_helpful"],
                           "--rm-safety", stack["rm_safety"], "--iterations", "1", "--batch-size", "8",
                           "--minibatch-size", "4", "--n-eval", "8", "--n-test", "8", "--max-new-tokens", "8",
                           "--eval-interval", "1", "--no-eval-start", "--ppo-epochs", "2"]))  # 4 steps, 2 orders
    ppo.main(common.parse_config(ppo.PPOConfig, flags + ["--out-dir", str(tmp_path / "one")]))
    runs = {"one": metrics(tmp_path / "one")}
    for mode in ("ddp", "fsdp"):
        check(torchrun(REPO / "ppo.py", *flags, "--out-dir", tmp_path / mode, *(["--fsdp"] if mode == "fsdp" else []),
                       cwd=tmp_path))
        runs[mode] = metrics(tmp_path / mode)
    for mode, m in runs.items():
        assert m["complete"] and m["best_iteration"] == 1, mode  # the trained iterate was kept and saved
        assert M.load_checkpoint(tmp_path / mode).args.head == "lm"  # written under torchrun, loads in one process
    assert max_weight_diff(tmp_path / "one", policy) > 1e-5  # it trained: the comparisons below mean something
    one = runs["one"]["iters"][0]
    assert 1 < one["reply_len"] < 8  # some replies ended before the budget: the ranks held different token counts
    for mode in ("ddp", "fsdp"):
        two = runs[mode]["iters"][0]
        for key in ("rm_reward", "used_safety_rm", "score", "reply_len", "kl", "kl_per_token", "policy_loss",
                    "value_loss", "clip_frac", "entropy"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), (mode, key)
        for h1, h2 in zip(runs["one"]["evals"], runs[mode]["evals"]):
            assert h2 == pytest.approx(h1, abs=1e-5), mode  # greedy replies of the trained policy, scored
        assert max_weight_diff(tmp_path / "one", tmp_path / mode) < 1e-5, mode


def test_rejection_sampling_under_torchrun_keeps_the_union_of_the_ranks(tmp_path, stack):
    import rejection_sampling as RS
    flags = list(map(str, ["--init-from", stack["chat"], "--rm-helpful", stack["rm_helpful"], "--rm-safety",
                           stack["rm_safety"], "--quick", "--max-new-tokens", "8", "--out-dir", tmp_path / "rs"]))
    check(torchrun(REPO / "rejection_sampling.py", *flags, cwd=tmp_path))
    m = metrics(tmp_path / "rs")
    assert m["complete"] and m["world_size"] == 2 and len(m["iterations"]) == 1
    it = m["iterations"][0]
    # what each rank kept, recomputed here: its shard of the iteration's prompts, sampled with its seed at the
    # temperature the run chose, the best of K by the combined reward
    cfg = common.parse_config(RS.RSConfig, flags)
    cfg.k, cfg.n_prompts = 4, 32  # what --quick sets
    all_train = World(seed=cfg.world_seed).tasks("train", seed=cfg.seed)
    ids = Random(f"rs/{cfg.seed}/1").sample(range(len(all_train)), cfg.n_prompts)
    tasks = [all_train[i] for i in ids]
    model, tok = G.load_model_and_tokenizer(stack["chat"])
    scorer = RS.Scorer(cfg, "cpu")
    per_rank = [RS.sample_shard(model, tok, tasks, cfg.k, it["temperature"], scorer, cfg.max_new_tokens, cfg.seed + 1,
                                common.Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert [len(p) for p in per_rank] == it["prompts_by_rank"] == [16, 16]
    shards = [common.rank_shard(ids, common.Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(ids)  # disjoint, complete
    # prompt -> best reply; a prompt none of whose samples finished keeps nothing (RS choice 4)
    union = {key: rec[1] for r in (0, 1) for key, rec in zip(shards[r], per_rank[r]) if rec[1] is not None}
    assert len(union) >= 24  # the tiny chat model ends most replies (dist_util.ends_its_replies)
    rows = [json.loads(line)["messages"] for line in (tmp_path / "rs" / "rs_iter1.jsonl").read_text().splitlines()]
    kept_ids = [i for i in ids if i in union]
    assert all(row[:-1] == all_train[i].messages for i, row in zip(kept_ids, rows))  # in the prompts' order
    assert {i: row[-1]["content"] for i, row in zip(kept_ids, rows)} == union and len(rows) == len(union)
    # what was fine-tuned on: the kept set alone, shuffled (RS choice 3's instruction mix is an aid, off by default)
    train = [json.loads(line)["messages"] for line in (tmp_path / "rs" / "rs_train1.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, train)) == sorted(map(json.dumps, rows))
    rewards = torch.tensor([rec[0] for part in per_rank for rec in part])  # (P, K); the mean ignores the order
    assert it["mean_reward"] == pytest.approx(rewards.mean().item(), abs=1e-5)
    # the fine-tuned result loads in one process
    assert M.load_checkpoint(tmp_path / "rs").args.head == "lm" and max_weight_diff(tmp_path / "rs", stack["chat"]) > 0


def test_gradients_are_averaged_across_processes_not_summed(tmp_path):
    """common.wrap_model under DDP and FSDP2: one plain SGD step (no clipping, lr 1) on two processes' halves of a
    batch equals one process's step on the whole batch, and optimizer_step reports the same gradient norm. The stage
    comparisons above train with AdamW and clipping, which ignore a global scale of the gradient: gradients summed over
    the ranks instead of averaged (twice the mean here) pass them, but move these weights by a whole extra gradient and
    double this norm. Measured (CPU, gloo, fp32): norms within 6e-8 relative, weights within 2.3e-8 of a step of 0.14; the bounds,
    1e-5, are the file's (other CPUs and thread counts)."""
    from dist_util import sgd_step, tiny_args
    check(torchrun(REPO / "tests" / "dist_util.py", "sgd_step", tmp_path / "sgd.pt", cwd=tmp_path))
    two = torch.load(tmp_path / "sgd.pt", weights_only=True)
    raw = M.Transformer(tiny_args(40, max_seq_len=64)).init_weights(seed=0)
    start = {k: v.clone() for k, v in raw.state_dict().items()}
    norm, weights = sgd_step(raw, raw, common.Dist())
    assert norm > 0.1 and max((weights[k] - start[k]).abs().max().item() for k in start) > 1e-3  # a real step
    for mode, (n2, w2) in two.items():
        assert n2 == pytest.approx(norm, rel=1e-5), mode
        assert max((w2[k] - weights[k]).abs().max().item() for k in weights) < 1e-5, mode
