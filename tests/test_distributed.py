"""The stages under torchrun (2 processes, gloo, CPU) against one process: SFT and reward models with FSDP2 take the
same steps as one process on the same global batch; PPO (DDP and FSDP) and rejection sampling run to the end and write
checkpoints that load in one process; generation under FSDP runs on gathered full weights, with no per-token
communication. pretrain.py's equivalent is in test_pretrain.py.

Tolerances: on the CPU in fp32 the two runs differ only in the order of float sums (a batch split in two, gradients
reduced across processes). Measured: SFT losses within 1.2e-6 and weights within 6e-8 after 5 steps, reward-model loss
curves identical to the 5 rounded decimals they are stored with. The bounds below (1e-5) leave room for other CPUs and
thread counts and are still far below any real difference (a wrongly weighted loss moved SFT's first loss by 5e-4)."""
import json
from random import Random

import pytest
import torch

import common
import data
import model as M
from dist_util import REPO, check, tiny_stack, torchrun


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return tiny_stack(tmp_path_factory.mktemp("stack"))


def metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def max_weight_diff(a, b) -> float:
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
    import reward
    flags = list(map(str, ["--init-from", stack["chat"], "--train-prompts", "24", "--safety-prompts", "30",
                           "--test-prompts", "8", "--max-new-tokens", "6", "--batch-size", "8", "--log-interval",
                           "1000", "--prefs-dir", tmp_path / "prefs"]))  # collected once, by the one-process run
    reward.main(common.parse_config(reward.RewardConfig, flags + ["--out-dir", str(tmp_path / "one")]))
    check(torchrun(REPO / "reward.py", *flags, "--out-dir", tmp_path / "two", "--fsdp", cwd=tmp_path))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one["loss_curve"]) == len(two["loss_curve"]) > 10
    for (s1, l1, a1), (s2, l2, a2) in zip(one["loss_curve"], two["loss_curve"]):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=2e-5) and a1 == a2  # stored rounded to 5 decimals
    assert two["accuracy"] == one["accuracy"] and two["complete"]
    assert reward.load_reward_model(tmp_path / "two").args.head == "scalar"
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def test_ppo_under_torchrun_ddp_and_fsdp_runs_and_checkpoints(tmp_path, stack):
    """One iteration under each wrapper. Rollouts come from per-rank seeds and full weights either way, so FSDP's
    iteration sees exactly DDP's replies and rewards; its losses differ only by float summation order."""
    flags = list(map(str, ["--init-from", stack["chat"], "--sft", stack["chat"], "--rm-helpful", stack["rm_helpful"],
                           "--rm-safety", stack["rm_safety"], "--iterations", "1", "--batch-size", "8",
                           "--minibatch-size", "4", "--n-eval", "8", "--n-test", "8", "--max-new-tokens", "8",
                           "--eval-interval", "1"]))
    runs = {}
    for mode in ("ddp", "fsdp"):
        check(torchrun(REPO / "ppo.py", *flags, "--out-dir", tmp_path / mode, *(["--fsdp"] if mode == "fsdp" else []),
                       cwd=tmp_path))
        runs[mode] = metrics(tmp_path / mode)
        # the starting policy is a candidate too (ppo.py choice 4): the kept iterate is 0 or 1
        assert runs[mode]["complete"] and runs[mode]["best_iteration"] in (0, 1)
        policy = M.load_checkpoint(tmp_path / mode)  # written under torchrun, loaded in one process
        assert policy.args.head == "lm"
        if runs[mode]["best_iteration"] == 1:
            assert max_weight_diff(tmp_path / mode, stack["chat"]) > 0  # it trained
    assert runs["fsdp"]["best_iteration"] == runs["ddp"]["best_iteration"]
    assert runs["fsdp"]["heldout_scores"] == pytest.approx(runs["ddp"]["heldout_scores"], abs=1e-5)
    ddp, fsdp = runs["ddp"]["iters"][0], runs["fsdp"]["iters"][0]
    for key in ("rm_reward", "reply_len", "used_safety_rm", "kl"):
        assert fsdp[key] == pytest.approx(ddp[key], abs=1e-6), key
    assert fsdp["value_loss"] == pytest.approx(ddp["value_loss"], abs=1e-5)


def test_rejection_sampling_under_torchrun_keeps_the_union_of_the_ranks(tmp_path, stack):
    import evaluate as E
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
    all_train = data.World(seed=cfg.world_seed).tasks("train", seed=cfg.seed)
    ids = Random(f"rs/{cfg.seed}/1").sample(range(len(all_train)), cfg.n_prompts)
    tasks = [all_train[i] for i in ids]
    model, tok = E.load_model_and_tokenizer(stack["chat"])
    scorer = RS.Scorer(cfg, "cpu")
    per_rank = [RS.sample_shard(model, tok, tasks, cfg.k, it["temperature"], scorer, cfg.max_new_tokens, cfg.seed + 1,
                                common.Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert [len(p) for p in per_rank] == it["prompts_by_rank"] == [16, 16]
    shards = [common.rank_shard(ids, common.Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(ids)  # disjoint, complete
    union = {key: rec[1] for r in (0, 1) for key, rec in zip(shards[r], per_rank[r])}  # prompt -> best reply
    rows = [json.loads(line)["messages"] for line in (tmp_path / "rs" / "rs_iter1.jsonl").read_text().splitlines()]
    kept = {ids[p]: row[-1]["content"] for p, row in enumerate(rows)}
    assert all(row[:-1] == all_train[ids[p]].messages for p, row in enumerate(rows))  # in the prompts' order
    assert kept == union
    # what was fine-tuned on: the kept set plus the SFT mix's share of instruction dialogues (RS choice 3), shuffled
    train = [json.loads(line)["messages"] for line in (tmp_path / "rs" / "rs_train1.jsonl").read_text().splitlines()]
    mix = data.World(seed=cfg.world_seed).instruction_dialogs("train", round(0.15 * len(rows)), seed=cfg.seed + 1)
    assert sorted(map(json.dumps, train)) == sorted(map(json.dumps, rows + mix)) and len(mix) == 5
    rewards = torch.tensor([rec[0] for part in per_rank for rec in part])  # (P, K); the mean ignores the order
    assert it["mean_reward"] == pytest.approx(rewards.mean().item(), abs=1e-5)
    # the fine-tuned result loads in one process
    assert M.load_checkpoint(tmp_path / "rs").args.head == "lm" and max_weight_diff(tmp_path / "rs", stack["chat"]) > 0
