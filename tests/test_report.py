"""The report (report.py): each section from hand-made metrics, read to the digit, and its plots."""
import json
from pathlib import Path

import pytest

import pipeline
import report


def test_report_gives_one_standard_error_of_each_small_sample_share(tmp_path):
    """Table 8's cells and Table 30's tables carry the binomial standard error sqrt(p (1 - p) / n), computed here by
    hand: 0.9 over 100 pairs is 3.0 points, 0.5 over 25 is 10.0."""
    assert report._se(0.9, 100) == " ±3.0" and report._se(0.5, 25) == " ±10.0"
    assert report._se(None, 100) == "" and report._se(0.9, 0) == ""
    ratings = ["significantly better", "better", "slightly better", "negligibly better / unsure"]
    rm = {"accuracy": {"helpfulness": 0.8, "safety": 0.7},
          "accuracy_by_rating": {a: dict(zip(ratings, (0.9, 0.8, 0.7, 0.5))) for a in ("helpfulness", "safety")},
          "n_test_by_rating": {a: dict(zip(ratings, (100, 100, 100, 25))) for a in ("helpfulness", "safety")}}
    text = "\n".join(report.section_reward(tmp_path, rm, rm))
    assert "| helpfulness RM | 90.0% ±3.0 | 80.0% ±4.0 | 70.0% ±4.6 | 50.0% ±10.0 |" in text
    # Table 8's steps: differences of shares on different pairs, their errors in quadrature: sqrt(3^2 + 4^2) = 5.0,
    # sqrt(16 + 21) = 6.1, sqrt(21 + 100) = 11.0
    assert "| helpfulness RM | +10.0 ±5.0 | +10.0 ±6.1 | +20.0 ±11.0 |" in text
    assert "| safety RM | - | - | - |" in "\n".join(report.section_reward(tmp_path, rm, {"accuracy": {}}))
    gatt = {"adherence_by_turn": {"baseline": [0.5, 0.1], "gatt": [0.9, 0.9]}, "n_eval_seen": 100}
    assert "a share near GAtt's mean (90.0%) has one standard error of 3.0 points" in "\n".join(
        report.section_gatt(tmp_path, gatt))



def test_report_splits_table8_by_task_kind(tmp_path):
    """The by-kind table prints each kind's accuracy by rating with its pairs in brackets ("-" for an empty cell), and
    is left out when no RM's metrics have it (user data without kinds, or metrics from before it existed)."""
    ratings = ["significantly better", "better", "slightly better", "negligibly better / unsure"]
    rm = {"accuracy": {"helpfulness": 0.8, "safety": 0.7}}
    assert "within each kind" not in "\n".join(report.section_reward(tmp_path, rm, rm))
    arith = {"accuracy": 0.7, "n": 30, "by_rating": dict(zip(ratings, (0.8, 0.6, None, 0.5))),
             "n_by_rating": dict(zip(ratings, (10, 10, 0, 10)))}
    h = {**rm, "accuracy_by_kind": {"helpfulness": {"arith": arith}, "safety": {}}}
    text = "\n".join(report.section_reward(tmp_path, h, rm))
    assert "Table 8 within each kind of question" in text
    assert "| helpfulness RM | arith | 80.0% (10) | 60.0% (10) | - (0) | 50.0% (10) |" in text
    assert "| safety RM |" not in text.split("within each kind")[1]  # no kinds in the safety RM's metrics



