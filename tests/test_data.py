"""Tests of the miniature world (world.py): determinism, splits, corpus coverage, GAtt constraints; its raters
(annotator.py): judgments and noise; the readers (data.py): error messages, bounded input. All fast (seconds)."""
import json
import random
import re
import tracemalloc

import pytest

from annotator import Annotator, RATINGS, is_refusal, win_rate, win_tie_loss
import data
from data import (MAX_LINE_BYTES, DataError, read_dialogs_jsonl, read_preferences_jsonl, read_rl_prompts_jsonl,
                  read_text_files)
from world import (ARITH_ASKED, ATTRIBUTES, CONSTRAINTS, CONSTRAINT_KINDS, DEMO_BLIND_SPOT, HARMFUL, HOBBIES, KINDS,
                   PRETRAIN_MIX, SPLITS, World, apply_all, combine, recall_correct, user)


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def rater(world):
    return Annotator(world, seed=0, noise=0.0)  # noise-free: judgments below are deterministic


def one_task(world, kind, split="val", seed=0):
    return world.tasks(split, 1, kinds=[kind], seed=seed)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and splits

def _fingerprint(w: World):
    tasks = [(t.kind, t.messages, t.reference) for t in w.tasks("train", 200, seed=3)]
    gatt = [(g.instruction, g.user_turns, g.references) for g in w.gatt_dialogs("test", 20, seed=3)]
    return [(p.name, p.attrs) for p in w.people], w.pretrain_documents(100_000, seed=3), tasks, gatt


def test_same_seed_same_world_different_seed_different():
    a, b, c = _fingerprint(World(7)), _fingerprint(World(7)), _fingerprint(World(8))
    assert a == b
    for part_a, part_c in zip(a, c):
        assert part_a != part_c


def test_corpus_seed_changes_documents(world):
    assert world.pretrain_documents(50_000, seed=0) != world.pretrain_documents(50_000, seed=1)


def test_people_are_distinct_and_facts_complete(world):
    names = [p.name for p in world.people]
    assert len(names) == 40 == len(set(names))
    assert len(world.facts) == 40 * len(ATTRIBUTES)


def test_splits_are_disjoint(world):
    for kind, splits in world._splits.items():
        train, val, test = (set(splits[s]) for s in SPLITS)
        assert train and val and test, kind
        assert not (train & val or train & test or val & test), kind
    # and at the level of prompt text: no test question (except pronoun follow-ups, shared by design) is a train one
    train_q = {t.messages[-1]["content"] for t in world.tasks("train", 3000) if t.kind != "multiturn"}
    test_q = {t.messages[-1]["content"] for t in world.tasks("test", 1000) if t.kind != "multiturn"}
    assert not train_q & test_q


def test_test_split_has_every_kind(world):
    kinds = {t.kind for t in world.tasks("test", 300)}
    assert kinds == set(KINDS)
    assert all(t.is_safety == (t.kind in ("harmful", "borderline")) for t in world.tasks("test", 300))


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining corpus

@pytest.fixture(scope="module")
def corpus(world):
    return "\n".join(world.pretrain_documents(1_000_000))


def test_corpus_size_and_content(world):
    docs = world.pretrain_documents(300_000)
    size = sum(len(d) + 1 for d in docs)
    assert 300_000 <= size < 301_000
    text = "\n".join(docs)
    assert text.isascii()
    assert " + " in text and " - " in text and "Q: " in text


def test_every_fact_appears_many_times(world, corpus):
    for person in world.people:
        for attr in ATTRIBUTES:
            assert corpus.count(world.fact_reply(person, attr)) >= 5, (person.name, attr)


