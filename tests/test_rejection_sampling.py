"""rejection_sampling.py: best-of-K selection, the best of all iterations, Fig. 7's statistics, and the combined reward
it selects with."""
import json

import pytest
import torch

import common
import generate as G
import rejection_sampling as RS
import rlhf
from generate import Reply


def test_best_of_k_picks_the_argmax_of_the_combined_reward():
    r_h = torch.tensor([[0.9, 0.2, 0.5], [0.3, 0.8, 0.7]])
    r_s = torch.tensor([[0.1, 0.9, 0.6], [0.9, 0.9, 0.9]])
    is_safety = torch.tensor([False, False])
    # prompt 0, sample 0: R_s = 0.1 < 0.15 -> the safety score 0.1 counts, not the helpfulness 0.9
    rc = rlhf.combined_reward(r_s.flatten(), r_h.flatten(), is_safety.repeat_interleave(3), 0.15).view(2, 3)
    assert torch.allclose(rc, torch.tensor([[0.1, 0.2, 0.5], [0.3, 0.8, 0.7]]))
    assert RS.best_of_k(rc).tolist() == [2, 1]
    # a safety prompt is judged by the safety RM alone
    rc_safe = rlhf.combined_reward(r_s.flatten(), r_h.flatten(), torch.ones(6, dtype=torch.bool)).view(2, 3)
    assert RS.best_of_k(rc_safe).tolist() == [1, 0]


def test_keep_best_keeps_the_best_of_all_iterations_not_the_last():
    """§3.2.3 from RLHF-V4 on: per prompt, the highest-reward reply over every iteration so far. Three iterations by
    hand: prompt 1's best comes from the first, prompt 2's from the last; keeping only the last iteration's best
    would give prompt 1 "1c" (0.3). A tie keeps the earlier reply; a prompt without a finished sample keeps nothing."""
    iterations = [
        [(1, 0.9, "1a"), (2, 0.2, "2a"), (3, 0.5, "3a")],
        [(1, 0.4, "1b"), (2, 0.3, "2b"), (3, 0.5, "3b"), (4, 0.7, None)],  # 3: a tie; 4: no finished sample
        [(2, 0.8, "2c"), (1, 0.3, "1c"), (4, 0.1, "4c")],
    ]
    kept, improved = {}, []
    for candidates in iterations:
        before, copy = kept, dict(kept)
        kept, n = RS.keep_best(kept, candidates)
        improved.append(n)
        assert before == copy  # a pure function: the earlier dict is left as it was
    assert kept == {1: (0.9, "1a"), 2: (0.8, "2c"), 3: (0.5, "3a"), 4: (0.1, "4c")}
    assert list(kept) == [1, 2, 3, 4]  # the order of the written dialogues: first kept first
    assert improved == [3, 1, 2]  # iteration 2: prompt 2 only; iteration 3: prompts 2 and 4


def test_max_and_median_by_n():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 0.0, 0.0, 8.0]])
    ns, maxes, medians = RS.max_median_by_n(rewards)
    assert ns == [1, 2, 4]
    assert maxes == [2.5, 3.5, 5.5]  # mean over prompts of max(first N)
    # true medians: N=2 -> (2, 2), N=4 -> (1.5, 2)
    assert medians == [2.5, 2.0, 1.75]


def test_max_of_n_grows_and_median_stays_flat_for_iid_samples():
    """Fig. 7's pattern on i.i.d. normal rewards (seed 0): E[max of N] grows like sqrt(2 log N), the median stays 0.
    With 2000 prompts the standard error of each mean is < 0.03, so the margins below are > 8 standard errors."""
    g = torch.Generator().manual_seed(0)
    ns, maxes, medians = RS.max_median_by_n(torch.randn(2000, 16, generator=g))
    assert all(b > a + 0.2 for a, b in zip(maxes, maxes[1:]))
    assert all(abs(m - medians[0]) < 0.25 for m in medians[1:])


