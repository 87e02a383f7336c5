"""gatt.py: the Ghost Attention data and loss mask, checked token by token, and the sampling context."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data import read_dialogs_jsonl
from world import CONSTRAINTS, World, apply_all
import gatt
from tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    w = World(seed=0)
    texts = w.pretrain_documents(300_000) + [" ".join(m["content"] for m in d) for d in w.sft_dialogs("train", 500)]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "t.model")


def test_training_sample_trains_only_the_last_reply_and_keeps_instruction_in_turn_one(tok):
    g = World(seed=0).gatt_dialogs("train", 1, n_turns=4)[0]
    replies = g.compliant_replies()
    samples = gatt.training_samples(g, replies, per_prefix=True)  # the paper's form: one sample per prefix
    assert len(samples) == 4
    for k, msgs in enumerate(samples, 1):
        users = [m["content"] for m in msgs if m["role"] == "user"]
        assert len(users) == k and users[0].startswith(g.instruction)
        assert all(g.instruction not in u for u in users[1:])  # only the first user turn carries it
        ids, mask = tok.encode_dialog(msgs)
        trained = tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id]).strip()
        assert trained == replies[k - 1]  # exactly the last reply, no earlier reply, no user word
        assert sum(t == tok.eos_id for t, m in zip(ids, mask) if m) == 1


def _summed_answer_loss(model, tok, msgs) -> torch.Tensor:
    """Sum of the cross-entropies of every trained token (mask 1) of one dialogue, each predicted from the tokens
    before it: what sft.py's loss adds up for this dialogue."""
    ids, mask = tok.encode_dialog(msgs)
    x = torch.tensor(ids[:-1])[None]
    targets = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])[None]
    logits, _ = model(x)
    return F.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="sum")


def test_one_dialogue_with_every_reply_trained_equals_the_per_prefix_samples(tok):
    """The default GAtt sample (one dialogue, all replies trained) learns the same tokens with the same losses as the
    paper's per-prefix samples: causal attention shows reply k the same context in both."""
    import model as M
    g = World(seed=0).gatt_dialogs("train", 1, n_turns=4)[0]
    replies = g.compliant_replies()
    full, = gatt.training_samples(g, replies)
    prefixes = gatt.training_samples(g, replies, per_prefix=True)
    assert full == [{k: v for k, v in m.items() if k != "weight"} for m in prefixes[-1]]  # the last prefix, all on
    ids, mask = tok.encode_dialog(full)
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == [t for p in prefixes for t, m in zip(*tok.encode_dialog(p)) if m]  # the same tokens, once each
    torch.manual_seed(0)
    model = M.Transformer(M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                      multiple_of=16, max_seq_len=512)).init_weights(seed=0)
    with torch.no_grad():
        one = _summed_answer_loss(model, tok, full)
        per_prefix = sum(_summed_answer_loss(model, tok, p) for p in prefixes)
    assert one.item() == pytest.approx(per_prefix.item(), rel=1e-5)  # fp32 sums in another order
    assert one.item() > 100  # a random model: the sum is large, so rel=1e-5 is a tight check


def _fake_model(monkeypatch, answer):
    """A stand-in for the chat model: chat_replies answers each prompt (a history ending with the user message) with
    answer(history); the model itself is read only for its context length. Returns the list of calls' prompts."""
    calls = []

    def fake_chat_replies(model, tok, histories, max_new_tokens, **kw):
        calls.append([list(h) for h in histories])
        return [answer(h) for h in histories]
    monkeypatch.setattr(gatt, "chat_replies", fake_chat_replies)
    return SimpleNamespace(args=SimpleNamespace(max_seq_len=512)), calls


