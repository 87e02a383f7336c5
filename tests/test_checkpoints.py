"""common.py's training checkpoints: a crash at any file operation of a checkpoint write resumes to the same final
weights as a run never interrupted; a full disk keeps the previous checkpoint and says so in one line; a corrupt or
hostile resume state stops with one line naming the file; checkpoints of the older layout start over."""
import errno
import io
import os
import shutil
import subprocess

import pytest
import torch

import common
import model as M

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=8, max_seq_len=16)
STEPS, EVERY = 4, 2  # checkpoints at steps 2 (into an empty directory) and 4 (a swap, and the last one)


def train(out, steps: int = STEPS) -> dict:
    """A miniature stage: resume if `out` holds a checkpoint, train to `steps`, checkpoint every EVERY steps. The batch
    is a function of the step, as in pretrain.py, so a resumed run repeats an uninterrupted one exactly."""
    model = M.Transformer(ARGS).init_weights(seed=0)
    opt = common.make_optimizer(model, 1e-2, 0.1)
    start, resume = 0, common.load_resume_state(out)
    if resume is not None:
        common.load_full_state_dicts(model, opt, resume["model"], resume["optimizer"])
        start = resume["step"]
    for step in range(start, steps):
        x = torch.randint(0, ARGS.vocab_size, (4, 9), generator=torch.Generator().manual_seed(step))
        model(x[:, :-1], x[:, 1:])[1].backward()  # (B, T) inputs, the same shifted by one as targets
        opt.step()
        opt.zero_grad()
        if (step + 1) % EVERY == 0:
            common.save_training_checkpoint(out, model, model, opt, step + 1, common.Dist())
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    """The process dying: not an OSError, so no cleanup that catches those can swallow it."""


FILE_OPS = ("replace", "rename", "link", "fsync", "mkdir", "unlink", "rmdir")


def count_or_crash(monkeypatch, crash_at=None) -> list:
    """Wrap every os call that changes files (FILE_OPS); the crash_at-th call and every later one raise Crash, as a
    killed process does nothing more. Returns a list that counts the calls."""
    calls = []
    for name in FILE_OPS:
        def op(*a, _real=getattr(os, name), _name=name, **k):
            calls.append(_name)
            if crash_at is not None and len(calls) >= crash_at:
                raise Crash(f"killed at file operation {len(calls)} ({_name})")
            return _real(*a, **k)
        monkeypatch.setattr(os, name, op)
    return calls


def test_a_crash_at_any_file_operation_resumes_to_the_same_weights(tmp_path, monkeypatch):
    reference = train(tmp_path / "ref")
    at = {s: train(tmp_path / f"upto{s}", s) for s in range(EVERY, STEPS + 1, EVERY)}  # each checkpoint's weights
    with monkeypatch.context() as m:
        calls = count_or_crash(m)
        train(tmp_path / "count")
    assert {"replace", "link", "fsync"} <= set(calls)
    for k in range(1, len(calls) + 1):  # every file operation of both checkpoint writes, in turn
        out = tmp_path / f"crash{k}"
        with monkeypatch.context() as m:
            count_or_crash(m, crash_at=k)
            with pytest.raises(Crash):
                train(out)
        resumed = common.load_resume_state(out)
        assert resumed is None or same(resumed["model"], at[resumed["step"]]), k  # weights and step agree
        assert same(train(out), reference), f"crash at file operation {k}"
        assert same(M.load_checkpoint(out).state_dict(), reference), k  # the published checkpoint too
        assert not (out / common.UNIT_TMP).exists(), k  # an .old left by a crash at the end of the last write is
        #                                                 garbage that no reader takes (.checkpoint is there)




class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write past them raises ENOSPC, as the kernel does."""
    room = 0

    def write(self, b):
        if self.tell() + len(b) > FullDisk.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    at2 = train(out, 2)
    FullDisk.room = 3000  # the next write fails partway
    monkeypatch.setattr(M, "open", lambda path, mode="r": FullDisk(path, mode.replace("b", "")), raising=False)
    with pytest.raises(SystemExit):
        train(out)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and str(out) in err[0] and "MB are free" in err[0], err
    check_previous_kept(out, at2)


def check_previous_kept(out, weights):
    state = common.load_resume_state(out)
    assert state["step"] == 2 and same(state["model"], weights)
    assert same(M.load_checkpoint(out).state_dict(), weights)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], list(out.rglob("*"))


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys):
    """A tmpfs big enough for one checkpoint, not for two side by side (skipped where mount is not allowed)."""
    train(tmp_path / "probe", 2)
    unit = sum(f.stat().st_size for f in (tmp_path / "probe" / common.UNIT).iterdir())
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={unit * 3 // 2 + 65536}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        at2 = train(mnt / "out", 2)
        with pytest.raises(SystemExit):
            train(mnt / "out", 4)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "disk full" in err[0], err
        check_previous_kept(mnt / "out", at2)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "code-running pickle", "no weights"])
def test_a_corrupt_resume_unit_stops_with_one_line_naming_it(tmp_path, capsys, damage, monkeypatch):
    out = tmp_path / "out"
    train(out)
    state = out / common.UNIT / "resume.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:200])
    elif damage == "random bytes":
        state.write_bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "code-running pickle":
        torch.save({"step": STEPS, "extra": {}, "optimizer": Hostile()}, state)
    else:
        state = out / common.UNIT / "consolidated.00.pth"
        state.unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        common.load_resume_state(out)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(state) in err[0] and f"delete {out / common.UNIT}" in err[0], err
    assert not (tmp_path / "PWNED").exists()


def test_a_checkpoint_of_the_older_layout_starts_over(tmp_path, capsys):
    """resume.pt beside consolidated.00.pth (before resume units) was not written as one unit with the weights:
    it is not trusted; the run starts from step 0, says so, and its first checkpoint removes the old file."""
    out = tmp_path / "out"
    M.save_checkpoint(M.Transformer(ARGS).init_weights(seed=1), out)
    torch.save({"step": 4, "optimizer": None, "extra": {}}, out / "resume.pt")
    assert common.load_resume_state(out) is None
    assert "older layout" in capsys.readouterr().out
    assert same(train(out), train(tmp_path / "fresh"))
    assert not (out / "resume.pt").exists()


def test_forget_resume_starts_the_next_run_over(tmp_path):
    out = tmp_path / "out"
    train(out)
    published = M.load_checkpoint(out).state_dict()
    common.forget_resume(out)
    assert common.load_resume_state(out) is None
    assert same(M.load_checkpoint(out).state_dict(), published)  # the published checkpoint stays
    shutil.rmtree(out)