def test_report_gives_table28_pair_by_pair(tmp_path):
    """Under Table 28, each margin's paired difference against none (points, paired standard error, the pairs only one
    RM ranks right); left out for metrics from before it existed."""
    ratings = ["significantly better", "better", "slightly better", "negligibly better / unsure"]
    by = {"helpfulness": dict(zip(ratings, (0.9, 0.8, 0.7, 0.6)))}
    abl = {m: {"accuracy": {"helpfulness": 0.8}, "accuracy_by_rating": by} for m in ("none", "small", "large")}
    h = {"accuracy": {"helpfulness": 0.8, "safety": 0.7}, "margin_ablation": abl}
    text = "\n".join(report.section_reward(tmp_path, h, {"accuracy": {"helpfulness": 0.7, "safety": 0.8}}))
    assert "Table 28 in miniature" in text and "pair by pair" not in text
    cell = {"diff": 0.0075, "se": 0.0061, "n": 266, "b_only": 3, "a_only": 1}
    empty = {"diff": None, "se": None, "n": 0, "b_only": 0, "a_only": 0}
    abl["small"]["paired_vs_none"] = dict(zip(ratings, (cell, cell, cell, empty)))
    text = "\n".join(report.section_reward(tmp_path, h, {"accuracy": {"helpfulness": 0.7, "safety": 0.8}}))
    assert "| small | +0.8 ±0.6 (3/1) | +0.8 ±0.6 (3/1) | +0.8 ±0.6 (3/1) | - |" in text
    assert "| large |" not in text.split("pair by pair")[1]  # no paired figures for it



def test_report_draws_its_plots_when_matplotlib_is_installed(tmp_path):
    """With matplotlib (optional; CI installs it): Fig. 7 and Fig. 8 of each version and Table 30 become PNGs beside
    the report, each linked from it; without it the report is the same tables and no image."""
    pytest.importorskip("matplotlib")
    rs = {"n_values": [1, 2, 4], "max_reward_by_n": [0.1, 0.3, 0.4], "median_reward_by_n": [0.1, 0.1, 0.1],
          "fig8_sft": {"0.7": [0.1, 0.2, 0.3], "1.2": [0.0, 0.25, 0.35]}}
    gatt = {"adherence_by_turn": {"baseline": [0.9, 0.4], "gatt": [1.0, 0.95]},
            "adherence_by_turn_unseen": {"baseline": [0.5, 0.1], "gatt": [0.6, 0.2]}}
    text = "\n".join(report.section_rs(tmp_path, {"RLHF-V1": rs}) + report.section_gatt(tmp_path, gatt))
    for name in ("fig7_rlhf_v1", "fig8_rlhf_v1", "table30_seen", "table30_unseen"):
        png = tmp_path / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![{name}]({name}.png)" in text
    assert "| Fig. 8, the model sampled from: best T | 1.2 (0.350) |" in text  # the best temperature at N = 4



