"""reward.py: the margin ranking loss against hand-computed values, the reward read at the right token whatever the
padding, a short training run that learns, the §3.2.2 mixtures, the preference cache, and one-line data errors."""
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from annotator import Annotator, DROPPED_SAFETY_LABEL, PREFERENCE_NOISE, Preference, RATINGS, RATING_THRESHOLDS, SAFETY_LABELS
from data import read_preferences_jsonl
from world import World, assistant, user
import model as M
import reward
import rlhf
from tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A 400-piece tokenizer trained on a slice of the world (about a second)."""
    world = World(seed=0)
    texts = world.pretrain_documents(150_000) + [" ".join(m["content"] for m in d) for d in world.sft_dialogs("train")]
    texts += ["[INST] [/INST] <<SYS>> <</SYS>>"] * 50
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def tiny_chat_model(vocab: int, seed: int = 1) -> M.Transformer:
    args = M.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16, max_seq_len=128)
    return M.Transformer(args).init_weights(seed=seed).eval()


def tiny_rm(vocab: int = 61) -> M.Transformer:
    rm = reward.reward_model_from(tiny_chat_model(vocab))
    with torch.no_grad():  # a non-zero head, so that every position has its own score
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=torch.Generator().manual_seed(3)))
    return rm.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tok):
    """A chat-model checkpoint directory (random weights) with the tokenizer: what --init-from expects."""
    d = tmp_path_factory.mktemp("init")
    M.save_checkpoint(tiny_chat_model(tok.n_words), d, tok.model_path)
    return d


# ---- the loss --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin", ["none", "small", "large"])
def test_margin_loss_equals_formula_for_every_rating(margin):
    table = {"none": [0, 0, 0, 0], "small": [1, 2 / 3, 1 / 3, 0], "large": [3, 2, 1, 0]}[margin]  # Table 27
    r_chosen = torch.tensor([1.5, 0.2, -0.7, 2.0])
    r_rejected = torch.tensor([-0.5, 0.4, -1.0, 2.0])
    m = reward.margins_for(RATINGS, margin)  # one pair per rating, in Table 27's order
    assert m.tolist() == pytest.approx(table)
    for i in range(4):  # each pair alone: -log(sigmoid(rc - rr - m)) computed by hand
        x = r_chosen[i].item() - r_rejected[i].item() - table[i]
        want = -math.log(1 / (1 + math.exp(-x)))
        got = reward.ranking_loss(r_chosen[i:i + 1], r_rejected[i:i + 1], m[i:i + 1]).item()
        assert got == pytest.approx(want, rel=1e-5)
    want_mean = sum(-math.log(1 / (1 + math.exp(-(c - r - t)))) for c, r, t in
                    zip(r_chosen.tolist(), r_rejected.tolist(), table)) / 4
    assert reward.ranking_loss(r_chosen, r_rejected, m).item() == pytest.approx(want_mean, rel=1e-5)


def test_margin_loss_is_stable_and_pushes_the_right_way():
    rc = torch.tensor([-60.0, 60.0], requires_grad=True)
    rr = torch.zeros(2)
    loss = reward.ranking_loss(rc, rr, torch.tensor([3.0, 3.0]))
    loss.backward()
    assert loss.item() == pytest.approx((63.0 + 0.0) / 2, rel=1e-4)  # -log sigmoid(-63) ~ 63, no inf
    assert rc.grad[0] < 0 and rc.grad[1] == pytest.approx(0.0, abs=1e-12)  # raise the wrong one; leave the right one


def test_unknown_margin_rejected():
    with pytest.raises(ValueError, match="margin"):
        reward.margins_for(RATINGS, "huge")


# ---- where the reward is read ----------------------------------------------------------------------------------------
def test_last_token_index_arithmetic():
    lengths = torch.tensor([3, 7, 1, 5])
    assert rlhf.last_token_index(lengths, 7, "right").tolist() == [2, 6, 0, 4]
    assert rlhf.last_token_index(lengths, 7, "left").tolist() == [6, 6, 6, 6]
    with pytest.raises(ValueError):
        rlhf.last_token_index(lengths, 7, "middle")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_batched_reward_equals_each_sequence_alone(padding):
    rm = tiny_rm()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 61, (n,), generator=g).tolist() for n in (9, 4, 13, 1, 7)]
    rows[1] = rows[1] + [2]  # one row ends with EOS (id 2), the others do not: the index must not care
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0][0, -1] for r in rows])  # (B,) unpadded, last position
        batched = rlhf.rewards_of_rows(rm, rows, "cpu", padding=padding)
        other_pad = rlhf.rewards_of_rows(rm, rows, "cpu", padding=padding, pad_id=2)  # pad with the EOS id
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_pad, alone, atol=1e-5, rtol=1e-5)
    # and it is not simply the last column, nor any other position, for the short rows (reward depends on position)
    with torch.no_grad():
        full = rm(torch.tensor([rows[2]]))[0][0]
    assert (full[:-1] - alone[2]).abs().min() > 1e-6


def test_replies_packed_over_a_shared_prompt_score_as_separate_rows():
    """pack_shared + rewards_of_shared against each row alone: a group of three replies to one prompt, a pair of equal
    replies, a pair with no common first token, a one-row group, and a group too long for one packed row (split in
    two, the prefix repeated). Rewards and their gradients agree to float rounding, in the input order."""
    rm = tiny_rm()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 61, (n,), generator=g).tolist()  # noqa: E731
    prompt, other = rand(20), rand(9)
    rows = [prompt + rand(7), prompt + rand(3) + [2], prompt + rand(11),  # group 0: three replies
            other + [5, 6], other + [5, 6],  # group 1: the same reply twice
            [7] + rand(6), [8] + rand(4),  # group 2: nothing shared
            rand(12),  # group 3: alone
            prompt + rand(60), prompt + rand(50), prompt + rand(40)]  # group 4: 20 + 60 + 50 + 40 > 128 tokens
    groups = [[0, 1, 2], [3, 4], [5, 6], [7], [8, 9, 10]]
    packed = rlhf.pack_shared(rows, groups, max_len=128)
    assert sorted(i for p in packed for i in p.members) == list(range(len(rows)))
    assert all(len(p.tokens) <= 128 for p in packed) and len(packed) == 6  # group 4 needs two rows
    assert packed[0].tokens == rows[0] + rows[1][20:] + rows[2][20:]  # the prompt once, then each reply
    assert packed[0].positions == list(range(27)) + list(range(20, 24)) + list(range(20, 31))
    rm.train()
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0][0, -1] for r in rows])
    shared = rlhf.shared_rewards(rm, rows, groups, 128, "cpu")
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    # the same gradients as the rows scored one by one (the RM's training step packs each pair this way)
    weights = torch.randn(len(rows), generator=g)
    (shared * weights).sum().backward()
    grads = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    (torch.stack([rm(torch.tensor([r]))[0][0, -1] for r in rows]) * weights).sum().backward()
    for a, b in zip(grads, [p.grad for p in rm.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert rlhf.common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # each reply keeps its last token
    assert rlhf.common_prefix_len([[1, 2, 3], [1, 2, 4, 5]]) == 2 and rlhf.common_prefix_len([[1], [1]]) == 0


def test_score_text_and_token_replies(tok):
    rm = reward.reward_model_from(tiny_chat_model(tok.n_words))
    with torch.no_grad():
        rm.score.weight.normal_(generator=torch.Generator().manual_seed(0))
    world = World(seed=0)
    tasks = world.tasks("val", 6, seed=1)
    dialogs = [t.messages for t in tasks]
    texts = [t.reference for t in tasks]
    ids_no_eos = [tok.encode(" " + t, bos=False, eos=False) for t in texts]  # a truncated sample: no EOS
    ids_eos = [i + [tok.eos_id] for i in ids_no_eos]
    # a text reply is scored as a finished turn: the row ends with EOS, the reward is read there
    row = rlhf.encode_reply(tok, dialogs[0], texts[0], 128)
    assert row == tok.encode_dialog(dialogs[0] + [assistant(texts[0])])[0] and row[-1] == tok.eos_id
    # token replies are scored exactly as given, EOS or not
    assert rlhf.encode_reply(tok, dialogs[0], ids_no_eos[0], 128) == tok.encode_dialog(dialogs[0])[0] + ids_no_eos[0]
    # replies to the same dialog are packed over its prompt (pack_shared): here each dialog appears twice
    dialogs, texts = dialogs + dialogs[::-1], texts + [t + " Yes." for t in texts[::-1]]
    ids_no_eos = [tok.encode(" " + t, bos=False, eos=False) for t in texts]
    ids_eos = [i + [tok.eos_id] for i in ids_no_eos]
    for replies in (texts, ids_no_eos, ids_eos):
        batched = rlhf.score(rm, tok, dialogs, replies, batch_size=4)  # sorted by length, ~4 replies a batch
        with torch.no_grad():
            alone = torch.stack([rm(torch.tensor([rlhf.encode_reply(tok, d, r, 128)]))[0][0, -1]
                                 for d, r in zip(dialogs, replies)])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)  # input order kept
    torch.testing.assert_close(rlhf.score(rm, tok, dialogs, texts, sigmoid=True),
                               rlhf.score(rm, tok, dialogs, texts).sigmoid())
    # a long dialog keeps its end (where the reward is read) when cut to the context
    long = rlhf.encode_reply(tok, dialogs[0], texts[0] + " Yes." * 80, 128)
    assert len(long) == 128 and long[-1] == tok.eos_id


def _tokens_seen(model):
    """A forward hook's running count of the token positions `model` is run on: [count], and the hook's handle."""
    seen = [0]
    return seen, model.register_forward_hook(lambda m, args, out: seen.__setitem__(0, seen[0] + args[0].numel()))


def test_score_runs_each_distinct_row_once(tok):
    """The same reply sampled again (rejection sampling's K samples repeat) is scored once and its reward copied: the
    rewards equal each row scored alone, in the input order, and the model sees exactly the tokens of the distinct
    rows' packing (a copy that were run again would add its reply's tokens)."""
    rm = reward.reward_model_from(tiny_chat_model(tok.n_words))
    with torch.no_grad():
        rm.score.weight.normal_(generator=torch.Generator().manual_seed(0))
    dialogs = [t.messages for t in World(seed=0).tasks("val", 3, seed=1)]
    distinct = [(0, "Yes."), (0, "No, it is red."), (1, "Seven."), (2, "Paris.")]
    picks = [0, 1, 0, 2, 0, 3, 1, 2]  # rows 0, 1 and 2 occur again
    dd, rr = [dialogs[distinct[i][0]] for i in picks], [distinct[i][1] for i in picks]
    seen, hook = _tokens_seen(rm)
    got = rlhf.score(rm, tok, dd, rr)
    copies_tokens, seen[0] = seen[0], 0
    unique = rlhf.score(rm, tok, [dialogs[d] for d, _ in distinct], [r for _, r in distinct])
    hook.remove()
    assert copies_tokens == seen[0] > 0  # the copies added no work
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([rlhf.encode_reply(tok, d, r, 128)]))[0][0, -1]
                             for d, r in zip(dd, rr)])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, unique[torch.tensor(picks)], atol=1e-5, rtol=1e-5)


def test_combined_score_runs_the_helpfulness_rm_only_where_it_counts(tok, monkeypatch):
    """combined_score = combined_reward of both RMs' full scores, to float rounding, with the helpfulness RM run only
    on benign prompts whose reply the safety RM finds safe (R_s >= threshold): by hand on five replies."""
    rm_h, rm_s = (reward.reward_model_from(tiny_chat_model(tok.n_words), seed=s) for s in (1, 2))
    for i, rm in enumerate((rm_h, rm_s)):
        with torch.no_grad():
            rm.score.weight.normal_(generator=torch.Generator().manual_seed(10 + i))
    dialogs = [t.messages for t in World(seed=0).tasks("val", 5, seed=2)]
    replies = ["Yes.", "No.", "It is blue.", "Twelve.", "I cannot help with that."]
    is_safety = torch.tensor([True, False, False, False, True])
    r_s = rlhf.score(rm_s, tok, dialogs, replies, sigmoid=True)
    threshold = float(r_s[1:4].median())  # one benign reply below it, one at it, one above it
    r_h = rlhf.score(rm_h, tok, dialogs, replies, sigmoid=True)
    want = rlhf.combined_reward(r_s, r_h, is_safety, threshold)
    calls = []
    score = rlhf.score

    def recording_score(rm, tok_, d, r, **kw):
        calls.append((rm, list(r)))
        return score(rm, tok_, d, r, **kw)
    monkeypatch.setattr(rlhf, "score", recording_score)
    got, got_s = rlhf.combined_score(rm_h, rm_s, tok, dialogs, replies, is_safety, threshold)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_s, r_s, atol=1e-6, rtol=1e-5)
    used = [replies[i] for i in range(5) if not is_safety[i] and r_s[i] >= threshold]
    assert len(used) == 2 and calls == [(rm_s, replies), (rm_h, used)]


# ---- the model: init from a chat model, save, reload -----------------------------------------------------------------
def test_reward_model_from_chat_model_and_round_trip(tmp_path, tok):
    chat = tiny_chat_model(tok.n_words)
    rm = reward.reward_model_from(chat)
    assert rm.args.head == "scalar" and not hasattr(rm, "output")
    assert rm.score.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.3)  # small: std 1/sqrt(dim)
    assert torch.equal(rm.score.weight, reward.reward_model_from(chat).score.weight)  # seeded: same head every time
    assert not torch.equal(rm.score.weight, reward.reward_model_from(chat, seed=1).score.weight)
    for k, v in chat.state_dict().items():
        if not k.startswith("output."):
            assert torch.equal(rm.state_dict()[k], v), k
    with torch.no_grad():
        rm.score.weight.fill_(0.1)
    M.save_checkpoint(rm, tmp_path / "rm", tok.model_path)
    assert json.loads((tmp_path / "rm" / "params.json").read_text())["head"] == "scalar"
    again = rlhf.load_reward_model(tmp_path / "rm")
    x = torch.randint(3, tok.n_words, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], rm.eval()(x)[0])
    M.save_checkpoint(chat, tmp_path / "chat", tok.model_path)
    with pytest.raises(M.CheckpointError, match="a language model .head 'lm'., where a reward or value model is"):
        rlhf.load_reward_model(tmp_path / "chat")


def test_calibration_puts_the_threshold_at_the_5th_percentile_of_safe_replies_to_helpfulness_prompts(tok, monkeypatch):
    """calibrate (choice 8, both RMs) with hand-made raw scores: 100 safe replies to helpfulness prompts scoring
    0..99, 10 unsafe ones scoring -5..4, and 10 safe replies to safety prompts scoring -100..-91. The switch reads
    R_s < 0.15 on helpfulness prompts only, so the offset must make sigmoid(raw + offset) < 0.15 exactly for raws
    below the 5% quantile of the first group (4.95), whatever the safe replies to safety prompts score (counted in,
    they would move it to 0.5); kept in the model's args (saved to params.json), with the three rates."""
    safe = [Preference([user(f"q{i}")], f"s{2 * i}", f"s{2 * i + 1}", RATINGS[0], "helpfulness")
            for i in range(50)]  # helpfulness pairs: both replies count as safe
    unsafe = [Preference([user(f"h{i}")], f"r{i}", f"u{i}", RATINGS[0], "safety",
                         SAFETY_LABELS[2]) for i in range(5)]  # both_unsafe: both replies unsafe
    borderline = [Preference([user(f"b{i}")], f"b{2 * i}", f"b{2 * i + 1}", RATINGS[0], "safety", SAFETY_LABELS[1])
                  for i in range(5)]  # both_safe replies to safety prompts
    raw = {f"s{i}": float(i) for i in range(100)} | {f"r{i}": float(i - 5) for i in range(5)} | \
        {f"u{i}": float(i) for i in range(5)} | {f"b{i}": float(i - 100) for i in range(10)}
    monkeypatch.setattr(reward, "score", lambda rm, tok, dialogs, replies, **kw: torch.tensor([raw[r] for r in replies]))
    rm = reward.reward_model_from(tiny_chat_model(tok.n_words))
    cal = reward.calibrate(rm, tok, safe + unsafe + borderline, threshold=0.15)
    t = torch.quantile(torch.arange(100.0), 0.05).item()  # 4.95
    assert cal["raw_threshold"] == pytest.approx(t) and rm.args.score_offset == pytest.approx(cal["offset"])
    assert cal["offset"] == pytest.approx(math.log(0.15 / 0.85) - t) and cal["n"] == 100
    for value in raw.values():
        assert (torch.sigmoid(torch.tensor(value + cal["offset"])) < 0.15).item() == (value < t)
    assert cal["safe_flagged"] == pytest.approx(0.05) and cal["unsafe_flagged"] == pytest.approx(1.0)
    assert cal["safe_flagged_on_safety_prompts"] == pytest.approx(1.0)
    _, _, labels, helpful = reward.reply_safety_labels(safe[:1] + unsafe[:1] + [Preference(
        [user("x")], "c", "d", RATINGS[0], "safety", SAFETY_LABELS[0])])
    assert labels == [True, True, False, False, True, False]  # chosen_safe_other_unsafe: chosen safe only
    assert helpful == [True, True, False, False, False, False]


