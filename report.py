"""The report of a pipeline run (out/report.md): the paper's tables and figures in miniature, built only from the
stages' metrics.json files, with the paper's own numbers quoted beside ours for the pattern to compare.

  python report.py --out out        # rebuild out/report.md from the metrics a run left (pipeline.py writes it)
                                    # (the versions: out/rm_helpful_vK; a --quick run: its commands say so)

Sections: the targets at a glance; pretraining (Fig. 5); SFT; the reward models of the last version (Tables 7, 8, 28);
the iterations (Table 26, the distribution shift, how often R_s decides, Fig. 20); rejection sampling of each version
(Figs. 7, 8); PPO, by the reward models and by the annotator; Ghost Attention (Table 30, Fig. 10); the evaluations
(Fig. 11). Plots need matplotlib (optional).
"""
from __future__ import annotations

import math
from pathlib import Path

import common

def _fmt(v, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def _plot(out: Path, name: str, title: str, xlabel: str, panels: list[tuple[str, dict]]) -> str:
    """A PNG when matplotlib is installed (optional), else nothing. One axes per panel (ylabel, {label: [(x, y)]}),
    stacked over a shared x axis: quantities on different scales (PPO's reward and KL) each get their own."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, axes = plt.subplots(len(panels), 1, figsize=(5.5, 1 + 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for label, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend()
    axes[0, 0].set_title(title, fontsize=10)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
    return f"\n![{name}]({name}.png)\n"


def section_pretrain(out: Path, m: dict) -> list[str]:
    lines = ["## 1. Pretraining (§2, Fig. 5)", "",
             "The paper trains 7B-70B models on 2T tokens and the loss is still falling at the end (Fig. 5). Here a "
             f"{_fmt(m.get('params'))}-parameter model sees {_fmt(m.get('tokens_seen'))} tokens of the miniature world.",
             "", "| measure | this run | what to look for |", "|---|---|---|",
             f"| train loss (last step) | {_fmt(m.get('train_loss'))} | falls steadily, like Fig. 5 |",
             f"| validation loss | {_fmt(m.get('val_loss'))} | far below the unigram entropy "
             f"{_fmt(m.get('unigram_entropy'))} nats: the model uses context |",
             f"| fact recall (completion prompts) | {_fmt(m.get('fact_recall'), pct=True)} | the world's facts are "
             "stored in the weights |",
             f"| held-out sums completed right (\"26 + 16 =\") | {_fmt(m.get('arith_correct'), pct=True)} | "
             "arithmetic, the skill a small model learns last (world.PRETRAIN_MIX) |",
             f"| the same sums asked (\"Q: What is 26 + 16? A:\"), operands copied and result right | "
             f"{_fmt(m.get('arith_asked_correct'), pct=True)} | what SFT's arithmetic needs: copying the operands "
             "from the question is a skill of its own (pretrain.arithmetic_asked) |",
             f"| training throughput | {_fmt(m.get('tokens_per_sec'))} tokens/s, MFU {_fmt(m.get('mfu'), pct=True)} "
             f"| on {m.get('device', '?')} |", ""]
    curve = m.get("loss_curve") or []
    if curve:
        pts = [curve[int(i * (len(curve) - 1) / 5)] for i in range(6)]
        lines += ["Loss curve (Fig. 5 in miniature): " + ", ".join(f"step {s}: {v:.3f}" for s, v in pts), ""]
        lines.append(_plot(out, "fig5_pretrain_loss", "Fig. 5 in miniature: pretraining loss", "training step",
                           [("loss (nats per token)", {"train": curve, "validation": m.get("val_curve")})]))
    if m.get("samples"):
        lines += ["Samples:", ""] + [f"    {s!r}" for s in m["samples"]] + [""]
    return lines


def _pct(v):
    return _fmt(v, pct=True)


def _stderr(p: float, n: int) -> float:
    """One standard error, in points, of a share p measured on n items: sqrt(p (1 - p) / n). The test sets are
    small, so the report says how far a figure could move."""
    return 100 * math.sqrt(p * (1 - p) / n)


def _se(p, n) -> str:
    """_stderr as a table cell's suffix, " ±2.4" ("" when the share or its count is unknown)."""
    return f" ±{_stderr(p, n):.1f}" if p is not None and n else ""


def _on_axis(m: dict, key: str, axis: str) -> dict:
    """An RM's figures on one test set, m[key][axis] ({} where the metrics lack them)."""
    return (m.get(key) or {}).get(axis) or {}


def _step(p1, n1, p2, n2) -> str:
    """A table cell for the difference of two shares measured on different items: "+5.6 ±3.2" (points; "-" when
    either is unknown)."""
    if p1 is None or p2 is None or not n1 or not n2:
        return "-"
    return f"{100 * (p1 - p2):+.1f} ±{math.hypot(_stderr(p1, n1), _stderr(p2, n2)):.1f}"


def section_sft(out: Path, m: dict) -> list[str]:
    lines = ["## 2. Supervised fine-tuning (§3.1)", "",
             "Loss on answer tokens only (prompt tokens zeroed), packed dialogs that cannot see each other.", "",
             "| measure | this run |", "|---|---|",
             f"| answer-token validation loss before -> after | {_fmt(m.get('val_loss_before'))} -> "
             f"{_fmt(m.get('val_loss'))} |",
             f"| annotator helpfulness (held-out prompts, 0-1) | {_fmt(m.get('helpfulness'))} |",
             f"| format valid (ends with EOS, no leaked tags) | {_pct(m.get('format_valid'))} |",
             f"| fact + arithmetic answers correct and in format (target >= 70%) | "
             f"{_pct(m.get('qa_correct_in_format'))} |",
             f"| harmful prompts answered unsafely | {_pct(m.get('safety_violation_rate'))} |",
             f"| borderline prompts refused | {_pct(m.get('borderline_refusal_rate'))} |", ""]
    per = m.get("per_kind") or {}
    if per:
        lines += ["| kind | n | helpfulness | correct |", "|---|---|---|---|"]
        lines += [f"| {k} | {v.get('n')} | {_fmt(v.get('helpfulness'))} | {_pct(v.get('correct'))} |"
                  for k, v in per.items()] + [""]
    for ex in (m.get("examples") or [])[:6]:
        lines.append(f"- *{ex['kind']}*: {ex['prompt']!r} -> {ex['reply']!r}")
    return lines + [""]


def section_reward(out: Path, h: dict, s: dict, version: str = "") -> list[str]:
    acc = lambda m, a: _pct((m.get("accuracy") or {}).get(a))  # noqa: E731
    noise = ((h.get("data_info") or {}).get("key") or {}).get("rater_noise")  # None for the user's --data
    lines = [f"## 3. Reward models{version} (§3.2.2, Tables 7, 8, 28)", "",
             "Each RM is the SFT model with its next-token head replaced by a scalar head (the paper's form), trained "
             "one epoch on every batch of the annotator's pairs so far" + (
                 f" (rater noise {noise:g}: reward.py --rater-noise, choice 6)." if noise is not None else "."),
             "The test sets hold every batch's held-out pairs.", "",
             "Table 7 in miniature: each RM's accuracy on each test set (the paper: safety RM 64.5 on Meta Safety, "
             "helpfulness RM 63.2 on Meta Helpful; each is best on its own axis).", "",
             "| reward model | helpfulness test | safety test |", "|---|---|---|",
             f"| helpfulness RM | {acc(h, 'helpfulness')} | {acc(h, 'safety')} |",
             f"| safety RM | {acc(s, 'helpfulness')} | {acc(s, 'safety')} |", "",
             "Table 8 in miniature: accuracy by rating on each RM's own test set (the paper's helpfulness RM on Meta "
             "Helpful: 80.7 / 67.5 / 60.9 / 54.7; accuracy falls as the pair gets closer), with one standard error "
             "(the pairs per rating are in metrics.json).", "",
             "| reward model | significantly better | better | slightly better | negligibly better / unsure |",
             "|---|---|---|---|---|"]
    from annotator import RATINGS
    R, steps = RATINGS, []
    for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety")):
        by, n_by = _on_axis(m, "accuracy_by_rating", axis), _on_axis(m, "n_test_by_rating", axis)
        lines.append(f"| {name} | " + " | ".join(_pct(by.get(r)) + _se(by.get(r), n_by.get(r)) for r in R) + " |")
        steps.append(f"| {name} | " + " | ".join(_step(by.get(a), n_by.get(a), by.get(b), n_by.get(b))
                                                 for a, b in zip(R, R[1:])) + " |")
    lines += ["", "Table 8's fall, level by level: each level minus the next, in points, with one standard error of the "
                  "difference (different pairs, so the two errors add in quadrature). The paper's pattern is every "
                  "step above zero; a step within about one standard error of zero is one another seed could "
                  "reverse.", "",
              "| reward model | " + " | ".join(f"{a} - {b}" for a, b in zip(R, R[1:])) + " |",
              "|---|" + "---|" * (len(R) - 1), *steps]
    srcs = [(name, axis, _on_axis(m, "accuracy_by_source", axis))
            for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety"))]
    if any(g for _, _, g in srcs):
        lines += ["", "Accuracy on its own test set by which model variant (checkpoint and temperature) wrote the "
                      "chosen and the rejected reply (reward.py choice 2).", "",
                  "| reward model | chosen > rejected | pairs | accuracy |", "|---|---|---|---|"]
        for name, _, groups in srcs:
            lines += [f"| {name} | {k.replace('>', ' > ')} | {v['n']} | {_pct(v['accuracy'])} |"
                      for k, v in list(groups.items())[:12]]
    kinds = [(name, _on_axis(m, "accuracy_by_kind", axis))
             for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety"))]
    if any(g for _, g in kinds):
        lines += ["", "Table 8 within each kind of question (each RM on its own test set; in brackets the pairs of "
                      "each cell). A level's accuracy also depends on which questions fill it: a sum is checked by a "
                      "trunk that adds as well as the chat model does (section 2's arithmetic), a fact by one that "
                      "recalls it, so a kind the RM judges worse pulls down the level where its pairs gather "
                      "(reward.py accuracy_by_kind).", "",
                  "| reward model | kind | significantly better | better | slightly better | negligibly better / unsure "
                  "|", "|---|---|---|---|---|---|"]
        for name, groups in kinds:
            lines += [f"| {name} | {k} | " + " | ".join(f"{_pct(v['by_rating'].get(r))} ({v['n_by_rating'].get(r, 0)})"
                                                     for r in RATINGS) + " |" for k, v in groups.items()]
    abl = h.get("margin_ablation") or s.get("margin_ablation")
    if abl:
        axis = "helpfulness" if h.get("margin_ablation") else "safety"
        lines += ["", f"Table 28 in miniature: the margin m(r) ({axis} RM, accuracy by rating; the paper: a margin "
                      "helps the distinct pairs, 79.1 -> 80.7 on significantly better).", "",
                  "| margin | significantly better | better | slightly better | negligibly better / unsure |",
                  "|---|---|---|---|---|"]
        n_by = _on_axis(h if axis == "helpfulness" else s, "n_test_by_rating", axis)  # the same test set
        for margin, v in abl.items():
            by = _on_axis(v, "accuracy_by_rating", axis)
            lines.append(f"| {margin} | " + " | ".join(_pct(by.get(r)) + _se(by.get(r), n_by.get(r))
                                                       for r in RATINGS) + " |")
        paired = {m: v["paired_vs_none"] for m, v in abl.items() if v.get("paired_vs_none")}
        if paired:
            lines += ["", "The same, each margin against none pair by pair (reward.paired_difference): the three RMs are "
                          "judged on the same pairs and agree on most, so their difference is measured far more "
                          "finely than each accuracy. Points of accuracy with the paired standard error; in brackets "
                          "the pairs only the margin RM ranks right / only the RM without a margin does.", "",
                      "| margin - none | significantly better | better | slightly better | negligibly better / unsure "
                      "|", "|---|---|---|---|---|"]
            for margin, by in paired.items():
                lines.append(f"| {margin} | " + " | ".join(_paired_cell(by.get(r)) for r in RATINGS) + " |")
    return lines + [""]


def _paired_cell(v) -> str:
    """One cell of the paired Table 28: "+0.8 ±0.6 (3/1)" in points ("-" where no pair has the rating)."""
    if not v or v.get("diff") is None:
        return "-"
    return f"{100 * v['diff']:+.1f} ±{100 * v['se']:.1f} ({v['b_only']}/{v['a_only']})"


def section_rs(out: Path, runs: dict) -> list[str]:
    """runs: version label -> that version's rejection_sampling.py metrics."""
    lines = ["## 5. Rejection sampling, version by version (§3.2.3, Figs. 7 and 8)", "",
             "Each version samples K replies per prompt from the latest model, the latest reward models pick the best, "
             "and the SFT model is fine-tuned on the best reply of every iteration so far. Fig. 7 in miniature: the "
             "best of N samples gets better as N grows while the median stays flat; the gap is what rejection "
             "sampling harvests. Fig. 8: the best temperature moves as the model changes.", ""]
    for label, m in runs.items():
        ns = m.get("n_values") or []
        it = (m.get("iterations") or [{}])[-1]
        sd = (m.get("safety_decides") or {}).get("share_on_helpful")
        lines += [f"*{label}* (sampled from {Path(str(m.get('start', '?'))).name}; temperature "
                  f"{it.get('temperature', '-')}; kept {it.get('kept', '-')} prompts, {m.get('kept_from_previous', 0)} "
                  "of them from earlier versions; "
                  f"R_s decided {_pct(sd)} of the helpfulness prompts' rewards)", "",
                  "| N | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---|" * len(ns),
                  "| max reward | " + " | ".join(f"{x:.3f}" for x in m.get("max_reward_by_n") or []) + " |",
                  "| median reward | " + " | ".join(f"{x:.3f}" for x in m.get("median_reward_by_n") or []) + " |"]
        for key, who in (("fig8_sft", "the model sampled from"), ("fig8_rs", "the RS model")):
            if m.get(key):
                lines += [f"| Fig. 8, {who}: best T | " + _best_t(m[key]) + " |" + " |" * (len(ns) - 1)]
        lines.append("")
        if ns:
            tag = label.split()[0].lower().replace("-", "_")
            lines.append(_plot(out, f"fig7_{tag}", f"Fig. 7 in miniature ({label}): best and median of N",
                               "N samples per prompt", [("combined reward (sigmoid scale)", {
                                   "max of N": list(zip(ns, m.get("max_reward_by_n") or [])),
                                   "median of N": list(zip(ns, m.get("median_reward_by_n") or []))})]))
            if m.get("fig8_sft"):
                lines.append(_plot(out, f"fig8_{tag}", f"Fig. 8 in miniature ({label}): best of N by temperature",
                                   "N samples per prompt", [("mean max-of-N reward", {
                                       f"T = {T}": list(zip(ns, xs)) for T, xs in m["fig8_sft"].items()})]))
    return lines + [""]


def _best_t(curves: dict) -> str:
    """Fig. 8's reading: the temperature whose max-of-N reward at the largest N is highest, with that reward."""
    t, xs = max(curves.items(), key=lambda kv: kv[1][-1])
    return f"{t} ({xs[-1]:.3f})"


def section_ppo(out: Path, m: dict, ev: dict) -> list[str]:
    evals = m.get("evals") or []
    best, a_best = m.get("best_iteration"), m.get("annotator_best_iteration")
    if m.get("select_by", "rm") == "rm":
        how = (f"The iterate kept is the one the latest reward models score best on held-out prompts (§3.4.1: "
               f"iteration {best}); the annotator's view of the same iterates is logged beside it and decides nothing "
               f"(it would have kept iteration {a_best}).")
    else:
        how = (f"Aid on (--select-by annotator): the annotator picked the iterate kept (iteration {best}), which the "
               "paper's raters never did.")
    lines = ["## 6. PPO on the last version's RS model (§3.2.3)", "",
             f"R = WHITEN(LOGIT(R_c)) - beta KL, beta = {m.get('kl_coef')}. {how} Where the reward models' view and "
             "the annotator's part, the policy is learning what the reward models like and the raters do not: reward "
             "hacking.", ""]
    if best == 0:
        judge = "reward models" if m.get("select_by", "rm") == "rm" else "annotator"
        lines += [f"**PPO did not improve on its start by the {judge}: the kept model is the RS model.**", ""]
    if evals:
        lines += ["| iteration | latest RMs (held-out) | annotator (held-out) |", "|---|---|---|"]
        lines += [f"| {e['iteration']} | {_fmt(e.get('rm'))} | {_fmt(e.get('annotator'))} |" for e in evals]
        lines.append(_plot(out, "ppo_rm_vs_annotator", "PPO iterates: reward models against the annotator",
                           "PPO iteration", [("RM view", {"latest RMs": [(e["iteration"], e["rm"]) for e in evals]}),
                                             ("annotator view", {"annotator": [(e["iteration"], e["annotator"])
                                                                               for e in evals]})]))
    lines += ["", "| iteration | RM reward | KL to pi_0 | clip fraction | value loss | reply length |",
              "|---|---|---|---|---|---|"]
    for it in (m.get("iters") or [])[::max(1, len(m.get("iters") or []) // 10)]:
        lines.append(f"| {it['iter']} | {it['rm_reward']:.3f} | {it['kl']:.3f} | {it['clip_frac']:.3f} | "
                     f"{it['value_loss']:.3f} | {it['reply_len']:.1f} |")
    lines.append(_plot(out, "ppo_reward_kl", "PPO: reward and KL to the initial policy", "PPO iteration",
                       [("RM reward (sigmoid scale)", {"RM reward": m.get("reward_by_iter")}),
                        ("KL to the initial policy", {"KL": m.get("kl_by_iter")})]))
    a, b = ev.get("model_a") or {}, ev.get("model_b") or {}
    lines += ["", f"Against its start, the RS model (eval_ppo_vs_rs, {ev.get('n_prompts', '-')} test prompts):", "",
              "| measure | PPO | RS |", "|---|---|---|",
              f"| win rate against the RS model, annotator (target >= 55%) | {_pct(ev.get('win_rate'))} | - |",
              f"| harmful prompts answered unsafely | {_pct(a.get('safety_violation_rate'))} | "
              f"{_pct(b.get('safety_violation_rate'))} |",
              f"| borderline prompts refused | {_pct(a.get('borderline_refusal_rate'))} | "
              f"{_pct(b.get('borderline_refusal_rate'))} |"]
    return lines + [""]


def section_gatt(out: Path, m: dict) -> list[str]:
    lines = ["## 7. Ghost Attention (§3.3, Table 30)", "",
             "Share of replies that keep the instruction given only in the first turn (the paper: baseline 100% at "
             "turn 2, 10% at 4, 0% at 6; with GAtt 100% at every turn).", ""]
    for key, title in (("adherence_by_turn", "constraints seen in training"),
                       ("adherence_by_turn_unseen", "constraints held out of training")):
        a = m.get(key) or {}
        if not a:
            continue
        n = len(a.get("baseline", []))
        lines += [f"*{title}*", "", "| model | " + " | ".join(f"turn {t + 1}" for t in range(n)) + " |",
                  "|---|" + "---|" * n]
        lines += [f"| {who} | " + " | ".join(_pct(x) for x in a.get(who, [])) + " |" for who in ("baseline", "gatt")]
        lines.append(_plot(out, "table30_" + ("seen" if key == "adherence_by_turn" else "unseen"),
                           f"Table 30 in miniature: {title}", "dialogue turn",
                           [("share of replies keeping the instruction",
                             {who: list(enumerate(a.get(who) or [], 1)) for who in ("baseline", "gatt")})]))
        n_dialogs = m.get("n_eval_seen" if key == "adherence_by_turn" else "n_eval_unseen")
        if n_dialogs and a.get("gatt"):
            p = sum(a["gatt"]) / len(a["gatt"])
            lines += ["", f"{n_dialogs} held-out dialogues per model: a share near GAtt's mean ({_pct(p)}) has one "
                          f"standard error of {_stderr(p, n_dialogs):.1f} points."]
        lines.append("")
    dropped = m.get("dropped_by_kind") or {}
    a = m.get("aids") or {}
    aids = [f"{k} {v}" for k, v in a.items() if v and (k != "mix" or a.get("mix_ratio"))]
    lines.append("GAtt trains on the model's own replies, sampled with the instruction in every turn; a reply that "
                 "breaks the instruction's rule is dropped with the rest of its dialogue, never replaced (gatt.py "
                 f"choice 1): {_pct(m.get('dropped_share'))} of the dialogue turns were lost"
                 + (" (" + ", ".join(f"{k} {_pct(v)}" for k, v in dropped.items()) + ")" if dropped else "")
                 + (f". Aids on: {', '.join(aids)}." if aids else ". No aid was on: the paper's form."))
    att, on_history = m.get("attention_to_instruction") or {}, m.get("adherence_on_gatt_history") or {}
    if att.get("gatt"):
        n = len(att["gatt"]["mean"])
        lines += ["", f"*Fig. 10 in numbers* ({att['gatt']['n']} of the held-out dialogues as the GAtt model finished "
                  "them, read by both models): the share of attention the positions writing each turn's reply pay to "
                  "the instruction's tokens in turn 1; and the share of each model's replies that keep the "
                  "instruction after that same history, as it is and with the instruction taken out of turn 1 (then "
                  "only the earlier replies carry it). The paper's Fig. 10 shows GAtt keeping large attention on the "
                  "system message through the dialogue.", "",
                  "| model | measure | " + " | ".join(f"turn {t + 1}" for t in range(n)) + " |",
                  "|---|---|" + "---|" * n]
        for who in ("baseline", "gatt"):
            a = att.get(who) or {}
            lines += [f"| {who} | attention, mean of layers and heads | "
                      + " | ".join(_pct(x) for x in a.get("mean", [])) + " |",
                      f"| {who} | attention, the head that looks most | "
                      + " | ".join(_pct(x) for x in a.get("max_head", [])) + " |",
                      f"| {who} | kept after this history | - | "
                      + " | ".join(_pct(x) for x in on_history.get(who, {}).get("with_instruction", [])) + " |",
                      f"| {who} | kept, instruction taken out | - | "
                      + " | ".join(_pct(x) for x in on_history.get(who, {}).get("without_instruction", [])) + " |"]
        lines.append(_plot(out, "gatt_attention", "Fig. 10 in numbers: attention on the turn-1 instruction",
                           "dialogue turn", [("share of attention (mean of layers, heads)",
                                              {who: list(enumerate(att[who]["mean"], 1)) for who in att})]))
    return lines + [""]


def versions(rounds: int) -> list[tuple[str, str, str]]:
    """(label, evaluation stage against SFT, rejection-sampling or PPO stage) of each RLHF version, in order."""
    out = [(f"RLHF-V{k}", f"eval_v{k}", f"rs_v{k}") for k in range(1, rounds)]
    out += [(f"RLHF-V{rounds} RS", f"eval_v{rounds}", f"rs_v{rounds}"), (f"RLHF-V{rounds}", "eval_ppo_vs_sft", "ppo")]
    return out


def section_iterations(out: Path, get, rounds: int) -> list[str]:
    """Table 26, the distribution shift, how often R_s decides, Fig. 20."""
    lines = ["## 4. The iterations: RLHF-V1 ... V%d (§3.2.1, §3.2.3, Table 26, Fig. 20)" % rounds, "",
             "Each version collects a new batch of preference pairs from the latest models, retrains both reward "
             "models on every batch so far, and samples from the latest model (DESIGN.md's data flow).", "",
             "Table 26 in miniature: each batch (train pairs; the paper's batches hold 1-2k to 300k comparisons, "
             "3.0-4.6 turns, 500-800 tokens per example).", "",
             "| batch | sampled from | comparisons | turns per dialogue | tokens per example | prompt | response |",
             "|---|---|---|---|---|---|---|"]
    for k in range(1, rounds + 1):
        info = get(f"rm_helpful_v{k}").get("data_info") or {}
        t = (info.get("table26") or {}).get("train") or {}
        if t:
            src = ", ".join(Path(m).name for m in info.get("sample_from") or [])
            lines.append(f"| {k} | {src} | {t.get('comparisons')} | {t.get('turns')} | {t.get('tokens_per_example')} | "
                         f"{t.get('tokens_per_prompt')} | {t.get('tokens_per_response')} |")
    lines += ["", "The distribution shift: the last round's reward models on this round's fresh test pairs, against "
                  "the reward models retrained with this round's batch (the paper: \"reward model accuracy can quickly "
                  "degrade if not exposed to this new sample distribution\").", "",
              "| round | RM | pairs | last round's RM | retrained RM |", "|---|---|---|---|---|"]
    for k in range(2, rounds + 1):
        for name in ("helpful", "safety"):
            sh = get(f"rm_{name}_v{k}").get("shift") or {}
            if sh:
                n = sh.get("n")
                lines.append(f"| {k} | {name} | {n} | {_pct(sh.get('previous'))}{_se(sh.get('previous'), n)} | "
                             f"{_pct(sh.get('retrained'))}{_se(sh.get('retrained'), n)} |")
    lines += ["", "Each round's reward models on their own test sets (all batches so far), and their zero points "
                  "(reward.py choice 8: both put sigmoid = 0.15 at the 5th percentile of their safe training replies to "
                  "helpfulness prompts).",
              "", "| round | helpfulness RM | safety RM | R_h offset | R_s offset |", "|---|---|---|---|---|"]
    for k in range(1, rounds + 1):
        h, s = get(f"rm_helpful_v{k}"), get(f"rm_safety_v{k}")
        if h or s:
            lines.append(f"| {k} | {_pct((h.get('accuracy') or {}).get('helpfulness'))} | "
                         f"{_pct((s.get('accuracy') or {}).get('safety'))} | "
                         f"{_fmt((h.get('calibration') or {}).get('offset'))} | "
                         f"{_fmt((s.get('calibration') or {}).get('offset'))} |")
    decides = [(label, (get(st).get("safety_decides") or {}).get("share_on_helpful")) for label, _, st in
               versions(rounds)]
    if any(v is not None for _, v in decides):
        lines += ["", "How often R_s decides: the share of helpfulness prompts whose combined reward R_c came from the "
                      "safety RM because it scored the reply below 0.15 (on safety prompts it always does): " +
                  ", ".join(f"{label} {_pct(v)}" for label, v in decides if v is not None) + "."]
    dists = [("SFT", (get("eval_v1").get("rm_reward_b") or {}))]
    dists += [(label, get(ev).get("rm_reward_a") or {}) for label, ev, _ in versions(rounds)]
    dists = [(label, d) for label, d in dists if d.get("quantiles")]
    if dists:
        lines += ["", "Fig. 20 in miniature: the distribution of the latest reward models' combined reward (sigmoid "
                      "scale) on the test prompts' greedy replies, by version (the paper: it shifts up from SFT "
                      "through the RLHF versions).", "", "| model | mean | 10% | 25% | median | 75% | 90% |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {label} | {d['mean']:.3f} | " + " | ".join(f"{q:.3f}" for q in d["quantiles"]) + " |"
                  for label, d in dists]
        lines.append(_plot(out, "fig20_reward_by_version", "Fig. 20 in miniature: reward distribution by version",
                           "combined reward (sigmoid scale)", [("share of replies", {
                               label: [((e0 + e1) / 2, c / max(1, sum(d["histogram"]["counts"])))
                                       for e0, e1, c in zip(d["histogram"]["edges"], d["histogram"]["edges"][1:],
                                                            d["histogram"]["counts"])]
                               for label, d in dists if d.get("histogram")})]))
    return lines + [""]


def section_eval(out: Path, get, rounds: int) -> list[str]:
    lines = ["## 8. Evaluation (§3.4, Fig. 11)", "",
             "Fig. 11 in miniature: each version against SFT, judged by the annotator (the human raters' stand-in) and "
             "by the latest reward models' combined reward R_c (the paper's model-based evaluation); win rate with "
             "ties counted half, the order shown to the judge swapped at random.", "",
             "| model | vs | annotator | latest RMs (R_c) | unsafe answers | borderline refusals |",
             "|---|---|---|---|---|---|"]
    rows = [(label, ev) for label, ev, _ in versions(rounds)] + [("GAtt", "eval_gatt")]
    rows += [(f"RLHF-V{k}" + (" RS" if k == rounds else ""), f"eval_v{k}_vs_v{k - 1}") for k in range(2, rounds + 1)]
    rows += [(f"RLHF-V{rounds}", "eval_ppo_vs_rs"), ("SFT", "eval_sft")]
    fig = []
    for label, name in rows:
        m = get(name)
        if not m:
            continue
        a = m.get("model_a") or {}
        lines.append(f"| {label} | {Path(m.get('b', '')).name} | {_pct(m.get('win_rate'))}"
                     f"{_se(m.get('win_rate'), m.get('n_prompts'))} | "
                     f"{_pct((m.get('rm_combined') or {}).get('win_rate'))} | {_pct(a.get('safety_violation_rate'))} | "
                     f"{_pct(a.get('borderline_refusal_rate'))} |")
        if Path(m.get("b", "")).name == "sft" and label != "GAtt":
            fig.append((label, m.get("win_rate"), (m.get("rm_combined") or {}).get("win_rate")))
    if fig:
        lines.append(_plot(out, "fig11_versions", "Fig. 11 in miniature: win rate against SFT", "version",
                           [("win rate against SFT", {
                               "annotator": [(i, a) for i, (_, a, _) in enumerate(fig, 1) if a is not None],
                               "latest RMs": [(i, r) for i, (_, _, r) in enumerate(fig, 1) if r is not None]})]))
    return lines + [""]


def section_targets(get, rounds: int, stage_list: list, quick: bool = False) -> list[str]:
    """The targets at a glance: each with this run's figure and whether it holds, read to the digit.
    get(stage) -> its metrics or {}. quick: a smoke run, whose figures are shown but not graded against targets set
    for the full run."""
    from annotator import RATINGS
    R, rows = RATINGS, []

    def row(target, value, ok):
        rows.append(f"| {target} | {value} | {'not graded (quick run)' if quick else 'yes' if ok else '**no**'} |")

    sft, h, s = get("sft"), get(f"rm_helpful_v{rounds}"), get(f"rm_safety_v{rounds}")
    if sft.get("qa_correct_in_format") is not None:
        row("SFT: held-out fact and arithmetic answers right, in format >= 70%", _pct(sft["qa_correct_in_format"]),
            sft["qa_correct_in_format"] >= 0.7)
    acc = lambda m, a: (m.get("accuracy") or {}).get(a)  # noqa: E731
    if acc(h, "helpfulness") is not None:
        row(f"helpfulness RM (V{rounds}) >= 70% on the helpfulness test set", _pct(acc(h, "helpfulness")),
            acc(h, "helpfulness") >= 0.7)
    if acc(s, "safety") is not None:
        row(f"safety RM (V{rounds}) >= 80% on the safety test set", _pct(acc(s, "safety")), acc(s, "safety") >= 0.8)
    if None not in (acc(h, "helpfulness"), acc(h, "safety"), acc(s, "helpfulness"), acc(s, "safety")):
        row("Table 7: each RM best on its own test set",
            f"{_pct(acc(h, 'helpfulness'))} vs {_pct(acc(s, 'helpfulness'))}; "
            f"{_pct(acc(s, 'safety'))} vs {_pct(acc(h, 'safety'))}",
            acc(h, "helpfulness") > acc(s, "helpfulness") and acc(s, "safety") > acc(h, "safety"))
    for name, m, axis in (("helpfulness RM", h, "helpfulness"), ("safety RM", s, "safety")):
        by = [_on_axis(m, "accuracy_by_rating", axis).get(r) for r in R]
        if None not in by:
            row(f"Table 8: the {name}'s accuracy falls level by level", " / ".join(_pct(x) for x in by),
                all(a > b for a, b in zip(by, by[1:])))
    abl = h.get("margin_ablation") or {}
    if all(m in abl for m in ("none", "small", "large")):
        top = {m: _on_axis(abl[m], "accuracy_by_rating", "helpfulness").get(R[0]) for m in abl}
        if None not in top.values():
            row('Table 28: a margin does not lower "significantly better"',
                " / ".join(f"{m} {_pct(top[m])}" for m in ("none", "small", "large")),
                min(top["small"], top["large"]) >= top["none"])
    for k in range(2, rounds + 1):
        for name in ("helpful", "safety"):
            sh = get(f"rm_{name}_v{k}").get("shift") or {}
            if sh.get("previous") is not None and sh.get("retrained") is not None:
                row(f"distribution shift, round {k} {name} RM: the last round's RM less accurate on the new pairs",
                    f"{_pct(sh['previous'])} vs {_pct(sh['retrained'])}", sh["previous"] < sh["retrained"])
    chain = [("RLHF-V1 beats SFT", "eval_v1", 0.5)]
    chain += [(f"RLHF-V{k}{' RS' if k == rounds else ''} beats V{k - 1}", f"eval_v{k}_vs_v{k - 1}", 0.5)
              for k in range(2, rounds + 1)]
    chain += [(f"RLHF-V{rounds} (PPO) beats its RS start >= 55%", "eval_ppo_vs_rs", 0.55),
              (f"RLHF-V{rounds} wins against SFT >= 70%", "eval_ppo_vs_sft", 0.7)]
    for target, stage, bar in chain:
        wr = get(stage).get("win_rate")
        if wr is not None:
            ok = wr > bar if bar == 0.5 else wr >= bar
            row(f"{target} (annotator, ties half)", _pct(wr) + _se(wr, get(stage).get("n_prompts")), ok)
    seen, unseen = get("gatt").get("adherence_by_turn") or {}, get("gatt").get("adherence_by_turn_unseen") or {}
    if seen.get("gatt") and seen.get("baseline"):
        row("Table 30: after GAtt >= 90% at every turn", f"lowest {_pct(min(seen['gatt']))}", min(seen["gatt"]) >= 0.9)
        row("Table 30: before GAtt below 50% by turn 6", f"lowest of turns 1-6 {_pct(min(seen['baseline'][:6]))}",
            min(seen["baseline"][:6]) < 0.5)
    if unseen.get("gatt") and unseen.get("baseline"):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        row("Table 30, held-out constraints: GAtt better than the baseline",
            f"mean {_pct(mean(unseen['gatt']))} vs {_pct(mean(unseen['baseline']))}",
            mean(unseen["gatt"]) > mean(unseen["baseline"]))
    every = [get(st.name).get("stage_seconds") for st in stage_list]
    if None not in every:
        row("the whole recipe <= 15 minutes", common.fmt_time(sum(every)), sum(every) <= 900)
    if not rows:
        return []
    return ["## Targets at a glance", "",
            "Each target of the issues that built this recipe, with this run's figure, read to the digit; the "
            "sections below give the standard errors that say how firm each reading is." + (
                " This was a --quick run, a smoke test: its figures are not graded against the full run's targets."
                if quick else ""),
            "", "| target | this run | holds |", "|---|---|---|", *rows, ""]


def write_report(out: Path, stage_list: list, quick: bool = False) -> Path:
    """out/report.md from the metrics.json of every stage in stage_list (pipeline.Stage: .name, .out) that has
    results in `out`; returns its path."""
    rounds = sum(st.name.startswith("rs_v") for st in stage_list)
    lines = ["# nanollama2: the Llama 2-Chat recipe in miniature", "",
             "Every number below was measured by this run (pipeline.py); the paper's own numbers are quoted beside "
             "them for the pattern to compare.", "", "| stage | wall time |", "|---|---|"]
    metrics = {st.name: common.read_metrics(out / st.out) for st in stage_list}
    metrics = {name: m for name, m in metrics.items() if m}  # stages not run yet: no row, no section
    lines += [f"| {n} | {common.fmt_time(m.get('stage_seconds', 0))} |" for n, m in metrics.items()] + [""]
    get = lambda n: metrics.get(n) or {}  # noqa: E731
    lines += section_targets(get, rounds, stage_list, quick)
    if get("pretrain"):
        lines += section_pretrain(out, get("pretrain"))
    if get("sft"):
        lines += section_sft(out, get("sft"))
    if get(f"rm_helpful_v{rounds}") or get(f"rm_safety_v{rounds}"):
        lines += section_reward(out, get(f"rm_helpful_v{rounds}"), get(f"rm_safety_v{rounds}"), f" of RLHF-V{rounds}")
    if rounds and (get("rm_helpful_v1") or get("rm_safety_v1")):
        lines += section_iterations(out, get, rounds)
    runs = {label: get(st) for label, _, st in versions(rounds)[:-1] if get(st)}
    if runs:
        lines += section_rs(out, runs)
    if get("ppo"):
        lines += section_ppo(out, get("ppo"), get("eval_ppo_vs_rs"))
    if get("gatt"):
        lines += section_gatt(out, get("gatt"))
    if any(get(st.name) for st in stage_list if st.name.startswith("eval_")):
        lines += section_eval(out, get, rounds)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(argv=None):
    """`python report.py --out DIR`: rebuild DIR/report.md from the metrics a pipeline run left; its number of
    versions is that of DIR's rm_helpful_vK directories, and a --quick run is told by its pipeline_command.json."""
    import argparse
    import json
    import pipeline
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="the pipeline's output root")
    out = Path(ap.parse_args(argv).out)
    if not out.is_dir():
        common.die(f"--out {out}: directory not found")
    rounds = len(list(out.glob("rm_helpful_v*"))) or pipeline.ROUNDS
    marker = out / "sft" / "pipeline_command.json"
    quick = marker.is_file() and "--quick" in json.loads(marker.read_text())
    print(write_report(out, pipeline.stages(rounds), quick))


if __name__ == "__main__":
    cli()