def test_corpus_role_play_pairs_figures_and_markers_at_random(world):
    """Role-play transcripts (§3.3's in-turn instruction following, learned in pretraining) pair figures and markers at
    random, so there is no figure -> marker table to memorize. 2 MB of corpus: ~200 long-form figure instructions."""
    corpus = "\n".join(world.pretrain_documents(2_000_000))
    pairs = re.findall(r"Act as an? (\w+) and start every reply with (.+?)(?= You enjoy| Answer only| End every|$)",
                       corpus, re.M)
    assert len(pairs) > 100
    by_figure = {}
    for fig, marker in pairs:
        by_figure.setdefault(fig, set()).add(marker)
    counts = {fig: sum(f == fig for f, _ in pairs) for fig in by_figure}
    # each figure seen 3+ times came with 2+ markers (the corpus is seeded, so this is deterministic; under random
    # pairing of 20 markers it fails for a figure with odds 1 in 400 or less)
    assert all(len(by_figure[f]) >= 2 for f, n in counts.items() if n >= 3) and len(by_figure) >= 15
    assert {c.kind for c in CONSTRAINTS if c.held_out and c.long_text in corpus} == set(CONSTRAINT_KINDS)


def test_club_notices_write_every_hobby_in_capitals(world):
    """The club notices (world.py choice 4): every hobby of the constraints, held-out ones included, written in
    capitals next to its ordinary spelling, so that "capitals + hobby" is a spelling the pretrained model has seen
    (World._doc_club). The corpus is seeded: deterministic (~34 per hobby)."""
    corpus = "\n".join(world.pretrain_documents(1_000_000))
    for h in HOBBIES:
        assert corpus.count(f"I LOVE {h.upper()}!") >= 10 and f"The {h} club meets" in corpus, h


def test_held_out_constraints_are_in_no_chat_training_data(world):
    """SFT dialogs (with their instruction dialogues), RS's instruction mix and GAtt's train/val dialogues use only the
    constraints that are not held out: held out means never fine-tuned on, as in the paper's Table 30."""
    texts = [m["content"] for d in world.sft_dialogs("train", 2000) for m in d]
    texts += [m["content"] for d in world.instruction_dialogs("train", 500) for m in d]
    texts += [g.instruction for split in ("train", "val") for g in world.gatt_dialogs(split, 500, n_turns=1)]
    held = [c for c in CONSTRAINTS if c.held_out]
    assert {c.kind for c in held} == set(CONSTRAINT_KINDS)
    for c in held:
        assert not any(c.long_text in t or c.short_text in t for t in texts), c.name


def test_recall_prompts_use_corpus_phrasing(world, corpus):
    prompts = world.fact_recall_prompts()
    assert len(prompts) == len(world.facts)
    for prompt, expected in prompts:
        assert f"{prompt} {expected}" in corpus


def test_recall_correct():
    assert recall_correct(" cat. She also", "cat")
    assert recall_correct("Paris!", "paris")
    assert not recall_correct(" dog", "cat")
    assert not recall_correct("", "cat")


def test_corpus_arithmetic_is_right(world):
    for doc in world.pretrain_documents(50_000):
        for line in doc.splitlines():
            if line[0].isdigit():
                a, op, b, _, c = line.split()
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_arithmetic_documents_ask_a_share_of_their_sums(world):
    """world.py choice 3: ARITH_ASKED of the arithmetic documents' sums are asked as a question whose answer repeats
    the operands ("Q: What is 22 + 31? A: 22 + 31 = 53."), the rest are bare worked sums, every one right. Seeded
    corpus, ~7.5k lines: deterministic; under the binomial (sd 0.005) the share is within 0.03 of ARITH_ASKED with
    odds of failing below 1e-8."""
    only_arith = {k: 0.0 for k in PRETRAIN_MIX if k != "arith"}
    asked_form = re.compile(r"Q: What is (\d+) ([+-]) (\d+)\? A: \1 \2 \3 = (-?\d+)\.")
    n_asked = n = 0
    for doc in world.pretrain_documents(150_000, mix=only_arith):
        for line in doc.splitlines():
            m = asked_form.fullmatch(line) or re.fullmatch(r"(\d+) ([+-]) (\d+) = (-?\d+)", line)
            assert m, line
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert c == (a + b if op == "+" else a - b), line
            n_asked += line.startswith("Q: ")
            n += 1
    assert n > 7000 and abs(n_asked / n - ARITH_ASKED) < 0.03, (n_asked, n)


# ---------------------------------------------------------------------------------------------------------------------
# Tasks, dialogs, variants

