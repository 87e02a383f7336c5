"""rejection_sampling.py: best-of-K selection, the best of all iterations, Fig. 7's statistics, and the combined reward
it selects with."""
import torch

from generate import Reply
import rejection_sampling as RS
import rlhf


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
    tasks = [type("T", (), {"messages": [{"role": "user", "content": p}]})() for p in samples]
    by_length = lambda tok, tasks, replies: torch.tensor([float(r[0]) for r in replies]) / 100
    rewards, best, _ = RS.sample_all(None, None, tasks, 3, 1.0, by_length, 64, 0, Dist())
    assert torch.allclose(rewards, torch.tensor([[0.06, RS.UNFINISHED_REWARD, 0.13], [RS.UNFINISHED_REWARD] * 3]))
    assert best == ["medium reply.", None]