def _own_reply(dialogs, broken: dict):
    """The fake model's reply to dialogue g's turn t: its own words ("mine") made compliant, except at (g, t) in
    `broken`, where it ignores the instruction. Dialogues are told apart by their first user message."""
    firsts = {gatt.with_instruction(g.instruction, g.user_turns[0]): i for i, g in enumerate(dialogs)}

    def answer(h):
        i, t = firsts[h[0]["content"]], sum(m["role"] == "user" for m in h) - 1
        g = dialogs[i]
        return f"mine {i} {t}." if (i, t) in broken else apply_all(g.constraints, f"mine {i} {t}.")
    return answer


def test_sampling_has_the_instruction_in_every_turn_and_drops_a_broken_reply_with_the_rest_of_its_dialogue(
        tok, monkeypatch):
    """Choice 1: the replies are the model's own; one that breaks the instruction is dropped, never replaced, and its
    dialogue is sampled no further; the earlier replies stay. Every prompt carries the instruction in every user
    message."""
    dialogs = World(seed=0).gatt_dialogs("train", 4, n_turns=3)
    broken = {(1, 0), (2, 1)}  # dialogue 1 breaks it at turn 1, dialogue 2 at turn 2
    model, calls = _fake_model(monkeypatch, _own_reply(dialogs, broken))
    replies, sampled = gatt.sample_dialogs(model, tok, dialogs, 8)
    assert [len(r) for r in replies] == [3, 0, 1, 3]
    for i, (g, rs) in enumerate(zip(dialogs, replies)):
        assert all(g.check(r) and f"mine {i} {t}" in r for t, r in enumerate(rs))  # the model's own, not a reference
        assert not any(r in g.compliant_replies() for r in rs)
    assert sampled == [4, 3, 2] and [len(c) for c in calls] == sampled  # dropped dialogues are not asked again
    for prompts in calls:
        for h in prompts:
            g = dialogs[[gatt.with_instruction(d.instruction, d.user_turns[0]) for d in dialogs].index(h[0]["content"])]
            users = [m["content"] for m in h if m["role"] == "user"]
            assert users == [gatt.with_instruction(g.instruction, q) for q in g.user_turns[:len(users)]]
    # the shares dropped: dialogue turns lost per instruction kind, by hand
    lost = {0: 0, 1: 3, 2: 2, 3: 0}
    kinds = [gatt.instruction_kind(g.constraints) for g in dialogs]
    by_hand = {k: sum(lost[i] for i in range(4) if kinds[i] == k) / (3 * kinds.count(k)) for k in kinds}
    assert gatt.dropped_by_kind(dialogs, replies) == by_hand and max(by_hand.values()) > 0
    # a judge (aid 3) drops what the rule kept, with the same consequences; it sees only replies the rule kept
    judged = []

    def judge(prompts, rs):  # rejects dialogue 3's first reply
        judged.extend(rs)
        return ["mine 3 0." not in r for r in rs]
    replies, sampled = gatt.sample_dialogs(model, tok, dialogs, 8, judge=judge)
    assert [len(r) for r in replies] == [3, 0, 1, 0] and sampled == [4, 2, 1]
    assert not any("mine 1 0" in r or "mine 2 1" in r for r in judged)  # the rule dropped those first