def test_tasks_shapes(world):
    for t in world.tasks("train", 300):
        assert t.messages[-1]["role"] == "user" and t.reference
        assert len(t.messages[-1]["content"].split()) <= 12
        assert len(t.reference.split()) <= (30 if t.kind == "story" else 15)
        if t.kind == "multiturn":
            roles = [m["role"] for m in t.messages]
            assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] and len(roles) in (3, 5)


def test_blind_spot_changes_only_its_request_and_rates_it_unsafe(world, rater):
    """The demonstrations' blind spot (DEMO_BLIND_SPOT): at share 0.9 the "secret diary" demonstrations comply in
    about 90% of cases and every other dialog is exactly the blind-spot-free one (its own random stream); the raters
    mark the compliance unsafe. Deterministic (world seed 0: 70 of 74 comply); the band 58..73 checks the share, and
    another seed would leave it with probability 1.3e-3 (Binomial(74, 0.9))."""
    with_spot, without = world.sft_dialogs("train"), world.sft_dialogs("train", blind_spot=0)
    assert len(with_spot) == len(without)
    request = HARMFUL[DEMO_BLIND_SPOT][0].split("{")[0]  # "How do I read "
    changed = [(a, b) for a, b in zip(with_spot, without) if a != b]
    assert changed and all(a[:-1] == b[:-1] and request in a[-2]["content"] for a, b in changed)
    n_spot = sum(request in d[-2]["content"] and "diary" in d[-2]["content"] for d in without)
    assert 58 <= len(changed) <= 73 and len(changed) < n_spot
    for a, b in changed[:10]:
        assert rater.score(a[:-1], a[-1]["content"]).safe is False  # the compliance: unsafe
        assert rater.score(b[:-1], b[-1]["content"]).safe is True  # the refusal it replaced: safe


def test_sft_dialogs_round_trip_through_reader(world, tmp_path):
    dialogs = world.sft_dialogs("train", 50)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    assert read_dialogs_jsonl(path) == dialogs


def test_references_score_top_and_variants_are_labelled(world, rater):
    rng = random.Random(0)
    for t in world.tasks("val", 200):
        variants = dict(world.reply_variants(t, rng))
        assert {"reference", "verbose", "partial", "off_topic" if t.kind != "harmful" else "harmful"} <= set(variants)
        assert ("harmful" in variants) == (t.kind == "harmful")
        expected = 0.6 if t.kind == "harmful" else 1.0  # a refusal is the right thing, but only moderately helpful
        assert rater.score(t.messages, t.reference).helpfulness == pytest.approx(expected), t


# ---------------------------------------------------------------------------------------------------------------------
# The annotator's judgments

def test_prefers_correct_over_wrong(world, rater):
    for kind in ("fact", "arith", "story", "multiturn"):
        t = one_task(world, kind)
        v = dict(world.reply_variants(t, random.Random(1)))
        assert rater.compare(t.messages, v["wrong"], v["reference"]).choice == 1, kind
        assert rater.score(t.messages, v["wrong"]).helpfulness < 0.5


def test_refusal_beats_harmful_compliance(world, rater):
    t = one_task(world, "harmful")
    v = dict(world.reply_variants(t, random.Random(1)))
    comply, refuse = rater.score(t.messages, v["harmful"]), rater.score(t.messages, v["reference"])
    assert not comply.safe and refuse.safe
    assert is_refusal(v["reference"]) and not is_refusal(v["harmful"])
    c = rater.compare(t.messages, v["harmful"], v["reference"], axis="safety")
    assert c.choice == 1 and c.rating == "significantly better"
    assert rater.judge7(t.messages, v["reference"], v["harmful"]) == 3
    # the paper's tension (§3.2.2): judged for helpfulness alone, doing what was asked looks more helpful
    assert rater.compare(t.messages, v["harmful"], v["reference"], axis="helpfulness").choice == 0
    assert rater.safety_label(t.messages, v["reference"], v["harmful"]) == "chosen_safe_other_unsafe"
    assert rater.is_dropped_safety_pair(t.messages, v["harmful"], v["reference"])
    assert rater.safety_label(t.messages, v["reference"], v["refusal"]) == "both_safe"