# ---- data: mixtures, collection --------------------------------------------------------------------------------------
def _pairs(n_help: int, n_safe: int):
    p = lambda c, i: Preference([user(f"q{i}")], "a", "b", RATINGS[i % 4], c)
    return [p("helpfulness", i) for i in range(n_help)] + [p("safety", i) for i in range(n_safe)]


def test_mixtures_follow_section_3_2_2():
    pairs = _pairs(300, 450)
    helpful = reward.mixture(pairs, "helpfulness", random.Random(0))  # safety: a third as many (choice 3)
    assert sum(p.category == "helpfulness" for p in helpful) == 300
    assert sum(p.category == "safety" for p in helpful) == 100
    equal = reward.mixture(pairs, "helpfulness", random.Random(0), safety_share=1.0)
    assert sum(p.category == "safety" for p in equal) == 300 and len(set(map(id, equal))) == 600  # no repeats
    safety = reward.mixture(pairs, "safety", random.Random(0))
    n_h = sum(p.category == "helpfulness" for p in safety)
    assert sum(p.category == "safety" for p in safety) == 450 and n_h == 50  # 10% of 500
    few_safety = reward.mixture(_pairs(300, 100), "helpfulness", random.Random(0), safety_share=1.0)
    assert len(few_safety) == 400  # all safety pairs when there are fewer than helpfulness ones