def test_report_lists_the_targets_at_a_glance():
    """Hand-made metrics of a 2-version run: each target read to the digit ("yes" / "**no**"), rows only for what the
    run measured, and no section at all before any stage has finished."""
    ratings = ["significantly better", "better", "slightly better", "negligibly better / unsure"]
    by = lambda *xs: dict(zip(ratings, xs))  # noqa: E731
    abl = {"none": {"accuracy_by_rating": {"helpfulness": by(0.93, 0, 0, 0)}},
           "small": {"accuracy_by_rating": {"helpfulness": by(0.94, 0, 0, 0)}},
           "large": {"accuracy_by_rating": {"helpfulness": by(0.929, 0, 0, 0)}}}
    m = {"sft": {"qa_correct_in_format": 0.7, "stage_seconds": 100},
         "rm_helpful_v2": {"accuracy": {"helpfulness": 0.70, "safety": 0.83}, "stage_seconds": 120,
                           "accuracy_by_rating": {"helpfulness": by(0.92, 0.93, 0.8, 0.6)}, "margin_ablation": abl,
                           "shift": {"previous": 0.66, "retrained": 0.70, "n": 400}},
         "rm_safety_v2": {"accuracy": {"helpfulness": 0.78, "safety": 0.84}, "stage_seconds": 20,
                          "accuracy_by_rating": {"safety": by(0.96, 0.93, 0.8, 0.5)},
                          "shift": {"previous": 0.85, "retrained": 0.84, "n": 400}},
         "eval_v1": {"win_rate": 0.6, "n_prompts": 400}, "eval_v2_vs_v1": {"win_rate": 0.5, "n_prompts": 400},
         "eval_ppo_vs_rs": {"win_rate": 0.55, "n_prompts": 400}, "eval_ppo_vs_sft": {"win_rate": 0.699},
         "gatt": {"adherence_by_turn": {"baseline": [1, 0.6, 0.55, 0.52, 0.51, 0.49, 0.3, 0.2], "gatt": [0.9] * 8}}}
    get = lambda n: m.get(n) or {}  # noqa: E731
    text = "\n".join(report.section_targets(get, 2, pipeline.stages(2)))
    assert "| SFT: held-out fact and arithmetic answers right, in format >= 70% | 70.0% | yes |" in text
    assert "| helpfulness RM (V2) >= 70% on the helpfulness test set | 70.0% | yes |" in text
    assert "| Table 7: each RM best on its own test set | 70.0% vs 78.0%; 84.0% vs 83.0% | **no** |" in text
    assert "| Table 8: the helpfulness RM's accuracy falls level by level | 92.0% / 93.0% / 80.0% / 60.0% | **no** |" \
        in text
    assert "| Table 8: the safety RM's accuracy falls level by level | 96.0% / 93.0% / 80.0% / 50.0% | yes |" in text
    assert '| Table 28: a margin does not lower "significantly better" | none 93.0% / small 94.0% / large 92.9% | ' \
        '**no** |' in text
    assert "round 2 helpful RM: the last round's RM less accurate on the new pairs | 66.0% vs 70.0% | yes |" in text
    assert "round 2 safety RM: the last round's RM less accurate on the new pairs | 85.0% vs 84.0% | **no** |" in text
    assert "| RLHF-V1 beats SFT (annotator, ties half) | 60.0% ±2.4 | yes |" in text
    assert "| RLHF-V2 RS beats V1 (annotator, ties half) | 50.0% ±2.5 | **no** |" in text  # a tie is not a win
    assert "| RLHF-V2 (PPO) beats its RS start >= 55% (annotator, ties half) | 55.0% ±2.5 | yes |" in text
    assert "| RLHF-V2 wins against SFT >= 70% (annotator, ties half) | 69.9% | **no** |" in text
    assert "| Table 30: after GAtt >= 90% at every turn | lowest 90.0% | yes |" in text
    assert "| Table 30: before GAtt below 50% by turn 6 | lowest of turns 1-6 49.0% | yes |" in text
    assert "held-out constraints" not in text and "whole recipe" not in text  # not measured
    assert report.section_targets(lambda n: {}, 2, pipeline.stages(2)) == []


def test_a_quick_report_shows_the_targets_without_grading_them(tmp_path):
    """A --quick run is a smoke test: its targets table keeps every figure but grades none against the full run's
    targets; the full run's report is graded as before."""
    m = {"sft": {"qa_correct_in_format": 0.7}, "eval_ppo_vs_sft": {"win_rate": 0.649}}
    stages = pipeline.stages(3)
    quick = "\n".join(report.section_targets(lambda n: m.get(n) or {}, 3, stages, quick=True))
    assert "| SFT: held-out fact and arithmetic answers right, in format >= 70% | 70.0% | not graded (quick run) |" \
        in quick and "| RLHF-V3 wins against SFT >= 70% (annotator, ties half) | 64.9% | not graded (quick run) |" \
        in quick
    assert "| yes |" not in quick and "**no**" not in quick and "was a --quick run" in quick
    full = "\n".join(report.section_targets(lambda n: m.get(n) or {}, 3, stages))
    assert "| 70.0% | yes |" in full and "| 64.9% | **no** |" in full and "quick" not in full
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.json").write_text(json.dumps(m["sft"]))
    assert "not graded (quick run)" in report.write_report(tmp_path, stages, quick=True).read_text()



