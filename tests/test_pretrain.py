"""pretrain.py and common.py's training plumbing: learning, exact resume, atomic checkpoints, DDP/FSDP2 equivalence,
schedules, and one-line errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import world as world_module
from world import PRETRAIN_MIX, World
import model as M
import pretrain
from dist_util import torchrun

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--corpus-bytes", "200000", "--batch-size", "8", "--seq-len", "64", "--long-seq-len", "0",
         "--eval-batches", "2", "--log-interval", "1000", "--no-recall-eval"]


def run_main(out, *flags):
    cfg = common.parse_config(pretrain.PretrainConfig, ["--out-dir", str(out), *SMALL, *flags])
    pretrain.main(cfg)
    return json.loads((Path(out) / "metrics.json").read_text()) if (Path(out) / "metrics.json").exists() else None


def history(out):
    return common.load_resume_state(out)["extra"]["history"]["train"]


def test_lr_schedule_warmup_and_cosine_floor():
    lrs = [common.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert common.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_only_on_matrices():
    m = M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=8, max_seq_len=16))
    opt = common.make_optimizer(m, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_short_pretraining_beats_unigram_entropy(tmp_path):
    m = run_main(tmp_path / "pt", "--max-steps", "100", "--eval-interval", "100", "--lr", "3e-3", "--warmup", "10")
    # 100 steps x 512 tokens already learn the world's templates: well below the context-free unigram entropy (0.51 of
    # it with the club notices, 0.61 before them; 60 steps: 0.50 while every sum was bare, 0.72 once 30% were asked)
    assert m["val_loss"] < 0.7 * m["unigram_entropy"], m
    assert (tmp_path / "pt/tokenizer.model").is_file() and m["complete"]
    back = M.load_checkpoint(tmp_path / "pt")
    assert back.args.vocab_size == 512


def test_resume_gives_the_same_loss_sequence(tmp_path):
    flags = ["--max-steps", "12", "--eval-interval", "100", "--ckpt-interval", "4", "--warmup", "3"]
    run_main(tmp_path / "a", *flags)
    run_main(tmp_path / "b", *flags, "--stop-at", "6")  # "killed" after step 6 (checkpointed at 6)
    assert len(history(tmp_path / "b")) == 6
    run_main(tmp_path / "b", *flags)  # the same command again resumes from step 6
    a, b = history(tmp_path / "a"), history(tmp_path / "b")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6)
    assert torch.equal(M.load_checkpoint(tmp_path / "a").output.weight, M.load_checkpoint(tmp_path / "b").output.weight)
    # once more on the finished run: nothing trains, the checkpoint is evaluated again, and no throughput is claimed
    weight = M.load_checkpoint(tmp_path / "b").output.weight
    m = run_main(tmp_path / "b", *flags)
    assert m["complete"] and m["tokens_per_sec"] is None and m["mfu"] is None and m["steps"] == 12
    assert torch.equal(M.load_checkpoint(tmp_path / "b").output.weight, weight)


def test_checkpoint_interrupted_mid_write_keeps_the_previous_one(tmp_path, monkeypatch):
    m = M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=8, max_seq_len=16))
    M.save_checkpoint(m.init_weights(seed=0), tmp_path)
    before = M.load_checkpoint(tmp_path).state_dict()

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(m.init_weights(seed=1), tmp_path)
    monkeypatch.undo()
    after = M.load_checkpoint(tmp_path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, mode, monkeypatch):
    """6 steps of one process against two (pretrain.py run as its __main__ runs it, inside dist_util's recorder): the
    same losses, weights and gradient norms. AdamW with clipping ignores a global scale of the gradient, so the losses
    and weights alone would not see gradients summed over the ranks instead of averaged: the norms (before clipping,
    from common.optimizer_step) double then. Measured (CPU, fp32, lr 3e-3): losses within 4.8e-7, weights within
    2.6e-7 (about 1e-4 of an lr unit) and norms within 4.7e-6 relative, DDP and FSDP2 alike; the bounds (1e-5, 1e-5,
    1e-4) are 20-40x those, and the weights' still ~300x below one Adam step (lr)."""
    from dist_util import recording_grad_norms
    flags = ["--max-steps", "6", "--eval-interval", "100", "--ckpt-interval", "100", "--warmup", "2", *SMALL]
    with monkeypatch.context() as m:
        m.setattr(common, "optimizer_step", common.optimizer_step)  # undone after the one-process run
        norms_one = recording_grad_norms(common)
        run_main(tmp_path / "one", *flags)
    r = torchrun(REPO / "tests" / "dist_util.py", "pretrain", tmp_path / "norms.json", "--out-dir", tmp_path / "two",
                 *flags, *(["--fsdp"] if mode == "fsdp" else []), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(one) == len(two) == 6
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5)  # same global batch, split in two; only float summation order differs
    norms_two = json.loads((tmp_path / "norms.json").read_text())
    assert len(norms_one) == len(norms_two) == 6
    assert norms_two == pytest.approx(norms_one, rel=1e-4)  # summed gradients: twice as large
    # the checkpoint written under torchrun loads in one process with the same weights as the one-process run
    w1 = M.load_checkpoint(tmp_path / "one").state_dict()
    w2 = M.load_checkpoint(tmp_path / "two").state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "pretrain.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    r = _cli("--data", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "empty.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("--init-from", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("--batch-size", "7", "--grad-accum", "2", "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "--batch-size" in r.stderr and "Traceback" not in r.stderr
    for mix in ("clubs=0.04", "club=-1", "club", ",".join(f"{k}=0" for k in PRETRAIN_MIX)):
        r = _cli("--mix", mix, "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
        assert r.returncode == 2 and "--mix" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (mix, r.stderr)
    r = _cli("--mix", "club=0.04", "--data", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "o"),
             cwd=tmp_path)
    assert r.returncode == 2 and "--mix" in r.stderr and "--data" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "tokenizer.model").exists()  # nothing was trained before the error


def test_document_mix_kind_at_weight_zero_leaves_the_corpus_unchanged(monkeypatch):
    """A kind at weight 0 is never drawn and leaves the random stream alone: `--mix club=0,story=0.2` gives exactly the
    corpus of a PRETRAIN_MIX without that kind (no club notices), and the default corpus has the notices
    (pretrain.parse_mix reads the flag)."""
    world = World(seed=0)
    mix = pretrain.parse_mix("club=0, story=0.2")
    assert mix == {"club": 0.0, "story": 0.2}
    without = world.pretrain_documents(100_000, seed=0, mix=mix)
    assert not any(d.startswith("CLUB NEWS") for d in without)
    with monkeypatch.context() as m:
        m.setattr(world_module, "PRETRAIN_MIX", {**{k: w for k, w in PRETRAIN_MIX.items() if k != "club"}, "story": 0.2})
        assert world.pretrain_documents(100_000, seed=0) == without
    assert any(d.startswith("CLUB NEWS") for d in world.pretrain_documents(100_000, seed=0))


def test_help_lists_every_flag_with_default():
    p = common.build_parser(pretrain.PretrainConfig)
    text = p.format_help()
    for f in ("--out-dir", "--init-from", "--max-steps", "--device", "--dtype", "--compile", "--seed", "--data",
              "--fsdp", "--grad-checkpoint"):
        assert f in text
    flat = " ".join(text.split())
    assert "§2.2: 2000 steps (default: 50, >= 0)" in flat and "(default: 1000, > 0)" in flat


def _probe_inputs(monkeypatch, probe) -> dict:
    """Run a pretrain probe with completion_accuracy replaced: the (prompt, expected) pairs and the judge it passes."""
    seen = {}

    def fake(model, tok, prompts, correct, max_new_tokens=4, batch=64):
        seen["prompts"], seen["correct"] = prompts, correct
        return 0.0, []

    monkeypatch.setattr(pretrain, "completion_accuracy", fake)
    probe(None, None, world_seed=0, n=50)
    return seen


def test_arithmetic_probe_asks_held_out_sums_and_reads_the_whole_number(monkeypatch):
    """pretrain.arithmetic: prompts are the world's test-split sums (held out of chat fine-tuning) with their true
    results, and a completion counts only if its first number is the result (" 42." yes; " 421", " 4 2", "-42" no)."""
    seen = _probe_inputs(monkeypatch, pretrain.arithmetic)
    test_keys = set(World(seed=0).sums("test"))
    assert len(seen["prompts"]) == 50
    for prompt, want in seen["prompts"]:
        a, op, b = prompt.split("A: ")[1].rstrip(" =").split()
        assert (int(a), op, int(b)) in test_keys and prompt.endswith(f"{a} {op} {b} =")
        assert int(want) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    ok = seen["correct"]
    assert ok(" 42.", "42") and ok("42\n", "42") and ok(" 42", "42")
    assert not ok(" 421.", "42") and not ok(" 4 2", "42") and not ok(" -42", "42") and not ok(" four", "42")


def test_arithmetic_asked_probe_wants_the_operands_copied_then_the_result(monkeypatch):
    """pretrain.arithmetic_asked: the same held-out sums as a bare question; a completion counts only if it writes
    "a op b = result" first, with the whole result (" 26 + 16 = 42." yes; "26 + 61 = 42", "= 421", "42" no)."""
    seen = _probe_inputs(monkeypatch, pretrain.arithmetic_asked)
    keys = World(seed=0).sums("test")[:50]
    assert [p for p, _ in seen["prompts"]] == [f"Q: What is {a} {op} {b}? A:" for a, op, b in keys]
    for (_, want), (a, op, b) in zip(seen["prompts"], keys):
        assert want == f"{a} {op} {b} = {a + b if op == '+' else a - b}"
    ok = seen["correct"]
    assert ok(" 26 + 16 = 42.", "26 + 16 = 42") and ok("26 + 16 = 42\nQ:", "26 + 16 = 42")
    assert not ok(" 26 + 61 = 42.", "26 + 16 = 42") and not ok(" 26 + 16 = 421", "26 + 16 = 42")
    assert not ok(" 42.", "26 + 16 = 42")


def test_init_from_is_checked_for_its_head_and_context_before_training(tmp_path, capsys):
    """--init-from a reward model, or a --long-seq-len beyond the checkpoint's context (once a crash at the long
    phase's first step, 90% into the run): one line naming the flag, from build_model, before any step."""
    from dataclasses import replace
    from tokenizer import train_tokenizer
    tok = train_tokenizer(World(seed=0).pretrain_documents(150_000), 400, tmp_path / "tokenizer.model")
    args = M.preset("1M", vocab_size=tok.n_words, max_seq_len=128)
    M.save_checkpoint(M.Transformer(args).init_weights(seed=0), tmp_path / "lm", tok.model_path)
    M.save_checkpoint(M.Transformer(replace(args, head="scalar")).init_weights(seed=0), tmp_path / "rm",
                      tok.model_path)
    cpu = torch.device("cpu")
    for init, long, named in (("lm", 512, "--long-seq-len 512 is longer than the context of --init-from"),
                              ("rm", 0, "--init-from: ")):
        cfg = pretrain.PretrainConfig(init_from=str(tmp_path / init), seq_len=64, long_seq_len=long)
        with pytest.raises(SystemExit):
            pretrain.build_model(cfg, tok, cpu)
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    assert "where a language model is needed" in err
    model = pretrain.build_model(pretrain.PretrainConfig(init_from=str(tmp_path / "lm"), seq_len=64,
                                                         long_seq_len=128), tok, cpu)
    assert model.args.max_seq_len == 128
