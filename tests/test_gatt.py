"""gatt.py: the Ghost Attention data and loss mask, checked token by token, and the sampling context."""
from types import SimpleNamespace

import pytest

import data
import gatt
from tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    w = data.World(seed=0)
    texts = w.pretrain_documents(300_000) + [" ".join(m["content"] for m in d) for d in w.sft_dialogs("train", 500)]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "t.model")


def test_training_sample_trains_only_the_last_reply_and_keeps_instruction_in_turn_one(tok):
    g = data.World(seed=0).gatt_dialogs("train", 1, n_turns=4)[0]
    replies = g.compliant_replies()
    samples = gatt.training_samples(g, replies)
    assert len(samples) == 4
    for k, msgs in enumerate(samples, 1):
        users = [m["content"] for m in msgs if m["role"] == "user"]
        assert len(users) == k and users[0].startswith(g.instruction)
        assert all(g.instruction not in u for u in users[1:])  # only the first user turn carries it
        ids, mask = tok.encode_dialog(msgs)
        trained = tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id]).strip()
        assert trained == replies[k - 1]  # exactly the last reply, no earlier reply, no user word
        assert sum(t == tok.eos_id for t, m in zip(ids, mask) if m) == 1


def test_sampling_context_has_the_instruction_in_every_turn(tok, monkeypatch):
    import evaluate
    w = data.World(seed=0)
    dialogs = w.gatt_dialogs("train", 3, n_turns=3)
    seen = []

    def fake_chat_replies(model, tok, histories, max_new_tokens, **kw):
        seen.append([h[-1]["content"] for h in histories])
        return ["plain reply."] * len(histories)  # never compliant: every reply falls back to the reference
    monkeypatch.setattr(evaluate, "chat_replies", fake_chat_replies)
    model = SimpleNamespace(args=SimpleNamespace(max_seq_len=512))  # only its context length is read
    replies, fallback = gatt.sample_dialogs(model, tok, dialogs, 8, data.Annotator(w))
    assert fallback == 1.0
    for t, turn in enumerate(seen):
        for g, content in zip(dialogs, turn):
            assert content == gatt.with_instruction(g.instruction, g.user_turns[t])
    for g, r in zip(dialogs, replies):
        assert r == g.compliant_replies() and all(g.check(x) for x in r)


def test_sampling_context_keeps_the_latest_turns_that_fit(tok):
    g = data.World(seed=0).gatt_dialogs("train", 1, n_turns=8)[0]
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


def test_constraint_checkers_accept_compliant_and_reject_plain_replies():
    plain = "Alice's pet is a cat."
    for c in data.CONSTRAINTS:
        assert c.check(c.apply(plain)), c.name
        assert not c.check(plain), c.name
