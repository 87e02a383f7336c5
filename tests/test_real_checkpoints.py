"""--init-from a real Llama 2 directory in every fine-tuning stage, on tiny stand-ins laid out as the real ones are:

  Meta's download (llama/download.sh):  meta/tokenizer.model, meta/llama-2-7b/{params.json, consolidated.00.pth},
                                        params.json with Meta's keys only and "vocab_size": -1, bf16 weights;
  Hugging Face's repo:                  hf/{config.json, model.safetensors, tokenizer.model}, half-precision weights.

Ours (fp32) is the third layout, and all three hold the same numbers: the stack's chat model rounded to bf16 once. So
a stage started from Meta's or Hugging Face's directory must find the tokenizer, load the same model and take the same
steps as from ours. The steps are equal only if the stage trains fp32 master weights whatever the file's dtype:
updated in bf16, the weights after SFT's first step would differ from ours by bf16 rounding (and real AdamW steps of
2e-5 would mostly round away).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import common
import generate as G
import rlhf
import model as M
from dist_util import tiny_stack
from test_sft import run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

META_KEYS = ("dim", "multiple_of", "n_heads", "n_kv_heads", "n_layers", "norm_eps", "vocab_size")  # 70B's params.json


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    stack = tiny_stack(tmp_path_factory.mktemp("stack"))
    tok = Path(stack["tok"].model_path)
    root = tmp_path_factory.mktemp("layouts")  # no tokenizer.model above these folders but the ones put there
    weights = M.load_checkpoint(stack["chat"], dtype=torch.bfloat16)
    meta = root / "meta" / "llama-2-7b"
    M.save_checkpoint(weights, meta)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**{k: params[k] for k in META_KEYS}, "vocab_size": -1}))
    shutil.copy(tok, root / "meta" / "tokenizer.model")
    M.export_hf(weights, root / "hf", tok)  # tokenizer.model inside, as Hugging Face's repos ship it
    M.save_checkpoint(M.load_checkpoint(meta, dtype=torch.float32), root / "ours", tok)
    return {**stack, "meta": meta, "hf": root / "hf", "ours": root / "ours", "tok_path": tok}


def test_real_layouts_find_their_tokenizer_and_load_the_same_model(ckpts, tmp_path, capsys):
    ours, _ = G.load_model_and_tokenizer(ckpts["ours"])
    x = torch.randint(3, ours.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for name, tok_dir in (("meta", ckpts["meta"].parent), ("hf", ckpts["hf"])):
        model, tok = G.load_model_and_tokenizer(ckpts[name])
        assert Path(tok.model_path) == tok_dir / "tokenizer.model", name  # Meta's: one folder up
        assert next(model.parameters()).dtype == torch.bfloat16  # loaded as the file holds it unless told otherwise
        model = M.load_checkpoint(ckpts[name], dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(model(x)[0], ours(x)[0]), name  # the same numbers, hence the same logits
    # neither inside nor one folder up: one line naming both places and, where the stage has it, the flag
    bare = tmp_path / "models" / "Llama-2-7b-hf"
    shutil.copytree(ckpts["hf"], bare)
    (bare / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model") as e:
        M.find_tokenizer(bare)
    assert str(bare / "tokenizer.model") in str(e.value)
    assert str(tmp_path / "models" / "tokenizer.model") in str(e.value)  # Meta's place for it, one folder up
    with pytest.raises(SystemExit):
        run_sft(bare, tmp_path / "sft")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer.model" in err[0] and "--tokenizer" in err[0], err
    assert M.find_tokenizer(bare, ckpts["tok_path"]) == ckpts["tok_path"]  # --tokenizer names it: taken as given


def test_sft_from_meta_and_hf_dirs_takes_ours_steps_in_fp32(ckpts, tmp_path):
    flags = ("--max-steps", "2", "--warmup", "1", "--n-val-dialogs", "20")
    runs = {name: run_sft(ckpts[name], tmp_path / name, *flags) for name in ("ours", "meta", "hf")}
    want = M.load_checkpoint(tmp_path / "ours").state_dict()
    for name in ("meta", "hf"):
        m = runs[name]
        assert m["complete"] and m["loss_curve"] == runs["ours"]["loss_curve"], name
        assert m["val_loss_before"] == runs["ours"]["val_loss_before"]
        got = M.load_checkpoint(tmp_path / name)
        assert all(p.dtype == torch.float32 for p in got.parameters())  # fp32 masters, written as trained
        assert max((got.state_dict()[k] - want[k]).abs().max().item() for k in want) == 0.0, name
        assert (tmp_path / name / "tokenizer.model").read_bytes() == ckpts["tok_path"].read_bytes()


def metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def untimed(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if "per_sec" not in k}


def test_reward_models_from_meta_and_hf_dirs_equal_ours(ckpts, tmp_path):
    """The preference pairs are sampled from the --init-from model, then the RM is trained from it: equal curves."""
    import reward
    flags = ["--train-prompts", "24", "--safety-prompts", "30", "--test-prompts", "8", "--max-new-tokens", "6",
             "--batch-size", "8", "--log-interval", "1000"]
    for name in ("ours", "meta", "hf"):
        reward.main(common.parse_config(reward.RewardConfig, flags + [
            "--init-from", str(ckpts[name]), "--out-dir", str(tmp_path / name / "rm"), "--prefs-dir",
            str(tmp_path / name / "prefs")]))
    want = metrics(tmp_path / "ours" / "rm")
    for name in ("meta", "hf"):
        m = metrics(tmp_path / name / "rm")
        assert m["complete"] and m["loss_curve"] == want["loss_curve"] and m["accuracy"] == want["accuracy"], name
        rm = rlhf.load_reward_model(tmp_path / name / "rm")
        assert rm.args.head == "scalar" and all(p.dtype == torch.float32 for p in rm.parameters())
        def pairs(d):  # the records, each source named by its temperature only (the model's name is its directory's)
            recs = [json.loads(line) for line in (tmp_path / d / "prefs" / "train.jsonl").read_text().splitlines()]
            return [{**r, "sources": [s.rsplit("_T", 1)[1] for s in r["sources"]]} for r in recs]
        assert pairs(name) == pairs("ours")


def test_rejection_sampling_from_meta_and_hf_dirs(ckpts, tmp_path):
    """RS samples with the start model as the file holds it (bf16 here) and fine-tunes it with sft.py: the two real
    layouts hold the same bf16 numbers, so they keep the same replies and end at the same weights."""
    import rejection_sampling as RS
    flags = ["--rm-helpful", str(ckpts["rm_helpful"]), "--rm-safety", str(ckpts["rm_safety"]), "--iterations", "1",
             "--k", "2", "--n-prompts", "8", "--n-sweep", "4", "--n-test", "4", "--temperatures", "1.0",
             "--max-new-tokens", "8", "--epochs", "1"]
    for name in ("meta", "hf"):
        RS.main(common.parse_config(RS.RSConfig, flags + ["--init-from", str(ckpts[name]),
                                                          "--out-dir", str(tmp_path / name)]))
        assert metrics(tmp_path / name)["complete"]
        model, _ = G.load_model_and_tokenizer(tmp_path / name)  # its tokenizer.model copied beside it
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (tmp_path / "meta" / "rs_iter1.jsonl").read_text() == (tmp_path / "hf" / "rs_iter1.jsonl").read_text()
    a, b = (M.load_checkpoint(tmp_path / n).state_dict() for n in ("meta", "hf"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_from_meta_and_hf_dirs_takes_ours_step(ckpts, tmp_path):
    """One PPO iteration (--no-eval-start keeps the trained iterate) from ours, from Meta's dir and from Hugging Face's,
    --sft being the same model in yet another layout: the same rollouts, losses and update."""
    import ppo
    flags = ["--rm-helpful", str(ckpts["rm_helpful"]), "--rm-safety", str(ckpts["rm_safety"]), "--iterations", "1",
             "--batch-size", "8", "--minibatch-size", "4", "--n-eval", "4", "--n-test", "4", "--max-new-tokens", "8",
             "--eval-interval", "1", "--no-eval-start", "--ppo-epochs", "1"]
    for name, sft in (("ours", "ours"), ("meta", "hf"), ("hf", "meta")):
        ppo.main(common.parse_config(ppo.PPOConfig, flags + ["--init-from", str(ckpts[name]), "--sft", str(ckpts[sft]),
                                                             "--out-dir", str(tmp_path / name)]))
    want = metrics(tmp_path / "ours")
    w = M.load_checkpoint(tmp_path / "ours").state_dict()
    assert any(not torch.equal(w[k], v) for k, v in M.load_checkpoint(ckpts["ours"]).state_dict().items())  # it moved
    for name in ("meta", "hf"):
        m = metrics(tmp_path / name)
        assert m["complete"] and m["best_iteration"] == 1, name
        assert [untimed(i) for i in m["iters"]] == [untimed(i) for i in want["iters"]], name
        assert m["win_rate_vs_sft"] == want["win_rate_vs_sft"]
        model, _ = G.load_model_and_tokenizer(tmp_path / name)  # written with the tokenizer found one folder up
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(torch.equal(model.state_dict()[k], w[k]) for k in w), name


# Meta's model-parallel layout (fairscale's layers in Meta's llama/model.py), written out here rather than read from
# model.py, so that a wrong entry in the loader's table cannot be matched by the same wrong split in the test:
# ColumnParallelLinear splits the output features (dim 0), RowParallelLinear the input features (dim 1),
# ParallelEmbedding the embedding dimension (dim 1); the RMSNorm weights are whole on every shard.
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel
              "wo": 1, "w2": 1,  # row-parallel
              "tok_embeddings": 1}  # parallel embedding


def test_meta_two_shard_checkpoint_loads_every_weight_as_it_was(tmp_path):
    """A 13B-style download: consolidated.00.pth and consolidated.01.pth, each holding half of every split weight, and
    Meta's params.json (its keys only, vocab_size -1). model.load_checkpoint must put every weight back whole."""
    args = M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64)
    m = M.Transformer(args).init_weights(seed=0)
    assert args.dim != m.layers[0].feed_forward.w1.weight.shape[0]  # w1 not square: a split on the wrong dim shows
    d = tmp_path / "llama-2-13b"
    M.save_checkpoint(m, d)
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**{k: params[k] for k in META_KEYS}, "vocab_size": -1}))
    want = m.state_dict()
    split = {k: META_SPLIT.get(k.split(".")[-2]) for k in want}
    assert {k.split(".")[-2] for k, s in split.items() if s is None} == {"attention_norm", "ffn_norm", "norm"}
    for r in range(2):
        shard = {k: v if split[k] is None else v.chunk(2, dim=split[k])[r].clone() for k, v in want.items()}
        torch.save(shard, d / f"consolidated.{r:02d}.pth")
    got = M.load_checkpoint(d).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
