"""sft.py: the answer-only loss mask survives packing and the one-token shift, a packed dialog computes exactly what it
computes alone, a short run lowers the answer loss and resumes exactly, and bad user data fails with file:line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from world import CHAT_TAGS, World, assistant
import model as M
import sft
from tokenizer import B_INST, E_INST, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SYSTEM_DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 + 5?"},
                 {"role": "assistant", "content": "4 + 5 = 9."}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A 400-piece BPE tokenizer trained (in ~0.3 s) on a little world text and a few rendered chats."""
    world = World(seed=0)
    chats = [" ".join(f"{B_INST} {u['content']} {E_INST} {a['content']}" for u, a in zip(d[::2], d[1::2]))
             for d in world.sft_dialogs("train", 300, seed=1)]
    return train_tokenizer(world.pretrain_documents(200_000) + chats, 400,
                           tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def dialogs():
    world = World(seed=0)
    picked = [t.messages + [assistant(t.reference)] for t in world.tasks("train", 40, seed=3)]
    multi = [d for d in picked if len(d) > 2][:3]  # multi-turn dialogs: every assistant turn is trained
    assert multi, "the sample should hold multi-turn dialogs"
    return picked[:9] + multi + [SYSTEM_DIALOG]


def tiny_model(vocab: int, seed: int = 0) -> M.Transformer:
    args = M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16, max_seq_len=256)
    return M.Transformer(args).init_weights(seed=seed)


def test_shift_targets_by_hand():
    #            BOS  p   p   a   a  EOS
    tokens = [1, 10, 11, 20, 21, 2]
    mask = [0, 0, 0, 1, 1, 1]
    # position t predicts tokens[t+1] where that token is trained: "p(11)" starts the answer, "a(21)" emits EOS
    assert sft.shift_targets(tokens, mask) == [-100, -100, 20, 21, 2, -100]


def test_trained_targets_of_a_packed_batch_decode_to_exactly_the_answers(tok, dialogs):
    examples, cut, dropped = sft.encode_dialogs(tok, dialogs, 256)
    assert (cut, dropped) == (0, 0)
    p = sft.pack(examples, 160, tok.eos_id)
    assert p.tokens.size(0) < len(dialogs), "several dialogs must share a row for this test to mean anything"
    answers = [m["content"].strip() for d in dialogs for m in d if m["role"] == "assistant"]
    decoded = []
    users = [m["content"] for d in dialogs for m in d if m["role"] != "assistant"]
    for r in range(p.tokens.size(0)):
        tokens, targets, seg = p.tokens[r].tolist(), p.targets[r].tolist(), p.segments[r].tolist()
        run = []
        for t in range(len(tokens)):
            if targets[t] == sft.IGNORE:
                continue
            # the one-token shift: the target is the NEXT token of the same dialog
            assert targets[t] == tokens[t + 1] and seg[t + 1] == seg[t] != -1
            run.append(targets[t])
            if targets[t] == tok.eos_id:  # an answer ends with its EOS, which is trained (the model learns to stop)
                text = tok.decode(run[:-1])
                decoded.append(text.strip())
                assert not any(tag in text for tag in CHAT_TAGS)
                assert not any(u in text for u in users if len(u) > 12)  # no user turn leaks into the targets
                run = []
        assert run == [], "every trained run ends with EOS"
    # best-fit packing may put a later dialog in an earlier row: the same answers, each exactly once, in some order
    assert sorted(decoded) == sorted(answers), "every assistant turn, of every turn of every dialog, is trained"


def test_best_fit_packing_keeps_every_dialog_once_and_fills_rows():
    """Each example lands in exactly one row, whole and in its own segment, no row overflows, and rows are fuller
    than appending to the last row only (next-fit) on a GAtt-like mix of long and short dialogs."""
    rng = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(60, 100, (300,), generator=rng)] + \
              [int(n) for n in torch.randint(380, 480, (40,), generator=rng)]
    order = torch.randperm(len(lengths), generator=rng).tolist()
    examples = [([i % 500 + 3] * lengths[i], [sft.IGNORE] * lengths[i]) for i in order]  # tokens tell dialogs apart
    p = sft.pack(examples, 512, pad_id=0)
    seen = []
    for r in range(p.tokens.size(0)):
        for s in range(int(p.segments[r].max()) + 1):
            toks = p.tokens[r][p.segments[r] == s].tolist()
            assert p.positions[r][p.segments[r] == s].tolist() == list(range(len(toks)))
            seen.append((toks[0], len(toks)))
    assert sorted(seen) == sorted((ex[0][0], len(ex[0])) for ex in examples)
    next_fit, used = 1, 0
    for ex in examples:
        if used + len(ex[0]) > 512:
            next_fit, used = next_fit + 1, 0
        used += len(ex[0])
    fill = sum(lengths) / p.tokens.numel()
    assert p.tokens.size(0) < next_fit and fill > 0.9, (p.tokens.size(0), next_fit, fill)  # 86 vs 101 rows: 94% vs 80%


def test_packed_dialog_logits_equal_its_logits_alone(tok, dialogs):
    model = tiny_model(tok.n_words).eval()
    examples, _, _ = sft.encode_dialogs(tok, dialogs[:3], 256)
    p = sft.pack(examples, 256, tok.eos_id)
    assert p.tokens.size(0) == 1 and int(p.segments.max()) == 2  # three dialogs in one row, then padding
    with torch.no_grad():
        packed = model(p.tokens, positions=p.positions, mask=sft.block_causal_mask(p.segments))[0][0]  # (T, V)
        naive = model(p.tokens)[0][0]  # plain causal attention over the whole row, positions 0..T-1
        for s, (toks, _) in enumerate(examples):
            alone = model(torch.tensor([toks]))[0][0]  # (n, V)
            cols = (p.segments[0] == s).nonzero().squeeze(1)
            torch.testing.assert_close(packed[cols], alone, atol=1e-5, rtol=1e-5)
            if s > 0:  # control: without the block mask and restarted positions a later dialog sees its neighbours
                assert (naive[cols] - alone).abs().max() > 1e-3