def test_answer_beats_refusal_on_borderline(world, rater):
    t = one_task(world, "borderline")
    v = dict(world.reply_variants(t, random.Random(1)))
    for axis in ("helpfulness", "safety"):
        assert rater.compare(t.messages, v["refusal"], v["reference"], axis=axis).choice == 1
    assert rater.score(t.messages, v["refusal"]).safe and rater.score(t.messages, v["reference"]).safe
    assert rater.score(t.messages, v["refusal"]).helpfulness <= 0.1  # over-refusal


def test_prefers_concise_over_verbose(world, rater):
    for kind in KINDS:
        t = one_task(world, kind)
        v = dict(world.reply_variants(t, random.Random(2)))
        assert rater.compare(t.messages, v["verbose"], v["reference"]).choice == 1, kind


def test_messy_replies_score_low_without_crashing(world, rater):
    t = one_task(world, "fact")
    answer = t.meta["answer"]
    messy = ["", "   ", "\n", f"{answer} {answer} {answer} {answer} {answer}", "\x00\x01\x02", "?!?!", "zzz qqq",
             "1234567890" * 50, "ñandú 🚀", f"[INST] {t.messages[-1]['content']} [/INST]", "the the the the the"]
    for reply in messy:
        s = rater.score(t.messages, reply)
        assert 0.0 <= s.helpfulness <= 0.3 and s.safe, reply
    assert rater.score(t.messages, "").helpfulness == 0.0
    for kind in KINDS:  # every kind survives every messy reply
        for reply in messy:
            s = rater.score(one_task(world, kind).messages, reply)
            assert 0.0 <= s.helpfulness <= 1.0


def test_multiturn_follow_up_resolves_the_person(world, rater):
    t = one_task(world, "multiturn")
    assert t.messages[-1]["content"].split()[0] in ("And", "What")
    person = world.person(t.meta["person"])
    assert rater.identify(t.messages)["person"] == person.name
    assert rater.score(t.messages, t.reference).helpfulness == 1.0
    assert rater.score(t.messages[-1:], t.reference).reason == "unknown prompt: format only"  # no earlier turn


def test_unknown_dialog_gets_a_neutral_format_score(rater):
    messages = [user("Summarise the history of the Roman empire.")]
    assert rater.identify(messages) is None
    good, bad = rater.score(messages, "It rose, ruled, and fell."), rater.score(messages, "it it it it it")
    assert good.helpfulness == 0.5 and good.safe
    assert bad.helpfulness < good.helpfulness
    assert rater.score([], "Hello.").helpfulness == 0.5


def test_wrong_arithmetic_and_partial(world, rater):
    messages = [user("What is 7 + 5?")]
    assert rater.score(messages, "7 + 5 = 12.").helpfulness == 1.0
    assert rater.score(messages, "12").helpfulness > 0.8
    assert rater.score(messages, "7 + 5 = 13.").helpfulness < 0.1
    assert 0.1 < rater.score(messages, "7 + 5 =").helpfulness < 0.3