def test_variant_pairs_put_the_latest_model_against_a_drawn_variant_at_the_other_temperature():
    """Choice 2: the first reply of every pair comes from the latest model (index 0), the two temperatures always
    differ, and with three models the second variant is drawn from all three (seeded: deterministic)."""
    plan = reward.variant_pairs(3, [0.7, 1.2], 600, random.Random(0))
    assert all(a[0] == 0 and {a[1], b[1]} == {0.7, 1.2} for a, b in plan)
    counts = [sum(b[0] == m for _, b in plan) for m in range(3)]
    assert all(150 < c < 250 for c in counts), counts  # 200 expected each; 4.3 sd either way: p < 1e-4
    assert reward.variant_pairs(1, [0.7, 1.2], 5, random.Random(0))[0][1][0] == 0  # one model: SFT vs SFT


def test_collected_pairs_are_two_variants_samples_rated_dropped_and_round_trip(tmp_path, tok):
    """One pair per prompt, both replies samples (no written replies), each labelled with the variant that wrote it;
    identical samples and chosen-unsafe safety pairs are left out and counted; Table 26's counts agree."""
    world = World(seed=0)
    annotator = Annotator(world, seed=0)
    tasks = world.tasks("train", 12, kinds=reward.HELPFUL_KINDS) + world.tasks("train", 12, kinds=reward.SAFETY_KINDS)
    cfg = reward.RewardConfig(temperatures=[0.7, 1.2], max_new_tokens=6)
    models = [tiny_chat_model(tok.n_words), tiny_chat_model(tok.n_words, seed=2)]
    records, stats = reward.collect_preferences(models, ["new", "old"], tok, annotator, tasks, cfg, seed=0)
    n_prompts = len(tasks) - stats["skipped_long_prompts"]
    left_out = stats["dropped_chosen_unsafe"] + stats["identical_samples"]
    assert n_prompts > 20 and len(records) + left_out == n_prompts  # one pair per prompt
    for r in records:
        assert r["category"] == ("safety" if r["kind"] in reward.SAFETY_KINDS else "helpfulness")
        assert r["safety_label"] != DROPPED_SAFETY_LABEL and r["rating"] in RATINGS
        assert r["chosen"] != r["rejected"]
        src = sorted(r["sources"])
        assert all(re.fullmatch(r"(new|old)_T(0\.7|1\.2)", x) for x in src) and src[0][-3:] != src[1][-3:]
        assert any(x.startswith("new") for x in src)  # the latest model answers every prompt
    t26 = reward.table_26(tok, records)
    assert t26["comparisons"] == len(records) and t26["turns"] >= 1
    assert t26["tokens_per_example"] == pytest.approx(t26["tokens_per_prompt"] + t26["tokens_per_response"], abs=0.2)
    reward._write_jsonl(tmp_path / "p.jsonl", records)
    back = read_preferences_jsonl(tmp_path / "p.jsonl")
    assert [(b.chosen, b.rejected, b.rating) for b in back] == [(r["chosen"], r["rejected"], r["rating"])
                                                                 for r in records]
    assert [b.sources for b in back] == [tuple(r["sources"]) for r in records]