def test_a_reply_cut_off_at_the_budget_is_never_kept(monkeypatch):
    """choice 4: a sample without EOS scores UNFINISHED_REWARD however the reward models rate it, and a prompt whose K
    samples are all cut off keeps nothing. The reward models here prefer the longest text, as ours came to prefer
    stories cut off before their closing pleasantry."""
    from common import Dist
    samples = {  # prompt -> its K = 3 samples (text, finished)
        "a": [("short.", True), ("a much longer reply cut", False), ("medium reply.", True)],
        "b": [("cut off", False), ("also cut", False), ("cut too", False)],
    }

    def fake_generate(model, tok, dialogs, max_new_tokens, temperature, top_p, seed, num_samples, progress=None):
        return [Reply(text, [len(text)], done) for d in dialogs for text, done in samples[d[0]["content"]]]

    monkeypatch.setattr(RS, "chat_generate", fake_generate)
    tasks = [type("T", (), {"messages": [{"role": "user", "content": p}], "is_safety": False})() for p in samples]
    by_length = lambda tok, tasks, replies: (torch.tensor([float(r[0]) for r in replies]) / 100,) * 2
    rewards, best, _, (r_s, is_safety) = RS.sample_all(None, None, tasks, 3, 1.0, by_length, 64, 0, Dist())
    assert torch.allclose(rewards, torch.tensor([[0.06, RS.UNFINISHED_REWARD, 0.13], [RS.UNFINISHED_REWARD] * 3]))
    assert best == ["medium reply.", None]
    # rlhf.safety_decides reads R_s of the finished samples only: a cut-off reply's reward is set by choice 4
    assert torch.allclose(r_s, torch.tensor([0.06, 0.13])) and is_safety.tolist() == [False, False]


# ---- the best of all versions: --previous ----------------------------------------------------------------------------
def _prompt(text: str, is_safety: bool = False):
    return [{"role": "user", "content": text}], is_safety


def test_earlier_versions_replies_are_rescored_by_this_runs_reward_models(tmp_path):
    """§3.2.3's best of ALL iterations, across versions: version 1 kept "old A" at reward 0.95 by ITS reward models,
    but this run's reward models score it 0.2, so this run's sample "new A" (0.5) replaces it; "old B" still beats
    "new B" by the new scores and stays. Had the stored rewards been compared, "old A" would have stayed. Two earlier
    runs keeping the same prompt give one candidate per reply, the best by the new scores first."""
    prompts = {RS.prompt_key(m): (m, s) for m, s in (_prompt("tell me A"), _prompt("how to hurt B", True))}
    a, b = list(prompts)
    for d, kept in (("v1", {a: (0.95, "old A"), b: (0.6, "old B")}), ("v2", {a: (0.9, "older A")})):
        (tmp_path / d).mkdir()
        RS.write_kept(tmp_path / d / RS.KEPT_FILE, kept, prompts)
    records = RS.load_previous([str(tmp_path / "v1"), str(tmp_path / "v2")])
    assert [(k, r) for k, _, _, r in records] == [(a, "old A"), (b, "old B"), (a, "older A")]
    assert records[1][1:3] == prompts[b]  # the prompt and its IS_SAFETY come back as written
    new_scores = {"old A": 0.2, "old B": 0.7, "older A": 0.3}
    seen = []

    def new_rms(tok, tasks, replies):
        seen.extend((t.messages, t.is_safety) for t in tasks)
        r = torch.tensor([new_scores[x] for x in replies], dtype=torch.float64)
        return r, r

    rescored = RS.rescore_previous(records, None, new_rms, common.Dist())
    assert rescored == [(a, 0.2, "old A"), (b, 0.7, "old B"), (a, 0.3, "older A")]
    assert seen == [prompts[a], prompts[b], prompts[a]]  # each reply judged with its prompt and IS_SAFETY
    previous, _ = RS.keep_best({}, rescored)
    assert previous == {a: (0.3, "older A"), b: (0.7, "old B")}
    kept, improved = RS.keep_best(previous, [(a, 0.5, "new A"), (b, 0.65, "new B")])
    assert kept == {a: (0.5, "new A"), b: (0.7, "old B")} and improved == 1
    stale, _ = RS.keep_best({a: (0.95, "old A"), b: (0.6, "old B")}, [(a, 0.5, "new A"), (b, 0.65, "new B")])
    assert stale[a] == (0.95, "old A")  # what comparing the old rewards would have kept


@pytest.mark.parametrize("content, says", [(None, "no kept.jsonl there"), ("{not json\n", "bad JSON"),
                                           ('{"key": "k", "messages": [], "is_safety": false, "reply": "r"}\n',
                                            "'messages' must be a non-empty list")])
