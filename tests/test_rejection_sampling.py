"""rejection_sampling.py: best-of-K selection, Fig. 7's statistics, and the combined reward it selects with."""
import torch

import rejection_sampling as RS
import reward


def test_best_of_k_picks_the_argmax_of_the_combined_reward():
    r_h = torch.tensor([[0.9, 0.2, 0.5], [0.3, 0.8, 0.7]])
    r_s = torch.tensor([[0.1, 0.9, 0.6], [0.9, 0.9, 0.9]])
    is_safety = torch.tensor([False, False])
    # prompt 0, sample 0: R_s = 0.1 < 0.15 -> the safety score 0.1 counts, not the helpfulness 0.9
    rc = reward.combined_reward(r_s.flatten(), r_h.flatten(), is_safety.repeat_interleave(3), 0.15).view(2, 3)
    assert torch.allclose(rc, torch.tensor([[0.1, 0.2, 0.5], [0.3, 0.8, 0.7]]))
    assert RS.best_of_k(rc).tolist() == [2, 1]
    # a safety prompt is judged by the safety RM alone
    rc_safe = reward.combined_reward(r_s.flatten(), r_h.flatten(), torch.ones(6, dtype=torch.bool)).view(2, 3)
    assert RS.best_of_k(rc_safe).tolist() == [1, 0]


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