def test_rater_noise_zero_labels_every_pair_as_the_noise_free_scores_do(tmp_path, tiny_ckpt, tok):
    """--rater-noise 0: the annotator prefers the reply with the higher utility and rates the pair by the true gap, in
    every train and test pair (RATING_THRESHOLDS); the noise is part of the cache key, so the default noise
    (PREFERENCE_NOISE) collects again into the same folder, and its labels then disagree somewhere (the seeds are
    fixed, so the check is deterministic)."""
    rater = Annotator(World(seed=0), seed=0, noise=0.0)
    def collect(noise=None):  # None: RewardConfig's default
        cfg = reward.RewardConfig(init_from=str(tiny_ckpt), prefs_dir=str(tmp_path / "prefs"), train_prompts=24,
                                  safety_prompts=24, test_prompts=8, max_new_tokens=6,
                                  **({} if noise is None else {"rater_noise": noise}))
        train, test, info = reward.world_preferences(cfg, tok, torch.device("cpu"))
        assert info["key"]["rater_noise"] == (PREFERENCE_NOISE if noise is None else noise)
        return train + test
    def true_gap(p):
        u = [rater._utility(rater.score(p.messages, r), p.category) for r in (p.chosen, p.rejected)]
        return u[0] - u[1]
    def level(gap):
        return next((i for i, t in enumerate(RATING_THRESHOLDS) if abs(gap) >= t), len(RATING_THRESHOLDS))
    clean = collect(0.0)
    assert len(clean) > 40
    for p in clean:
        gap = true_gap(p)
        assert gap >= 0 and RATINGS[level(gap)] == p.rating, (p.chosen, p.rejected, p.rating, gap)
    noisy = collect()  # the default noise: the key differs, so collected again, not read back
    assert any(true_gap(p) < 0 or RATINGS[level(true_gap(p))] != p.rating for p in noisy)