def test_a_previous_dir_without_a_good_kept_file_stops_before_any_work(tmp_path, capsys, content, says):
    prev = tmp_path / "rs_v1"
    prev.mkdir()
    if content is not None:
        (prev / RS.KEPT_FILE).write_text(content)
    cfg = RS.RSConfig(previous=[str(prev)], init_from=str(tmp_path / "no_model"), out_dir=str(tmp_path / "rs"))
    with pytest.raises(SystemExit) as e:
        RS.main(cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --previous {prev}: "), err
    assert says in err, err
    assert not (tmp_path / "rs").exists()  # before any work: not even the output directory


def test_a_version_with_previous_keeps_the_best_of_both_runs(tmp_path):
    """Two quick runs of the loop on tiny random models: version 1 from the chat model, version 2 sampling from
    version 1 (--init-from), fine-tuning the chat model (--base), with version 1's kept replies competing
    (--previous). Every prompt version 1 kept is kept again, with version 1's reply where metrics count it as kept
    from previous, re-scored by version 2's reward models (another helpfulness RM here), and the counts add up."""
    from dist_util import tiny_stack
    stack = tiny_stack(tmp_path / "stack")
    flags = ["--quick", "--max-new-tokens", "8", "--n-test", "0", "--rm-safety", str(stack["rm_safety"])]
    RS.main(common.parse_config(RS.RSConfig, flags + ["--init-from", str(stack["chat"]), "--rm-helpful",
                                                      str(stack["rm_helpful"]), "--out-dir", str(tmp_path / "v1")]))
    # version 2's "newer" helpfulness RM: version 1's with the roles of the two RMs swapped, another scale entirely
    RS.main(common.parse_config(RS.RSConfig, flags + [
        "--init-from", str(tmp_path / "v1"), "--base", str(stack["chat"]), "--previous", str(tmp_path / "v1"),
        "--rm-helpful", str(stack["rm_safety"]), "--out-dir", str(tmp_path / "v2")]))
    read = lambda d: {r["key"]: r for r in map(json.loads, (tmp_path / d / RS.KEPT_FILE).read_text().splitlines())}
    v1, v2 = read("v1"), read("v2")
    m = common.read_metrics(tmp_path / "v2")
    assert m["complete"] and m["start"] == str(tmp_path / "v1") and m["base"] == str(stack["chat"])
    assert m["previous"] == [str(tmp_path / "v1")] and m["previous_kept"] == len(v1) >= 16
    assert set(v1) <= set(v2) and m["kept"] == len(v2)
    # version 1's replies as version 2's reward models score them (not version 1's rewards, another scale)
    cfg = common.parse_config(RS.RSConfig, ["--rm-helpful", str(stack["rm_safety"]), "--rm-safety",
                                            str(stack["rm_safety"])])
    _, tok = G.load_model_and_tokenizer(stack["chat"])
    rescored = {k: r for k, r, _ in RS.rescore_previous(RS.read_kept(tmp_path / "v1" / RS.KEPT_FILE), tok,
                                                          RS.Scorer(cfg, "cpu"), common.Dist())}
    assert any(abs(rescored[k] - v1[k]["reward"]) > 1e-3 for k in v1)  # the old rewards are indeed not comparable
    # each prompt keeps version 1's reply or a new sample that scored strictly higher (replaced)
    from_v1 = [k for k in v1 if v2[k]["reply"] == v1[k]["reply"]]
    assert all(v2[k]["reward"] > rescored[k] for k in v1 if k not in from_v1)
    assert all(v2[k]["reward"] >= rescored[k] for k in from_v1)  # the same text, this run's score or a resample's
    assert m["kept_from_previous"] == len(from_v1) and m["previous_replaced"] == len(v1) - len(from_v1)
    assert m["iterations"][0]["kept_from_previous"] == m["kept_from_previous"]
    # the metrics the report reads
    assert set(m["safety_decides"]) == {"helpful_prompts", "share_on_helpful", "safety_prompts"}
    assert m["safety_decides"]["helpful_prompts"] + m["safety_decides"]["safety_prompts"] > 0
    assert m["fig8_start"] == m["fig8_sft"] and set(m["fig8_rs"]) == set(m["fig8_sft"])
    assert len(m["n_values"]) == len(m["max_reward_by_n"]) == len(m["median_reward_by_n"])