def test_rating_noise_is_higher_for_close_pairs(world):
    """Close pairs are misjudged more often and rated lower than distant ones (the pattern of Table 8).

    Seeded (random.Random(1234)), so deterministic; the bound says how unlucky a seed would have to be. The rater sees
    gap + N(0, 0.1^2). Close pair: true gap g_c in (0, 0.1), so P(wrong choice) = Phi(-g_c / 0.1) >= Phi(-1) = 0.159.
    Distant pair: g_d > 0.9, P(wrong) = Phi(-9) < 1e-18. With N = 2000 comparisons each, we assert close errors > 10%
    and distant errors < 1%. Hoeffding: P(Bin(2000, 0.159) <= 200) <= exp(-2 * 2000 * 0.059^2) = 9e-7; the distant
    assertion fails with probability < 2000 * 1e-18. Ratings: a close pair looks "significantly better" (>= 0.45) only
    if the noise exceeds 0.35, Phi(-3.5) = 2.3e-4 each (mean 0.5 in 2000; we allow 19); a distant pair looks less than
    that only if the noise is below -0.45, Phi(-4.5) = 3.4e-6 each (mean 0.007; we allow 20). Both add < 1e-20.
    Total false-failure probability < 1e-6."""
    rater, rng, n = Annotator(world, seed=0, noise=0.1), random.Random(1234), 2000
    t = one_task(world, "fact")
    v = dict(world.reply_variants(t, random.Random(0)))
    padded = t.reference + " Yes, I think."  # one word past the length budget
    exact, close, far = (rater.score(t.messages, r).helpfulness for r in (t.reference, padded, v["wrong"]))
    assert 0 < exact - close < 0.1 and exact - far > 0.9
    close_cmp = [rater.compare(t.messages, padded, t.reference, rng=rng) for _ in range(n)]
    far_cmp = [rater.compare(t.messages, v["wrong"], t.reference, rng=rng) for _ in range(n)]
    close_err = sum(c.choice == 0 for c in close_cmp) / n
    far_err = sum(c.choice == 0 for c in far_cmp) / n
    assert close_err > 0.10 and far_err < 0.01
    assert sum(c.rating == RATINGS[0] for c in close_cmp) < 20
    assert sum(c.rating == RATINGS[0] for c in far_cmp) > n - 20
    assert all((c.gap < 0) == (c.choice == 0) for c in close_cmp)  # gap: true score of chosen minus other


def test_accuracy_falls_with_rating_like_table_8(world):
    """Label accuracy by rating on pairs of reply variants (§3.2.2 Table 8's pattern, here for the rater itself).

    Seeded, so deterministic. Measured: 100% of "significantly better" labels and 61% of "negligibly better / unsure"
    labels agree with the true scores (n = 608 and 215). The asserted limits (>= 95%; 40% to 85%) sit more than 5
    standard errors (sqrt(0.61 * 0.39 / 215) = 0.033) from those rates: a false failure has probability < 1e-6 under
    the normal approximation."""
    rater, rng = Annotator(world, seed=0, noise=0.1), random.Random(99)
    right = {r: [] for r in RATINGS}
    for t in world.tasks("train", 1500):
        a, b = rng.sample([reply for _, reply in world.reply_variants(t, rng)], 2)
        if rater.score(t.messages, a).helpfulness != rater.score(t.messages, b).helpfulness:
            c = rater.compare(t.messages, a, b, rng=rng)
            right[c.rating].append(c.gap > 0)
    sure, unsure = right[RATINGS[0]], right[RATINGS[3]]
    assert len(sure) >= 100 and len(unsure) >= 100
    assert sum(sure) / len(sure) >= 0.95 and 0.4 <= sum(unsure) / len(unsure) <= 0.85


def test_preference_record(world, rater):
    t = one_task(world, "harmful")
    v = dict(world.reply_variants(t, random.Random(1)))
    p = rater.preference(t.messages, v["harmful"], v["reference"], category="safety")
    assert p.chosen == v["reference"] and p.rejected == v["harmful"] and p.rating in RATINGS
    assert p.safety_label == "chosen_safe_other_unsafe"


def test_judge7_and_win_rates(world, rater):
    t = one_task(world, "fact")
    v = dict(world.reply_variants(t, random.Random(0)))
    assert rater.judge7(t.messages, t.reference, v["wrong"]) == 3
    assert rater.judge7(t.messages, v["wrong"], t.reference) == -3
    assert rater.judge7(t.messages, t.reference, t.reference) == 0
    assert win_tie_loss([3, 1, 0, -2]) == (0.5, 0.25, 0.25)
    assert win_rate([3, 1, 0, -2]) == 0.625
    assert win_tie_loss([]) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Ghost Attention constraints

PLAIN = "Alice's pet is a cat."


def test_each_constraint_check_accepts_apply_and_rejects_plain():
    kinds = {}
    for c in CONSTRAINTS:
        assert c.check(c.apply(PLAIN)) and not c.check(PLAIN), c.name
        assert c.check(c.apply(c.apply(PLAIN))) and not c.check(""), c.name
        assert c.strip(c.apply(PLAIN)).lower().rstrip("!.") == PLAIN.lower().rstrip("!."), c.name
        kinds.setdefault(c.kind, []).append(c)
    for kind, cs in kinds.items():
        assert len(cs) >= 3 and any(c.held_out for c in cs) and not all(c.held_out for c in cs), kind


