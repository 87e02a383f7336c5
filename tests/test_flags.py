"""Every script's flags: each numeric one has a range (Config.RANGES), its default is in it, and a value outside it
stops the script on the command line with one line naming the flag (common.parse_config). Checkpoint directories a
stage will read are checked before it does any work (common.check_checkpoints)."""
import dataclasses
import importlib
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import common

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("pretrain", "sft", "reward", "rejection_sampling", "ppo", "gatt", "evaluate", "generate", "bench",
           "pipeline", "rate")
# values just outside each rule's range; float flags also get NaN, which no comparison admits (argparse itself
# refuses "nan" for an int flag)
OUTSIDE = {"positive": ["0"], "non_negative": ["-1"], "share": ["1.5", "-0.1"], "open_share": ["1", "0"],
           "positive_share": ["0", "1.01"]}


def config_class(script: str):
    mod = importlib.import_module(script)
    (cls,) = [c for name, c in inspect.getmembers(mod, inspect.isclass)
              if dataclasses.is_dataclass(c) and c.__module__ == script and name.endswith("Config")]
    return cls


def is_numeric(typ) -> bool:
    """int, float, Optional[int], list[float], ...: a flag whose values are numbers."""
    args = typing.get_args(typ)
    return typ in (int, float) or any(a in (int, float) for a in args)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_range_that_its_default_meets(script):
    cls = config_class(script)
    hints = typing.get_type_hints(cls)
    numeric = {f.name for f in dataclasses.fields(cls) if is_numeric(hints[f.name])}
    assert set(cls.RANGES) == numeric, (set(cls.RANGES) ^ numeric)  # no typo, no numeric flag left unchecked
    cfg = cls()
    for name, rule in cls.RANGES.items():
        assert common.range_error(name, getattr(cfg, name), rule) is None, (name, getattr(cfg, name))
    help_text = " ".join(common.build_parser(cls).format_help().split())
    assert any(f", {common.RULES[r][0]})" in help_text for r in cls.RANGES.values())  # --help shows the ranges


def outside(script: str, name: str, rule: str) -> list[str]:
    typ = typing.get_type_hints(config_class(script))[name]
    return OUTSIDE[rule] + (["nan"] if float in (typ, *typing.get_args(typ)) else [])


CASES = [(s, name, rule, bad) for s in SCRIPTS for name, rule in config_class(s).RANGES.items()
         for bad in outside(s, name, rule)]