def test_sample_and_write_trains_the_kept_replies_alone_by_default(tok, monkeypatch, tmp_path):
    """The default run (no aid): gatt_train.jsonl holds the training samples of the kept replies and nothing else:
    no mix, no reference reply; metrics count the dropped turns."""
    cfg = gatt.GattConfig(n_dialogs=6, n_turns=3)
    assert (cfg.mix_ratio, cfg.instruction_share, cfg.instruction_focus, cfg.rm_helpful) == (0, 0, 0, None)
    world = World(seed=0)
    dialogs = world.gatt_dialogs("train", 6, 3, seed=cfg.seed)
    model, _ = _fake_model(monkeypatch, _own_reply(dialogs, {(0, 0), (4, 2)}))
    run = gatt.Run(cfg, tmp_path, torch.device("cpu"), tok, world)
    m = gatt.sample_and_write(run, model)
    rows = read_dialogs_jsonl(tmp_path / "gatt_train.jsonl")
    # dialogue 0 gives nothing (3 turns lost), dialogue 4 its first two replies (1 lost)
    assert len(rows) == m["n_train_samples"] == 5 and m["n_mix"] == 0 and m["n_kept_replies"] == 14
    assert m["dropped_share"] == pytest.approx(4 / 18) and m["dropped_by_turn"] == [1 / 6, 0, 1 / 5]
    trained = [msg["content"] for r in rows for msg in r if msg["role"] == "assistant" and msg.get("weight", 1)]
    assert len(trained) == 14 and all("mine" in r for r in trained)  # every reply the model's own
    for r in rows:
        g = next(d for d in dialogs if r[0]["content"] == gatt.with_instruction(d.instruction, d.user_turns[0]))
        assert all(g.instruction not in x["content"] for x in r[2::2])  # the instruction in the first turn only


def test_sampling_context_keeps_the_latest_turns_that_fit(tok):
    g = World(seed=0).gatt_dialogs("train", 1, n_turns=8)[0]
    history = []
    for q, r in zip(g.user_turns, g.compliant_replies()):
        history += [{"role": "user", "content": gatt.with_instruction(g.instruction, q)},
                    {"role": "assistant", "content": r}]
    history = history[:-1]  # ends with the 8th user message, as when sampling its reply
    full = len(tok.encode_dialog(history)[0])
    assert gatt.fit_context(tok, history, full) == history  # fits: unchanged
    cut = gatt.fit_context(tok, history, full - 1)
    assert len(tok.encode_dialog(cut)[0]) <= full - 1 and cut == history[len(history) - len(cut):]
    assert cut[0]["role"] == "user" and g.instruction in cut[0]["content"] and len(cut) % 2 == 1
    assert gatt.fit_context(tok, history, 1) == history[-1:]  # never less than the current user message
    # refill: once a pair must go, down to half the budget, so that the front stays for the next turns' cache
    half = gatt.fit_context(tok, history, full - 1, refill=0.5)
    assert len(tok.encode_dialog(half)[0]) <= (full - 1) / 2 < len(tok.encode_dialog(history[len(history) - len(half)
                                                                                              - 2:])[0])
    assert half == history[len(history) - len(half):] and len(half) < len(cut)


def test_constraint_checkers_accept_compliant_and_reject_plain_replies():
    plain = "Alice's pet is a cat."
    for c in CONSTRAINTS:
        assert c.check(c.apply(plain)), c.name
        assert not c.check(plain), c.name


def test_the_aids_mixes_are_unfiltered_own_replies_or_the_worlds_dialogues(tok, monkeypatch):
    """Aid 4 (--mix own): the model's reply to every train prompt that fits, wrong or not (no rater filters it); earlier
    turns are context only. Aid 5's instruction dialogues are the world's; aid 6's focus draws half of them through
    keep."""
    world = World(seed=0)
    tasks = world.tasks("train", 60, seed=3)
    wrong_ids = {i for i, t in enumerate(tasks) if t.kind == "fact"}
    assert wrong_ids and any(t.kind == "harmful" for t in tasks)
    fake = [t.reference if i not in wrong_ids else "It is a cat." for i, t in enumerate(tasks)]
    monkeypatch.setattr(gatt, "chat_replies", lambda model, tok, dialogs, n, **kw: fake[:len(dialogs)])
    model = SimpleNamespace(args=SimpleNamespace(max_seq_len=512))
    mixed = gatt.own_replies(model, tok, world, 60, 48, seed=3)
    assert [d[-1]["content"] for d in mixed] == fake  # every reply kept as sampled, the wrong ones too
    assert [d[:-1] for d in mixed] == [[m if m["role"] != "assistant" else {**m, "weight": 0} for m in t.messages]
                                       for t in tasks]
    assert any(m.get("weight") == 0 for d in mixed for m in d)  # some multi-turn prompts: their replies are context
    assert gatt.instruction_mix(world, 54, seed=3) == world.instruction_dialogs("train", 54, seed=3)
    # aid 6: with keep, half the instruction dialogues are the world's draw, half pass keep (here: capitals only)
    upper = lambda g: float(any(c.rule == "upper" for c in g.constraints))  # noqa: E731
    focused = gatt.instruction_mix(world, 36, seed=3, keep=upper)
    assert len(focused) == 36 and focused[:18] == world.instruction_dialogs("train", 18, seed=3)
    assert all(not any(c.islower() for c in m["content"]) for d in focused[18:] for m in d
               if m["role"] == "assistant")


