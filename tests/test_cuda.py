"""The GPU paths: bf16 autocast training with torch.compile, the cached and compiled decode on CUDA. Skipped on machines
without CUDA (CI is CPU-only; these run when a GPU is lent, see RESULTS.md)."""
import pytest
import torch

import common
import generate as G
import model as M

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEV = torch.device("cuda")


def tiny(**kw):
    args = M.ModelArgs(**{**dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                                   max_seq_len=128), **kw})
    return M.Transformer(args).init_weights(seed=0).to(DEV).eval()


def test_cuda_cached_decoding_equals_full_recomputation_fp32():
    m = tiny()
    prompts = [[1, 5, 9, 13, 2], [1, 3], [1, 40, 41, 42]]
    out = G.generate(m, prompts, 10, temperature=0.0, eos_id=None)
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(10):
            with torch.no_grad():
                seq.append(int(m(torch.tensor([seq], device=DEV))[0][0, -1].argmax()))
        assert o == seq[len(p):]


def test_cuda_compiled_decode_matches_eager_bf16():
    m = tiny().to(torch.bfloat16)
    prompts = [[1, 5, 9, 13, 2], [1, 3]]
    eager = G.generate(m, prompts, 12, temperature=0.0, eos_id=None)
    compiled = G.generate(m, prompts, 12, temperature=0.0, eos_id=None, compile=True)
    # bf16 kernels may differ in the last bit between eager and compiled: allow the first 8 tokens to agree
    assert all(e[:8] == c[:8] for e, c in zip(eager, compiled))


def test_cuda_bf16_compiled_training_step_lowers_loss():
    m = tiny().train()
    net = torch.compile(m)
    opt = common.make_optimizer(m, 3e-3)
    x = torch.randint(0, 256, (8, 65), device=DEV)
    losses = []
    for _ in range(20):
        with common.autocast(DEV, torch.bfloat16):
            loss = net(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert common.peak_flops(DEV)[0] is not None, "unknown GPU: add its peak to common._GPU_PEAKS"
