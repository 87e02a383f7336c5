"""Multi-process tests on the CPU: launch a script under torchrun (2 processes, gloo), and the tiny checkpoints the
stage scripts start from (a chat model, two reward models), built once per test module.

Also a torchrun entry point of its own for checks that need code, not a stage script, inside the processes:
  python -m torch.distributed.run --nproc_per_node=2 tests/dist_util.py generate OUT.json
  python -m torch.distributed.run --nproc_per_node=2 tests/dist_util.py sgd_step OUT.pt
  python -m torch.distributed.run --nproc_per_node=2 tests/dist_util.py pretrain OUT.json PRETRAIN_FLAGS...
"""
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script by torchrun: the flat top-level modules must import
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    """A port nobody listens on now, for torchrun's rendezvous (a fixed one collides with a parallel test run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, cwd, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 script args...` on the CPU (gloo), one thread per process (the test models are tiny,
    and the machine may have two cores for both processes). Returns the finished process: check returncode."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


# ---- tiny checkpoints: what --init-from, --rm-helpful, --rm-safety and --sft expect ----------------------------------
def tiny_args(vocab: int, **kw):
    """~0.15M parameters. max_seq_len 512: sft.py packs rows of 512 tokens by default (rejection sampling calls it)."""
    import model as M
    return M.ModelArgs(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": vocab,
                          "multiple_of": 16, "max_seq_len": 512, **kw})


def train_small_tokenizer(path):
    """A 400-piece BPE tokenizer that knows the chat tags, trained in about a second on a slice of the world."""
    from world import World
    from tokenizer import B_INST, E_INST, train_tokenizer
    world = World(seed=0)
    chats = [" ".join(f"{B_INST} {u['content']} {E_INST} {a['content']}" for u, a in zip(d[::2], d[1::2]))
             for d in world.sft_dialogs("train", 300, seed=1)]
    return train_tokenizer(world.pretrain_documents(150_000) + chats, 400, path)


def ends_its_replies(model, eos_id: int, p_eos: float = 0.3):
    """Make a random model end its replies, as a chat model does: EOS with probability ~p_eos at every step, so most
    8-token samples finish (rejection sampling keeps only finished replies). Every token embedding gets one constant
    coordinate (4.0 in dim 0) that the residual stream carries to the final norm (the random layers add ~0.02 to it),
    and only EOS's output row reads it: the EOS logit is ~the same at every position, the others stay ~0."""
    import math
    import torch
    V, C = model.args.vocab_size, model.args.dim
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 4.0
        model.output.weight[:, 0] = 0.0
        # after the final RMSNorm the constant coordinate is ~sqrt(C); EOS logit L with e^L / (e^L + V - 1) = p_eos
        model.output.weight[eos_id, 0] = math.log(p_eos * (V - 1) / (1 - p_eos)) / math.sqrt(C)
    return model


def tiny_stack(root: Path) -> dict:
    """root/{chat, rm_helpful, rm_safety}: random tiny models with the tokenizer beside each, as the stages write them.
    The chat model plays the SFT model (--init-from, --sft); the reward models are its trunk with a scalar head."""
    import model as M
    import reward
    tok = train_small_tokenizer(root / "tokenizer.model")
    chat = ends_its_replies(M.Transformer(tiny_args(tok.n_words)).init_weights(seed=0), tok.eos_id)
    paths = {"chat": root / "chat", "rm_helpful": root / "rm_helpful", "rm_safety": root / "rm_safety"}
    M.save_checkpoint(chat, paths["chat"], tok.model_path)
    for seed, name in ((1, "rm_helpful"), (2, "rm_safety")):
        M.save_checkpoint(reward.reward_model_from(chat, seed=seed), paths[name], tok.model_path)
    return {**paths, "tok": tok}