def test_reward_judge_keeps_a_reply_whose_combined_reward_reaches_the_floor(monkeypatch):
    """Aid 3: the RMs' combined reward R_c, read for helpfulness prompts (IS_SAFETY false), keeps a reply at or above
    RM_FLOOR and drops one below it, counting both."""
    monkeypatch.setattr(gatt.rlhf, "load_reward_model", lambda path, device: path)
    seen = {}

    def fake_combined(rm_h, rm_s, tok, dialogs, replies, is_safety, threshold):
        seen.update(rms=(rm_h, rm_s), is_safety=is_safety.tolist(), threshold=threshold)
        return torch.tensor([0.9, gatt.RM_FLOOR, 0.1]), torch.zeros(3)
    monkeypatch.setattr(gatt.rlhf, "combined_score", fake_combined)
    judge = gatt.RewardJudge("h_dir", "s_dir", tok=None, device="cpu")
    assert judge([[]] * 3, ["a", "b", "c"]) == [True, True, False]
    assert seen == {"rms": ("h_dir", "s_dir"), "is_safety": [False] * 3, "threshold": gatt.RM_FLOOR}
    assert (judge.asked, judge.dropped) == (3, 1)


def test_instruction_dialogs_drawn_with_keep_and_the_focus_on_failed_kinds():
    """World.instruction_dialogs(keep=...) is rejection sampling over the world's draw: keep 1 gives the draw itself,
    a kind kept with probability 1/4 falls to ~0.3 of its share (1/4, renormalized over the draw: hobby-only is ~24%
    of it), a kind kept always rises, and a keep that accepts nothing fails with a clear error. The seeds are fixed;
    the ratio's bounds are 3.5 and 5.7 binomial standard deviations (~0.027) from 0.305, so a correct draw fails them
    with odds under 1 in 4,000. focus_on_failures (aid 6) maps step 2's dropped shares to those probabilities."""
    world = World(seed=0)
    assert world.instruction_dialogs("train", 50, seed=2, keep=lambda g: 1.0) == world.instruction_dialogs(
        "train", 50, seed=2)
    kinds = lambda ds: [gatt.instruction_kind(c for c in CONSTRAINTS  # noqa: E731
                                              if c.long_text in d[0]["content"] or c.short_text in d[0]["content"])
                        for d in ds]
    plain = world.instruction_dialogs("train", 2000, seed=2)
    rates = {"hobby": 0.25, "upper": 1.0}
    keep = gatt.focus_on_failures(rates, focus=1.0)  # hobby-only 1/4, capitals-only 1, any other kind 1 (unsampled)
    drawn = world.instruction_dialogs("train", 2000, seed=2, keep=keep)
    assert len(drawn) == 2000
    share = lambda ds, k: sum(x == k for x in kinds(ds)) / len(ds)  # noqa: E731
    ratio = share(drawn, "hobby") / share(plain, "hobby")
    assert 0.15 < ratio < 0.40, ratio
    assert share(drawn, "upper") > share(plain, "upper")
    assert gatt.focus_on_failures(rates, 0.0) is None and gatt.focus_on_failures({}, 8.0) is None
    g = World(seed=0).gatt_dialogs("train", 1)[0]
    assert gatt.focus_on_failures({gatt.instruction_kind(g.constraints): 0.5, "x": 1.0}, 2.0)(g) == 0.25
    with pytest.raises(ValueError, match="accepts almost nothing"):
        world.instruction_dialogs("train", 5, keep=lambda g: 0.0)