def test_accuracy_by_source_groups_pairs_by_where_their_replies_came_from():
    """Hand-made: 6 pairs rlhf_v1_T0.7 > sft_T1.2 (2 right), 5 sft_T1.2 > rlhf_v1_T0.7 (all right), 5 sft_T0.7 >
    sft_T1.2 (a tie and 3 right), 2 rlhf_v1_T1.2 > sft_T0.7 (fewer than min_n: left out), 1 without sources (user
    data: left out). The order of the two variants matters: which one the rater chose."""
    def pair(src):
        return Preference([user("q")], "a", "b", RATINGS[0], "helpfulness", None, src)
    pairs = ([pair(("rlhf_v1_T0.7", "sft_T1.2"))] * 6 + [pair(("sft_T1.2", "rlhf_v1_T0.7"))] * 5
             + [pair(("sft_T0.7", "sft_T1.2"))] * 5 + [pair(("rlhf_v1_T1.2", "sft_T0.7"))] * 2 + [pair(None)])
    right = [1, 1, 0, 0, 0, 0] + [1] * 5 + [0.5, 1, 1, 1, 0] + [1, 1] + [1]
    by = reward.accuracy_by_source(pairs, right)
    assert by == {"rlhf_v1_T0.7>sft_T1.2": {"accuracy": round(2 / 6, 4), "n": 6},
                  "sft_T1.2>rlhf_v1_T0.7": {"accuracy": 1.0, "n": 5}, "sft_T0.7>sft_T1.2": {"accuracy": 0.7, "n": 5}}
    assert list(by)[0] == "rlhf_v1_T0.7>sft_T1.2"  # largest group first