# ---- checks that run inside the torchrun processes -----------------------------------------------------------------
def _check_generate(out_path: str):
    """FSDP-shard a tiny model, generate on common.consolidated_copy, write what rank 0 and rank 1 saw.

    Each rank decodes a different number of tokens (6 and 10): a collective per token would hang here. After the
    copy, the FSDP model still trains (a forward + backward), and its logits equal the copy's."""
    import torch
    import common
    import model as M
    from generate import generate
    dist = common.setup_distributed("cpu")
    net = common.wrap_model(M.Transformer(tiny_args(40, max_seq_len=64)).init_weights(seed=0), dist, fsdp=True)
    shards = {k: (tuple(p.to_local().shape), tuple(p.shape)) for k, p in net.named_parameters()}
    full = common.consolidated_copy(net)
    plain = all(type(p) is torch.nn.Parameter for p in full.parameters())
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    replies = generate(full, prompts, 6 + 4 * dist.rank, temperature=1.0, top_p=1.0, eos_id=None,
                       generator=torch.Generator().manual_seed(1))
    x = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        same_logits = torch.allclose(net(x)[0], full(x)[0], atol=1e-6)
    net.train()
    net(x, x)[1].backward()  # FSDP after the copy: forward, backward, reduce-scatter as ever
    rec = {"rank": dist.rank, "replies": replies, "shards": shards, "plain": plain, "same_logits": same_logits,
           "copy_is_not_net": full is not net}
    Path(f"{out_path}.{dist.rank}").write_text(json.dumps(rec))
    # Free the FSDP model (its mesh holds the process group) while the interpreter is whole: left to interpreter
    # shutdown, gloo's threads can drop tensors that need the GIL then, and the process aborts ("terminate called
    # without an active exception": both ranks, once in CI; not reproduced in 55 runs here, idle or loaded).
    del net, full
    gc.collect()
    common.cleanup_distributed(dist)


def sgd_batch():
    """The global batch of the sgd_step check: 4 rows of 12 tokens (every token a target: equal counts per rank)."""
    import torch
    x = torch.randint(0, 40, (4, 13), generator=torch.Generator().manual_seed(5))
    return x[:, :-1], x[:, 1:]


def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 holds DTensors, one shard per rank


def sgd_step(raw, net, dist) -> tuple:
    """One plain SGD step (lr 1, no momentum, clipping off) of `net` (raw as common.wrap_model wrapped it) on this
    rank's rows of sgd_batch, through common.optimizer_step. Returns (the gradient norm it reports, the full weights
    after the step). Adam with clipping would hide a wrong global scale of the gradient (twice the gradient, the same
    step); plain SGD moves each weight by exactly the gradient, so summed instead of averaged gradients show."""
    import torch
    import common
    x, y = sgd_batch()
    rows = slice(dist.rank, None, dist.world_size)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net(x[rows], y[rows])[1].backward()
    norm = common.optimizer_step(opt, None, net, grad_clip=1e9)
    return full_tensor(norm).item(), {k: full_tensor(v).detach().clone() for k, v in raw.state_dict().items()}


def _check_sgd_step(out_path: str):
    """sgd_step under DDP and under FSDP2, each from the same seed-0 tiny model; rank 0 writes {mode: (norm, weights)}
    for the test to compare with one process on the whole batch."""
    import torch
    import common
    import model as M
    dist = common.setup_distributed("cpu")
    rec = {}
    for mode in ("ddp", "fsdp"):
        raw = M.Transformer(tiny_args(40, max_seq_len=64)).init_weights(seed=0)
        rec[mode] = sgd_step(raw, common.wrap_model(raw, dist, fsdp=mode == "fsdp"), dist)
        del raw
        gc.collect()
    if dist.rank == 0:
        torch.save(rec, out_path)
    common.cleanup_distributed(dist)

def recording_grad_norms(common_module) -> list:
    """Replace common.optimizer_step by one that also appends each step's gradient norm (before clipping) to the
    returned list. The stages call it as common.optimizer_step, so the stage records its norms unchanged."""
    norms, step = [], common_module.optimizer_step

    def recorded(*args, **kw):
        norm = step(*args, **kw)
        norms.append(full_tensor(norm).item())
        return norm
    common_module.optimizer_step = recorded
    return norms


def _pretrain(out_path: str, *flags):
    """pretrain.py with these flags (what its __main__ runs), its gradient norms written by rank 0 to out_path."""
    import common
    import pretrain
    norms = recording_grad_norms(common)
    pretrain.main(common.parse_config(pretrain.PretrainConfig, list(flags)))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps(norms))

if __name__ == "__main__":
    {"generate": _check_generate, "sgd_step": _check_sgd_step, "pretrain": _pretrain}[sys.argv[1]](*sys.argv[2:])
