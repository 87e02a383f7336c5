"""Preflight (common.preflight): before any work a stage checks that each checkpoint it reads loads, that it can write
its output directory and that no other run writes there; every mistake found is one line on stderr naming the file or
flag, never a traceback. Nothing here trains: each case stops before the first step."""
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import model as M

REPO = Path(__file__).resolve().parents[1]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def stops(capsys, run, *args) -> str:
    """run(*args) ends with common.die: its one stderr line."""
    with pytest.raises(SystemExit) as e:
        run(*args)
    assert e.value.code != 0
    return one_line(capsys)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny chat-model checkpoint (random weights, no tokenizer: preflight reads neither)."""
    d = tmp_path_factory.mktemp("ckpt")
    M.save_checkpoint(M.Transformer(M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16,
                                                max_seq_len=32)), d)
    return d


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A directory this process cannot write in. As root (CI containers), chmod 555 stops nobody, so the directory is
    made immutable (chattr +i, a real refusal from the file system); as another user, chmod 555 does it."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode:
            pytest.skip("root without chattr +i: no way to make a directory unwritable here")
        undo = ["chattr", "-i", str(d)]
    else:
        d.chmod(0o555)
        undo = ["chmod", "755", str(d)]
    try:
        (d / "probe").touch()
        pytest.skip("the directory is still writable")
    except OSError:
        pass
    yield d
    subprocess.run(undo, check=True)


# ---- one run per output directory --------------------------------------------------------------------------------------
def test_a_second_pipeline_on_one_directory_is_refused_naming_the_first(tmp_path):
    """Two real pipelines on one --out: the first runs a stand-in stage that sleeps; the second stops within seconds
    with one line naming the first's PID, and leaves the first's stage directory alone."""
    out, stage = tmp_path / "out", tmp_path / "stage.py"
    stage.write_text("import time\ntime.sleep(120)\n")
    first = (f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport pipeline\n"
             f"pipeline.STAGES[:] = [pipeline.Stage('pretrain', {str(stage)!r}, 'pretrain', [], [], 1.0)]\n"
             f"pipeline.cli(['--out', {str(out)!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", first], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "pretrain" / "pipeline_command.json").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        t0 = time.time()
        second = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--out", str(out), "--only", "pretrain",
                                 "--seed", "1"], capture_output=True, text=True, timeout=120)
        assert time.time() - t0 < 60 and second.returncode == 2
        err = second.stderr.strip()
        assert err == f"{err.splitlines()[0]}" and f"is in use by PID {proc.pid} " in err, err
        assert (out / "pretrain" / "pipeline_command.json").is_file() and proc.poll() is None  # the first runs on
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, capsys, monkeypatch):
    """The lock of a run killed with kill -9 (its PID in .lock, no process holding the flock) is taken over, saying
    so in one line; a lock another live process holds stops the call, naming that PID."""
    monkeypatch.setattr(common, "_LOCKS", {})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(f"PID {dead.stdout.strip()} on host, started 2026-01-01 00:00:00")
    common.lock_output_dir(tmp_path)
    assert f"the run that held it (PID {dead.stdout.strip()} " in capsys.readouterr().out
    assert (tmp_path / ".lock").read_text().startswith(f"PID {os.getpid()} ")
    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(other / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'PID {os.getpid()} on h'.encode())\n"
                               "print('held', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = stops(capsys, common.lock_output_dir, other)
        assert err == f"error: {other} is in use by PID {holder.pid} on h; wait for it or stop it, or pass another " \
                      "--out-dir"
    finally:
        holder.kill()
        holder.wait()
    common.lock_output_dir(other)  # its holder is gone: free again
    common.release_output_dirs()
    assert (tmp_path / ".lock").read_text() == ""  # a run that ends normally leaves no owner to report


def test_only_rank_0_of_torchrun_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_LOCKS", {})
    common.preflight(tmp_path / "r1", common.Dist(rank=1, world_size=2))
    assert not (tmp_path / "r1" / ".lock").exists()
    common.preflight(tmp_path / "r0", common.Dist(rank=0, world_size=2))
    assert (tmp_path / "r0" / ".lock").is_file()
    common.release_output_dirs()


# ---- an output directory that cannot be written: refused before any training --------------------------------------
def test_an_unwritable_output_directory_is_refused_before_any_work(read_only, ckpt, capsys, monkeypatch):
    import evaluate
    import pipeline
    import pretrain
    import sft
    monkeypatch.setattr(common, "_LOCKS", {})
    out = read_only / "out"
    cases = [(pretrain.main, pretrain.PretrainConfig, ["--out-dir", str(out)], "--out-dir"),
             (sft.main, sft.SFTConfig, ["--init-from", str(ckpt), "--out-dir", str(out)], "--out-dir"),
             (evaluate.main, evaluate.EvalConfig, ["--a", str(ckpt), "--b", str(ckpt), "--out-dir", str(out)],
              "--out-dir")]
    for main, cls, flags, flag in cases:
        err = stops(capsys, main, common.parse_config(cls, flags))
        assert err.startswith(f"error: {flag} {out}: cannot write there ("), err
    err = stops(capsys, pipeline.cli, ["--out", str(out), "--only", "pretrain"])
    assert err.startswith(f"error: --out {out}: cannot write there ("), err
    assert not out.exists()  # no tokenizer trained, no checkpoint begun


def test_pipeline_out_naming_a_file_is_one_line(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--out", str(f)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: --out {f}: is a file, not a directory\n", r.stderr


# ---- flags and presets ---------------------------------------------------------------------------------------------------
def test_an_unknown_model_preset_stops_before_the_tokenizer_is_trained(tmp_path, capsys):
    import pretrain
    err = stops(capsys, pretrain.main, common.parse_config(pretrain.PretrainConfig,
                                                           ["--model", "3Q", "--out-dir", str(tmp_path / "o")]))
    assert err.startswith("error: --model 3Q: not a preset; choose one of 7B") and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="^error: --device 3Q: choose auto, cpu, cuda, cuda:N or mps$"):
        common.pick_device("3Q")


# ---- checkpoints it will read --------------------------------------------------------------------------------------------
def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("params, says", [("{not json", "not valid JSON"), ('["a list"]', "not a JSON object"),
                                          ('{"dim": 32}', "missing n_layers, n_heads"),
                                          ('{"dim": "wide", "n_layers": 1, "n_heads": 2}', "params.json: ")])
def test_reward_init_from_with_a_bad_params_json_is_one_line(tmp_path, ckpt, capsys, params, says):
    import reward
    d = copy_ckpt(ckpt, tmp_path / "init")
    (d / "params.json").write_text(params)
    err = stops(capsys, reward.main, common.parse_config(reward.RewardConfig, ["--init-from", str(d), "--out-dir",
                                                                               str(tmp_path / "rm")]))
    assert err.startswith(f"error: --init-from: {d / 'params.json'}: ") and says in err, err
    with pytest.raises(M.CheckpointError, match="params.json"):  # the loader says the same without preflight
        M.load_checkpoint(d)


def test_weights_that_cannot_load_safely_are_one_line(tmp_path, ckpt, capsys):
    """An old (pre-1.6, non-zip) torch.save file holding a module, not tensors: one line that never suggests
    weights_only=False; a zip checkpoint cut short (a full disk, a killed copy): found by preflight from the archive's
    directory without reading the weights."""
    import reward
    d = copy_ckpt(ckpt, tmp_path / "old")
    torch.save(torch.nn.Linear(2, 2), d / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    err = stops(capsys, reward.main, common.parse_config(reward.RewardConfig, ["--init-from", str(d), "--out-dir",
                                                                               str(tmp_path / "rm")]))
    assert "consolidated.00.pth: holds Python objects" in err and "weights_only=False" not in err, err
    pth = copy_ckpt(ckpt, tmp_path / "cut") / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[:-100])
    err = stops(capsys, reward.main, common.parse_config(reward.RewardConfig, ["--init-from", str(pth.parent),
                                                                               "--out-dir", str(tmp_path / "rm")]))
    assert err == f"error: --init-from: {pth}: incomplete (cut off while it was written?); write it again"
    with pytest.raises(M.CheckpointError, match="cannot be loaded"):
        M.load_checkpoint(pth.parent)
    old_sd = copy_ckpt(ckpt, tmp_path / "old_sd")  # an old-format file of plain tensors still loads
    torch.save(torch.load(ckpt / "consolidated.00.pth"), old_sd / "consolidated.00.pth",
               _use_new_zipfile_serialization=False)
    M.check_checkpoint(old_sd)
    M.load_checkpoint(old_sd)


# ---- a full disk -----------------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_naming_the_place_and_the_free_space(tmp_path, capsys, monkeypatch):
    """write() on a full disk raises ENOSPC without a file name: the line names the output directory instead."""
    import sft

    def no_space(dest, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(common, "atomic_write", no_space)
    cfg = sft.SFTConfig(out_dir=str(tmp_path / "o"))
    err = stops(capsys, common.run_main, lambda c: common.write_metrics(c.out_dir, {"x": 1}), cfg)
    assert err.startswith(f"error: disk full while writing {tmp_path / 'o'}: ") and " MB free on /" in err, err
    with pytest.raises(OSError):  # other errors stay tracebacks: they are bugs to see
        common.run_main(lambda c: open(tmp_path / "missing" / "x"), cfg)