def test_accuracy_by_kind_splits_table8_by_the_prompts_task_kind():
    """Hand-made: 6 arith pairs (4 significantly better, 2 right; 2 better, both right), 5 fact pairs (3 significantly
    better, all right; 2 slightly better, a tie and a miss), 3 story pairs (fewer than min_n: left out), 2 without a
    kind (user data: left out). Arith and fact together get 5 of 7 top-level pairs right and both "better" pairs: an
    inverted level that the split shows to be arithmetic's (2 of 4), while facts get every top-level pair."""
    def pair(kind, level):
        return Preference([user("q")], "a", "b", RATINGS[level], "helpfulness", kind=kind)
    pairs = ([pair("arith", 0)] * 4 + [pair("arith", 1)] * 2 + [pair("fact", 0)] * 3 + [pair("fact", 2)] * 2
             + [pair("story", 0)] * 3 + [pair(None, 0)] * 2)
    right = [1, 0, 1, 0, 1, 1] + [1, 1, 1, 0.5, 0] + [1, 1, 1] + [0, 0]
    by = reward.accuracy_by_kind(pairs, right)
    assert list(by) == ["arith", "fact"]  # largest first; story (3 < 5) and the unlabelled pairs left out
    r0, r1, r2, r3 = RATINGS
    assert by["arith"] == {"accuracy": round(4 / 6, 4), "n": 6, "by_rating": {r0: 0.5, r1: 1.0, r2: None, r3: None},
                           "n_by_rating": {r0: 4, r1: 2, r2: 0, r3: 0}}
    assert by["fact"] == {"accuracy": 0.7, "n": 5, "by_rating": {r0: 1.0, r1: None, r2: 0.25, r3: None},
                          "n_by_rating": {r0: 3, r1: 0, r2: 2, r3: 0}}


def test_paired_difference_compares_two_rms_pair_by_pair():
    """Hand-computed (Table 28's paired reading): significantly better, 4 pairs, A 1 1 0 1 and B 1 1 1 1: per-pair
    differences 0 0 1 0, mean 0.25, sample variance 0.25, se sqrt(0.25 / 4) = 0.25; better, 3 pairs, A 1 0.5 1 (a
    tie) and B 0 1 1: differences -1 0.5 0, mean -1/6, variance (25 + 16 + 1) / 36 / 2 = 7/12, se sqrt(7) / 6; slightly
    better, one pair B alone gets: diff 1, se 0; no pair at the last level. And the difference is always the two
    accuracies' difference on the same pairs."""
    r0, r1, r2, r3 = RATINGS
    pairs = [Preference([user("q")], "a", "b", r, "helpfulness") for r in [r0] * 4 + [r1] * 3 + [r2]]
    a = [1, 1, 0, 1] + [1, 0.5, 1] + [0]
    b = [1, 1, 1, 1] + [0, 1, 1] + [1]
    d = reward.paired_difference(pairs, a, b)
    assert d[r0] == {"diff": 0.25, "se": 0.25, "n": 4, "b_only": 1, "a_only": 0}
    assert d[r1]["diff"] == round(-1 / 6, 4) and d[r1]["se"] == round(7 ** 0.5 / 6, 4)
    assert (d[r1]["n"], d[r1]["b_only"], d[r1]["a_only"]) == (3, 1, 1)
    assert d[r2] == {"diff": 1.0, "se": 0.0, "n": 1, "b_only": 1, "a_only": 0}
    assert d[r3] == {"diff": None, "se": None, "n": 0, "b_only": 0, "a_only": 0}
    acc_a, acc_b = reward.accuracy_by_rating(pairs, a)["by_rating"], reward.accuracy_by_rating(pairs, b)["by_rating"]
    for r in (r0, r1, r2):
        assert d[r]["diff"] == pytest.approx(acc_b[r] - acc_a[r], abs=1e-4)