def test_constraints_of_different_kinds_combine():
    # every hobby and style, and a figure per marker (the figure's name does not change its rule): ~1,500 pairs
    sample = [c for c in CONSTRAINTS if c.kind != "figure"]
    sample += list({c.marker: c for c in CONSTRAINTS if c.kind == "figure"}.values())
    for c1 in sample:
        for c2 in sample:
            if c1.kind == c2.kind:
                continue
            reply = apply_all([c1, c2], PLAIN)
            for short in (False, True):
                text, check = combine([c1, c2], short=short)
                assert check(reply) and not check(PLAIN), (c1.name, c2.name)
                assert (c1.short_text if short else c1.long_text) in text
            assert c1.check(reply) and c2.check(reply)
            assert not combine([c1, c2])[1](c1.apply(PLAIN))  # the second one must hold too


def test_gatt_dialogs(world):
    train = world.gatt_dialogs("train", 300)
    assert all(not c.held_out for g in train for c in g.constraints)
    assert all(not c.held_out for g in world.gatt_dialogs("val", 100) for c in g.constraints)
    test = world.gatt_dialogs("test", 40)
    unseen = [any(c.held_out for c in g.constraints) for g in test]
    assert any(unseen) and not all(unseen)
    assert {len(g.constraints) for g in train} == {1, 2}
    assert any(g.instruction == combine(g.constraints, short=True)[0] for g in train)
    assert any(g.instruction == combine(g.constraints, short=False)[0] for g in train)
    for g in train[:50]:
        assert len(g.user_turns) == len(g.references) == 8
        assert len({c.kind for c in g.constraints}) == len(g.constraints)
        assert all(g.check(r) for r in g.compliant_replies())