def test_plots_say_what_they_measure(tmp_path, monkeypatch):
    """Every plot has a title and labelled axes; PPO's reward and KL, on different scales, get an axes each rather
    than one axis labelled "value"."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    seen = {}
    save = Figure.savefig

    def record(fig, path, **kw):
        seen[Path(path).stem] = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), [line.get_label() for line in
                                                                                  ax.lines]) for ax in fig.axes]
        return save(fig, path, **kw)
    monkeypatch.setattr(Figure, "savefig", record)
    ppo = {"iters": [], "reward_by_iter": [[0, 0.4], [1, 0.5]], "kl_by_iter": [[0, 0.0], [1, 0.02]]}
    report.section_ppo(tmp_path, ppo, {})
    report.section_pretrain(tmp_path, {"loss_curve": [[0, 5.0], [10, 4.0]], "val_curve": [[10, 4.1]]})
    report.section_gatt(tmp_path, {"adherence_by_turn": {"baseline": [0.9, 0.4], "gatt": [1.0, 0.95]}})
    (reward, kl) = seen["ppo_reward_kl"]
    assert reward[0] and "reward" in reward[2] and reward[3] == ["RM reward"]
    assert "KL" in kl[2] and kl[3] == ["KL"] and kl[1] == "PPO iteration"
    for name in ("fig5_pretrain_loss", "table30_seen"):
        title, xlabel, ylabel, _ = seen[name][0]
        assert title and xlabel and ylabel and ylabel != "value", seen[name]
    assert (tmp_path / "ppo_reward_kl.png").is_file()




def test_report_follows_the_versions(tmp_path):
    """The iterations section and Fig. 11 from hand-made metrics of a 2-version run: Table 26 per batch, the
    distribution shift per round and RM, how often R_s decided, Fig. 20's quantiles per version (SFT from the first
    evaluation's B side), and each version's win rate against SFT by the annotator and by the RMs."""
    hist = {"edges": [i / 10 for i in range(11)], "counts": [1] * 10}
    dist = lambda mean: {"mean": mean, "quantiles": [0.1, 0.2, 0.3, 0.4, 0.5], "histogram": hist}  # noqa: E731
    m = {"rm_helpful_v1": {"data_info": {"sample_from": ["out/sft"], "table26": {"train": {
             "comparisons": 900, "turns": 1.3, "tokens_per_example": 60.5, "tokens_per_prompt": 30.0,
             "tokens_per_response": 30.5}}}, "accuracy": {"helpfulness": 0.7}, "calibration": {"offset": 1.5}},
         "rm_helpful_v2": {"data_info": {"sample_from": ["out/rlhf_v1", "out/sft"], "table26": {"train": {
             "comparisons": 800, "turns": 1.2, "tokens_per_example": 50.0, "tokens_per_prompt": 29.0,
             "tokens_per_response": 21.0}}}, "shift": {"previous": 0.6, "retrained": 0.7, "n": 100}},
         "rs_v1": {"safety_decides": {"share_on_helpful": 0.02}},
         "eval_v1": {"a": "out/rlhf_v1", "b": "out/sft", "win_rate": 0.6, "n_prompts": 100,
                     "rm_combined": {"win_rate": 0.7}, "rm_reward_a": dist(0.6), "rm_reward_b": dist(0.5)},
         "eval_v2": {"a": "out/rlhf_v2_rs", "b": "out/sft", "win_rate": 0.65, "rm_combined": {"win_rate": 0.8},
                     "rm_reward_a": dist(0.7)},
         "eval_v2_vs_v1": {"a": "out/rlhf_v2_rs", "b": "out/rlhf_v1", "win_rate": 0.55}}
    get = lambda n: m.get(n) or {}  # noqa: E731
    text = "\n".join(report.section_iterations(tmp_path, get, 2) + report.section_eval(tmp_path, get, 2))
    assert "| 1 | sft | 900 | 1.3 | 60.5 | 30.0 | 30.5 |" in text and "| 2 | rlhf_v1, sft | 800 |" in text
    assert "| 2 | helpful | 100 | 60.0% ±4.9 | 70.0% ±4.6 |" in text  # sqrt(.6 .4 / 100), sqrt(.7 .3 / 100)
    assert "| 1 | 70.0% | - | 1.5 | - |" in text
    assert "RLHF-V1 2.0%" in text  # R_s decided 2% of the helpfulness prompts' rewards in RS V1
    assert "| SFT | 0.500 | 0.100 |" in text and "| RLHF-V1 | 0.600 |" in text and "| RLHF-V2 RS | 0.700 |" in text
    assert "| RLHF-V1 | sft | 60.0% ±4.9 | 70.0% |" in text and "| RLHF-V2 RS | sft | 65.0% | 80.0% |" in text
    assert "| RLHF-V2 RS | rlhf_v1 | 55.0% |" in text