def test_attention_maps_are_the_probabilities_the_model_attends_with():
    """gatt.attention_maps recomputes each layer's attention probabilities; applied to that layer's values and output
    projection they must give the attention module's own output (which never forms them), GQA included."""
    import model as M
    m = M.Transformer(M.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                                  max_seq_len=64)).init_weights(seed=0).eval()
    tokens = torch.randint(3, 50, (17,), generator=torch.Generator().manual_seed(0)).tolist()
    maps = gatt.attention_maps(m, tokens)  # (L, H, T, T)
    assert maps.shape == (2, 4, 17, 17)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 17))
    assert maps.triu(1).abs().max() == 0  # causal: nothing on later tokens
    x = torch.tensor([tokens])
    cos, sin = m.rope_cos[:17][None, :, None, :], m.rope_sin[:17][None, :, None, :]
    h = m.tok_embeddings(x)
    with torch.no_grad():
        for layer, probs in zip(m.layers, maps):
            a, hn = layer.attention, layer.attention_norm(h)
            v = a.wv(hn).view(1, 17, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # (1, H, T, D)
            by_hand = a.wo((probs[None] @ v).transpose(1, 2).reshape(1, 17, 32))
            torch.testing.assert_close(by_hand, a(hn, cos, sin, None), atol=1e-5, rtol=1e-4)
            h = layer(h, cos, sin, None)


def test_instruction_span_and_the_history_without_the_instruction(tok, monkeypatch):
    """The span decodes to the instruction; adherence_on_history asks each turn t >= 2 with the finished history up
    to turn t's question, as it is or with the instruction taken out of turn 1 and nothing else changed."""
    dialogs = World(seed=0).gatt_dialogs("val", 4, n_turns=3)
    for g in dialogs:
        start, end = gatt.instruction_span(tok, g.instruction, g.user_turns[0])
        ids = tok.encode_dialog([{"role": "user", "content": gatt.with_instruction(g.instruction, g.user_turns[0])}])[0]
        assert tok.decode(ids[start:end]).strip() == g.instruction
    histories = []
    for g in dialogs:
        h = []
        for t, (q, r) in enumerate(zip(g.user_turns, g.compliant_replies())):
            h += [{"role": "user", "content": gatt.with_instruction(g.instruction, q) if t == 0 else q},
                  {"role": "assistant", "content": r}]
        histories.append(h)
    histories[2] = None  # outgrew the context: left out
    asked = []

    kept = [(g, h) for g, h in zip(dialogs, histories) if h is not None]

    def fake_chat_replies(model, tok, prompts, max_new_tokens, **kw):  # compliant at turn 2 only
        asked.append(prompts)
        return [g.compliant_replies()[1] for g, _ in kept] + ["plain reply."] * (len(prompts) - len(kept))
    monkeypatch.setattr(gatt, "chat_replies", fake_chat_replies)
    for instruction in (True, False):
        asked.clear()
        rates = gatt.adherence_on_history(None, tok, dialogs, histories, 8, instruction=instruction)
        assert rates == [1.0, 0.0] and len(asked) == 1  # turns 2 and 3, each turn's replies checked as its own
        assert len(asked[0]) == 2 * len(kept) == 6  # every turn in one call, turn-major
        for k, p in enumerate(asked[0]):
            t, (g, h) = 1 + k // 3, kept[k % 3]
            want = h[0] if instruction else {"role": "user", "content": g.user_turns[0]}
            assert p[0] == want and (instruction or g.instruction not in p[0]["content"])
            assert p[1:] == h[1:2 * t + 1] and p[-1]["role"] == "user"  # the rest is the history as it was