@pytest.mark.parametrize("script, name, rule, bad", CASES, ids=[f"{s}--{n}={b}" for s, n, _, b in CASES])
def test_a_value_outside_its_range_stops_the_command_line(script, name, rule, bad, capsys):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit) as e:
        common.parse_config(config_class(script), [flag, bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {flag} ") and f"must be {common.RULES[rule][0]}" in err, err


def test_range_rules_on_hand_values():
    assert common.range_error("k", 1, "positive") is None and common.range_error("k", None, "positive") is None
    assert common.range_error("top_p", 1.0, "positive_share") is None
    assert common.range_error("x", float("inf"), "non_negative") == "--x inf: must be >= 0"
    assert common.range_error("temperatures", [0.7, -1.0], "non_negative") == \
        "--temperatures 0.7 -1.0: must be >= 0 (each value; -1.0 is not)"
    assert common.range_error("safety_threshold", 0.0, "open_share") == "--safety-threshold 0.0: must be in (0, 1)"
    with pytest.raises(ValueError):
        common.ranges(positve="k")  # a misspelt rule is a bug in the script, caught at import


def test_the_flag_error_comes_before_any_work(tmp_path):
    """The script itself: `rejection_sampling.py --k 0` (once a ZeroDivisionError after the temperature sweep's
    sampling) exits with one line saying what --k is, and writes nothing."""
    proc = subprocess.run([sys.executable, str(REPO / "rejection_sampling.py"), "--k", "0", "--out-dir",
                           str(tmp_path / "rs")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --k 0: must be > 0: samples per prompt"
    assert not (tmp_path / "rs").exists()


def test_every_checkpoint_directory_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """PPO reads --sft only for its final win rate, after the whole run: a wrong one must fail first, naming it; so
    must a reward model passed where the chat model goes, or the other way round. check_checkpoints reads no
    weights: a params.json is a Meta-layout directory (its "head" says which kind), a config.json a Hugging Face one."""
    import ppo
    import rejection_sampling
    meta, hf, rm, empty = (tmp_path / d for d in ("meta", "hf", "rm", "empty"))
    for d in (meta, hf, rm, empty):
        d.mkdir()
    (meta / "params.json").write_text("{}")
    (hf / "config.json").write_text("{}")
    (rm / "params.json").write_text('{"head": "scalar"}')
    common.check_checkpoints(a=(str(meta), "lm"), b=(str(hf), "lm"), c=(str(rm), "scalar"), unused=(None, "lm"))

    class Started(Exception):
        pass

    def started(*args):
        raise Started
    monkeypatch.setattr(common, "setup_distributed", started)  # the stage's first step of real work
    good = dict(init_from=str(meta), rm_helpful=str(rm), rm_safety=str(rm))
    for run, cfg_cls, kwargs, named in (
            (ppo.main, ppo.PPOConfig, dict(sft=str(tmp_path / "nope")), "--sft: checkpoint directory not found"),
            (ppo.main, ppo.PPOConfig, dict(rm_safety=str(empty)), "--rm-safety: "),
            (ppo.main, ppo.PPOConfig, dict(init_from=str(rm)), "--init-from: "),
            (ppo.main, ppo.PPOConfig, dict(rm_helpful=str(hf)), "--rm-helpful: "),
            (rejection_sampling.main, rejection_sampling.RSConfig, dict(rm_helpful=str(empty)), "--rm-helpful: "),
            (rejection_sampling.main, rejection_sampling.RSConfig, dict(base=str(rm)), "--base: "),
            (rejection_sampling.main, rejection_sampling.RSConfig, dict(rm_safety=str(meta)), "--rm-safety: ")):
        with pytest.raises(SystemExit):
            run(cfg_cls(**{**good, **kwargs}, out_dir=str(tmp_path / "out")))
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    assert "a language model (head 'lm'), where a reward or value model is needed" in err
    assert not (tmp_path / "out").exists()
    for run, cfg in ((ppo.main, ppo.PPOConfig(**good, sft=str(hf))), (rejection_sampling.main,
                                                                         rejection_sampling.RSConfig(**good)),
                     (ppo.main, ppo.PPOConfig(**good, sft="nope", n_test=0))):  # --n-test 0: --sft never read
        with pytest.raises(Started):  # every directory right: the stage starts
            run(cfg)


@dataclasses.dataclass
class ToyConfig:
    lr: float = 2e-5  # §3.1: initial lr
    epochs: int = 2  # §3.1: passes over the data
    # -- advanced --
    log_every: int = 10  # steps between log lines
    tag: str = "x"
    RANGES = common.ranges(positive="lr epochs log_every")


def test_help_shows_the_papers_knobs_apart_from_the_advanced_flags():
    """Fields above the `# -- advanced --` line are the first group of --help, those below it the second; flags,
    defaults, parsing and range checks are what they were without the line."""
    p = common.build_parser(ToyConfig)
    groups = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
    assert groups["the paper's knobs"] == ["lr", "epochs"] and groups["advanced"] == ["log_every", "tag"]
    text = p.format_help().split("options:")[1]  # after the usage line
    assert text.index("the paper's knobs:") < text.index("--epochs") < text.index("advanced:") < text.index("--tag")
    assert "steps between log lines (default: 10, > 0)" in " ".join(text.split())
    assert common.parse_config(ToyConfig, []) == ToyConfig()
    assert common.parse_config(ToyConfig, ["--tag", "y", "--lr", "0.1"]) == ToyConfig(lr=0.1, tag="y")
    with pytest.raises(SystemExit):
        common.parse_config(ToyConfig, ["--log-every", "0"])

    @dataclasses.dataclass
    class NoMarker:
        a: int = 1  # first
        b: int = 2  # second
    groups = {g.title: [a.dest for a in g._group_actions] for g in common.build_parser(NoMarker)._action_groups}
    assert groups["the paper's knobs"] == ["a", "b"] and "advanced" not in groups