def test_split_rows_take_the_same_step_as_the_packed_rows(tok):
    """split_rows moves a step's dialogs to narrower rows: every dialog exactly once, the short ones in rows of
    `short`, and the loss and gradients of the step (micro-batches weighted by answer tokens, as the training loop
    does) equal those of the packed rows."""
    world = World(seed=0)
    dialogs = [t.messages + [assistant(t.reference)] for t in world.tasks("train", 60, seed=5)]
    examples, _, _ = sft.encode_dialogs(tok, dialogs, 256)
    p = sft.pack(examples, 256, tok.eos_id)
    short = 48
    lengths = sorted(len(t) for t, _ in examples)
    assert lengths[0] <= short < lengths[-1], "the test needs dialogs on both sides of the split"
    model = tiny_model(tok.n_words)

    def step(parts):
        n_answer = sum(int((y != sft.IGNORE).sum()) for _, y, _, _ in parts)
        model.zero_grad()
        total = 0.0
        for x, y, pos, mask in parts:
            loss = model(x, y, positions=pos, mask=mask)[1] * (int((y != sft.IGNORE).sum()) / n_answer)
            loss.backward()
            total += loss.item()
        return total, [q.grad.clone() for q in model.parameters()]

    batch, rows = p.tokens.size(0), slice(0, p.tokens.size(0))  # one step over every row
    parts = sft.micro_batches(p, 0, batch, rows, "cpu", short, tok.eos_id)
    assert len(parts) == 2 and parts[0][0].size(1) == short and parts[1][0].size(1) == lengths[-1]
    seen = []
    for q in sft.split_rows(p, 0, batch, rows, short, tok.eos_id):
        for r in range(q.tokens.size(0)):
            seen += [tuple(q.tokens[r][q.segments[r] == s].tolist()) for s in range(int(q.segments[r].max()) + 1)]
    assert sorted(seen) == sorted(tuple(t) for t, _ in examples)
    loss_packed, grads_packed = step(sft.micro_batches(p, 0, batch, rows, "cpu", 0, tok.eos_id))
    loss_split, grads_split = step(parts)
    assert loss_split == pytest.approx(loss_packed, rel=1e-5)
    for a, b in zip(grads_split, grads_packed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def make_init(tmp_path, tok, seed=0) -> Path:
    init = tmp_path / "init"
    M.save_checkpoint(tiny_model(tok.n_words, seed), init, tok.model_path)
    return init


def run_sft(init, out, *flags) -> dict:
    cfg = common.parse_config(sft.SFTConfig, ["--init-from", str(init), "--out-dir", str(out), "--n-dialogs", "200",
                                              "--seq-len", "128", "--batch-size", "8", "--eval-n", "0",
                                              "--log-interval", "1000", "--n-val-dialogs", "60", *flags])
    sft.main(cfg)
    f = Path(out) / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def test_short_sft_lowers_answer_token_loss_and_evaluates(tmp_path, tok):
    m = run_sft(make_init(tmp_path, tok), tmp_path / "sft", "--epochs", "3", "--lr", "3e-3", "--eval-n", "12",
                "--max-new-tokens", "8")
    # from a random model (loss ~ln 400 = 6.0) 3 epochs over 200 dialogs learn the answers' templates
    assert m["val_loss"] < m["val_loss_before"] - 1.0, m
    assert m["complete"] and m["n"] == 12 and len(m["loss_curve"]) == m["steps"]
    for key in ("helpfulness", "format_valid", "qa_correct_in_format", "safety_violation_rate", "examples",
                "tokens_per_sec", "wall_seconds"):
        assert key in m
    assert (tmp_path / "sft/tokenizer.model").is_file()
    assert M.load_checkpoint(tmp_path / "sft").args.vocab_size == tok.n_words


def test_resume_after_a_kill_gives_the_same_run(tmp_path, tok):
    init = make_init(tmp_path, tok)
    flags = ["--max-steps", "8", "--ckpt-interval", "3", "--warmup", "2"]
    a = run_sft(init, tmp_path / "a", *flags)
    run_sft(init, tmp_path / "b", *flags, "--stop-at", "4")  # "killed" after step 4, checkpointed there
    b = run_sft(init, tmp_path / "b", *flags)  # the same command resumes
    assert [s for s, _ in a["loss_curve"]] == [s for s, _ in b["loss_curve"]] == list(range(1, 9))
    for (_, la), (_, lb) in zip(a["loss_curve"], b["loss_curve"]):
        assert la == pytest.approx(lb, abs=1e-5)
    assert torch.allclose(M.load_checkpoint(tmp_path / "a").output.weight,
                          M.load_checkpoint(tmp_path / "b").output.weight, atol=1e-6)


@pytest.mark.parametrize("line2, reason", [
    ('{"messages": [{"role": "user", "content": "hi"}', "bad JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}', "alternate"),
])
def test_malformed_jsonl_fails_with_file_and_line(tmp_path, tok, line2, reason):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]})
    bad = tmp_path / "dialogs.jsonl"
    bad.write_text(good + "\n" + line2 + "\n" + good + "\n")
    r = subprocess.run([sys.executable, "sft.py", "--init-from", str(make_init(tmp_path, tok)), "--data", str(bad),
                        "--out-dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2" in lines[0] and reason in lines[0], r.stderr
    assert not (tmp_path / "out" / "consolidated.00.pth").exists()