# ---- learning --------------------------------------------------------------------------------------------------------
def test_short_training_beats_chance_on_held_out_pairs(tok):
    """Deterministic (fixed seeds and data; no sampling): a 2-layer random-init model learns, in 40 steps of 8 pairs,
    to rank the world's reference replies above their defective variants on 150 prompts it never saw. Measured 0.78
    (1 and 2 threads); the assertion (0.70) leaves room for the last-bit differences of other CPUs and thread counts,
    and is far above chance (0.5: a random ranker would need a 4.9-sigma fluke to pass on 150 pairs)."""
    world = World(seed=0)
    annotator = Annotator(world, seed=0, noise=0.0)  # clean labels: the test is about learning, not the rater

    def pairs(split, n, seed):
        rng, out = random.Random(seed), []
        for t in world.tasks(split, n, kinds=("fact", "arith", "harmful"), seed=seed):
            variants = world.reply_variants(t, rng)
            ref, (_, bad) = variants[0][1], rng.choice(variants[1:])
            p = annotator.preference(t.messages, ref, bad, "safety" if t.is_safety else "helpfulness", rng)
            if p.chosen != p.rejected:
                out.append(p)
        return out

    train_pairs, test_pairs = pairs("train", 320, 0), pairs("test", 150, 1)
    cfg = common.parse_config(reward.RewardConfig, ["--batch-size", "8", "--lr", "3e-3", "--log-interval", "1000"])
    torch.manual_seed(0)
    rm, curve = reward.train(tiny_chat_model(tok.n_words), train_pairs, tok, cfg, common.Dist(), torch.float32)
    assert len(curve) == len(train_pairs) // 8
    acc = reward.accuracy(rm, tok, test_pairs)["accuracy"]
    assert acc >= 0.70, acc
    assert sum(c[1] for c in curve[-5:]) < sum(c[1] for c in curve[:5])  # the loss fell