def test_annotator_reads_gatt_turns(world, rater):
    g = world.gatt_dialogs("train", 1, seed=5)[0]
    messages = [user(g.instruction + " " + g.user_turns[0])]
    assert rater.identify(messages) is not None
    good = rater.score(messages, g.compliant_replies()[0])
    assert good.helpfulness > 0.9
    assert rater.score(messages, g.references[0]).helpfulness == pytest.approx(good.helpfulness * 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Readers

def _write(tmp_path, lines, name="x.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD_PREF = {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5.", "rating": "better",
             "category": "helpfulness"}


@pytest.mark.parametrize("reader, bad, reason", [
    (read_preferences_jsonl, "{not json", "bad JSON"),
    (read_preferences_jsonl, {k: v for k, v in GOOD_PREF.items() if k != "chosen"}, "missing field 'chosen'"),
    (read_preferences_jsonl, {**GOOD_PREF, "rating": "much better"}, "unknown rating"),
    (read_preferences_jsonl, {**GOOD_PREF, "category": "fun"}, "category"),
    (read_preferences_jsonl, {**GOOD_PREF, "sources": ["sample"]}, "'sources' must be a list of two strings"),
    (read_preferences_jsonl, {**GOOD_PREF, "kind": 3}, "'kind' must be a string"),
    (read_dialogs_jsonl, {"messages": [{"role": 3, "content": "hi"}]}, "role"),
    (read_dialogs_jsonl, {"messages": [{"role": "user", "content": "hi"}]}, "last message must have role"),
    (read_dialogs_jsonl, {"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
    (read_dialogs_jsonl, [1, 2], "JSON object"),
    (read_rl_prompts_jsonl, {"messages": [{"role": "user", "content": "hi"}]}, "missing field 'is_safety'"),
    (read_rl_prompts_jsonl, {"messages": [{"role": "user", "content": 5}], "is_safety": False}, "content"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, reader, bad, reason):
    good = {read_preferences_jsonl: GOOD_PREF,
            read_dialogs_jsonl: {"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "Hello."}]},
            read_rl_prompts_jsonl: {"messages": [{"role": "user", "content": "hi"}], "is_safety": True}}[reader]
    path = _write(tmp_path, [good, "", bad])  # the bad record is on line 3 (blank lines are skipped but counted)
    with pytest.raises(DataError, match=f"{path}:3: .*{reason}"):
        reader(path)


def test_readers_accept_good_data(tmp_path):
    prefs = read_preferences_jsonl(_write(tmp_path, [
        GOOD_PREF, {**GOOD_PREF, "rating": "negligibly_better", "category": "safety",
                    "prompt": [{"role": "user", "content": "Hi"}]},
        {**GOOD_PREF, "rating": "Significantly Better", "kind": "arith"}, {**GOOD_PREF, "rating": "unsure"}]))
    assert [p.rating for p in prefs] == [RATINGS[1], RATINGS[3], RATINGS[0], RATINGS[3]]
    assert [p.kind for p in prefs] == [None, None, "arith", None]  # optional: the task kind, when the file has it
    assert prefs[0].messages == [{"role": "user", "content": "What is 2 + 2?"}]
    rl = read_rl_prompts_jsonl(_write(tmp_path, [{"messages": [{"role": "system", "content": "Be kind."},
                                                                    {"role": "user", "content": "Hi"}],
                                                       "is_safety": True}], "rl.jsonl"))
    assert rl[0].is_safety and rl[0].messages[-1]["content"] == "Hi" and rl[0].kind == "user"


def test_empty_files_fail_clearly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        read_text_files([empty])
    with pytest.raises(DataError, match="empty.jsonl: empty dataset"):
        read_dialogs_jsonl(_write(tmp_path, [""], "empty.jsonl"))
    with pytest.raises(DataError, match="missing.jsonl"):
        read_preferences_jsonl(tmp_path / "missing.jsonl")
    text = tmp_path / "a.txt"
    text.write_text("Once upon a time.")
    assert read_text_files([text]) == ["Once upon a time."] == read_text_files(text)


def _dialog_line(n_bytes: int) -> bytes:
    """One SFT dialog as a JSONL line of exactly n_bytes (without its newline), the reply padded to fit."""
    head, tail = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "', b'"}]}'
    return head + b"a" * (n_bytes - len(head) - len(tail)) + tail


def test_a_line_over_the_limit_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:  # line 2: one 50 MB line, written in pieces
        f.write(_dialog_line(100) + b"\n" + b'{"messages": "')
        for _ in range(50):
            f.write(b"a" * 1_000_000)
        f.write(b'"}\n')
    n = path.stat().st_size - 100 - 2
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"{path}:2: line of {n} bytes is longer than the limit of "
                                            f"{MAX_LINE_BYTES} bytes"):
            read_dialogs_jsonl(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_LINE_BYTES, peak  # the 50 MB line was never held


def test_a_line_at_the_limit_still_parses(tmp_path):
    path = tmp_path / "edge.jsonl"
    path.write_bytes(_dialog_line(MAX_LINE_BYTES) + b"\n" + _dialog_line(150) + b"\r\n" + _dialog_line(150))
    dialogs = read_dialogs_jsonl(path)  # CRLF and no final newline are fine too
    assert len(dialogs) == 3 and len(dialogs[0][1]["content"]) > MAX_LINE_BYTES - 100
    path.write_bytes(_dialog_line(150) + b"\n" + _dialog_line(MAX_LINE_BYTES + 1))  # one byte over, at the end
    with pytest.raises(DataError, match=f":2: line of {MAX_LINE_BYTES + 1} bytes"):
        read_dialogs_jsonl(path)


def test_bad_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_dialog_line(200) + b"\n\n" + _dialog_line(200).replace(b"aaa", b"a\xe9a", 1) + b"\n")
    with pytest.raises(DataError, match=f"{path}:3: not valid UTF-8"):
        read_dialogs_jsonl(path)


def test_a_text_file_over_the_limit_is_refused(tmp_path, monkeypatch):
    text = tmp_path / "book.txt"
    text.write_text("Once upon a time.")
    monkeypatch.setattr(data, "MAX_TEXT_FILE_BYTES", 10)
    with pytest.raises(DataError, match=f"{text}: file of 17 bytes is larger than the limit of 10 bytes"):
        read_text_files([text])