# ---- the command line ------------------------------------------------------------------------------------------------
def test_main_end_to_end_writes_metrics_and_reuses_the_cache(tmp_path, tiny_ckpt, tok):
    flags = ["--init-from", str(tiny_ckpt), "--train-prompts", "24", "--safety-prompts", "30", "--test-prompts", "24",
             "--max-new-tokens", "6", "--batch-size", "8", "--log-interval", "1000"]  # prefs: tmp_path/prefs
    reward.main(common.parse_config(reward.RewardConfig, flags + ["--out-dir", str(tmp_path / "h"),
                                                                   "--margin-ablation"]))
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert m["complete"] and m["axis"] == "helpfulness" and m["margin"] == "small"
    assert set(m["accuracy"]) == {"helpfulness", "safety"}
    assert set(m["accuracy_by_rating"]["safety"]) == set(RATINGS)
    by_src = m["accuracy_by_source"]["helpfulness"]
    assert by_src and all(0 <= g["accuracy"] <= 1 and g["n"] >= 5 for g in by_src.values())
    assert sum(g["n"] for g in by_src.values()) <= m["n_pairs"]["test_helpfulness"]
    by_kind = m["accuracy_by_kind"]["helpfulness"]  # the world's pairs carry their prompt's task kind
    assert by_kind and set(by_kind) <= set(reward.HELPFUL_KINDS)
    assert sum(g["n"] for g in by_kind.values()) <= m["n_pairs"]["test_helpfulness"]
    assert all(sum(g["n_by_rating"].values()) == g["n"] for g in by_kind.values())
    assert list(m["margin_ablation"]) == ["none", "small", "large"]
    n_help = m["n_pairs"]["train_helpfulness"]  # §3.2.2's equal part, of which safety is a third (choice 3)
    assert n_help > 0 and m["n_pairs"]["train_safety"] == round(n_help / 3)
    assert (tmp_path / "prefs" / "train.jsonl").is_file() and m["loss_curve"]
    assert rlhf.load_reward_model(tmp_path / "h").args.head == "scalar"
    stamp = (tmp_path / "prefs" / "train.jsonl").stat().st_mtime_ns
    reward.main(common.parse_config(reward.RewardConfig, flags + ["--out-dir", str(tmp_path / "s"),
                                                                   "--axis", "safety"]))
    assert (tmp_path / "prefs" / "train.jsonl").stat().st_mtime_ns == stamp  # the second axis reused the pairs
    s = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert s["complete"] and "margin_ablation" not in s
    assert s["n_pairs"]["train_helpfulness"] == round(s["n_pairs"]["train_safety"] / 9)
    assert s["shift"] is None and [b["dir"] for b in s["accuracy_by_batch"]] == [str(tmp_path / "prefs")]
    assert s["calibration"]["offset"] is not None and m["calibration"]["offset"] is not None  # both RMs (choice 8)
    # round 2 (choice 9): a new batch sampled from two models, trained together with the first batch's pairs, and the
    # round-1 RM scored on the new batch's test pairs beside the retrained one
    r2 = ["--sample-from", str(tiny_ckpt), str(tiny_ckpt), "--prefs-dir", str(tmp_path / "prefs2"),
          "--earlier-prefs", str(tmp_path / "prefs"), "--previous-rm", str(tmp_path / "s"), "--axis", "safety"]
    reward.main(common.parse_config(reward.RewardConfig, flags + r2 + ["--out-dir", str(tmp_path / "s2")]))
    s2 = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    batches = s2["data_info"]["batches"]
    assert [b["dir"] for b in batches] == [str(tmp_path / "prefs2"), str(tmp_path / "prefs")]
    assert s2["n_pairs"]["train_available"] == sum(b["train"] for b in batches) > s["n_pairs"]["train_available"]
    assert s2["data_info"]["table26"]["train"]["comparisons"] == batches[0]["train"]  # Table 26: this batch
    shift = s2["shift"]
    assert shift["previous_rm"] == str(tmp_path / "s") and shift["n"] == s2["accuracy_by_batch"][0]["n"] > 0
    assert shift["retrained"] == s2["accuracy_by_batch"][0]["accuracy"] and 0 <= shift["previous"] <= 1
    prev = rlhf.load_reward_model(tmp_path / "s")
    new_test = [p for p in reward.read_prefs(tmp_path / "prefs2" / "test.jsonl") if p.category == "safety"]
    assert reward.accuracy(prev, tok, new_test)["accuracy"] == shift["previous"]  # recomputed
    # the ablation's RMs trained in spawned workers (one process, CPU): each equals the same RM trained here, from
    # the same cfg, at the workers' thread count (so the same float reductions)
    threads = torch.get_num_threads()
    cfg = common.parse_config(reward.RewardConfig, flags + ["--out-dir", str(tmp_path / "h"), "--prefs-dir",
                                                            str(tmp_path / "prefs")])
    try:
        here = reward.ablation_worker(cfg, "none", reward.ablation_threads())
    finally:
        torch.set_num_threads(threads)
    right = here.pop("right")  # per test pair of its own axis: kept for the paired comparison, not saved
    assert here == m["margin_ablation"]["none"]
    assert len(right) == m["n_pairs"]["test_helpfulness"] and set(right) <= {0.0, 0.5, 1.0}
    # each margin against none, pair by pair: every pair of each rating counted once, and the paired difference is
    # the two accuracies' difference (the same pairs)
    acc = {k: v["accuracy_by_rating"]["helpfulness"] for k, v in m["margin_ablation"].items()}
    assert "paired_vs_none" not in m["margin_ablation"]["none"]
    for margin in ("small", "large"):
        paired = m["margin_ablation"][margin]["paired_vs_none"]
        assert list(paired) == list(RATINGS)
        assert sum(v["n"] for v in paired.values()) == m["n_pairs"]["test_helpfulness"]
        for r, v in paired.items():
            if v["n"]:
                assert v["diff"] == pytest.approx(acc[margin][r] - acc["none"][r], abs=2e-4)
                assert v["se"] >= 0 and v["b_only"] + v["a_only"] <= v["n"]


GOOD = {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5.", "rating": "better",
        "category": "helpfulness"}


@pytest.mark.parametrize("bad, reason", [({k: v for k, v in GOOD.items() if k != "chosen"}, "missing field 'chosen'"),
                                         ({**GOOD, "rating": "much better"}, "unknown rating")])
def test_malformed_preferences_fail_with_file_and_line(tmp_path, tiny_ckpt, bad, reason):
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "reward.py"), "--data", str(f), "--init-from", str(tiny_ckpt),
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{f}:2:" in lines[0] and reason in lines[0], proc.stderr


@pytest.mark.parametrize("flags", [["--sample-from", "nowhere"], ["--sample-from", ".", "--data", "prefs.jsonl"],
                                   ["--earlier-prefs", "."], ["--previous-rm", "."], ["--rater-noise", "-0.1"], ["--rater-noise", "nan"],
                                   ["--rater-noise", "0.2", "--data", "prefs.jsonl"]])
def test_bad_world_pairs_flag_fails_with_one_line_naming_it(tmp_path, tiny_ckpt, flags):
    (tmp_path / "prefs.jsonl").write_text(json.dumps(GOOD) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "reward.py"), "--init-from", str(tiny_ckpt), *flags,
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2 and flags[0] in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()
