"""model.py against independent references: hand-written attention, explicit K/V repetition, relative-position algebra,
Meta's parameter counts, checkpoint round trips, and (when installed) Hugging Face's LlamaForCausalLM."""
import io
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import model as M

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64)


def tiny(**kw):
    torch.manual_seed(0)
    return M.Transformer(M.ModelArgs(**{**TINY, **kw})).init_weights(seed=0).eval()


@pytest.mark.parametrize("name,count", [("7B", 6_738_415_616), ("13B", 13_015_864_320), ("70B", 68_976_648_192)])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        m = M.Transformer(M.preset(name))
    assert m.num_params() == count
    assert m.args.ffn_hidden == {"7B": 11008, "13B": 13824, "70B": 28672}[name]


def test_rmsnorm_matches_formula():
    n = M.RMSNorm(8, 1e-5)
    n.weight.data = torch.arange(8.0)
    x = torch.randn(3, 8)
    ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * torch.arange(8.0)
    torch.testing.assert_close(n(x), ref)


def test_rope_matches_complex_multiply_and_is_relative():
    D, T = 16, 10
    cos, sin = M.rope_tables(D, 64, 10000.0)
    x = torch.randn(1, T, 2, D)
    # Meta's formulation: view adjacent pairs as complex numbers and multiply by e^(i * pos * theta^(-2i/D))
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(T).float(), freqs)
    xc = torch.view_as_complex(x.reshape(1, T, 2, D // 2, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None]).flatten(-2)
    got = M.apply_rope(x, cos[:T][None, :, None], sin[:T][None, :, None])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # q.k depends only on m - n
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=gen), torch.randn(D, generator=gen)

    def rot(v, pos):
        return M.apply_rope(v.view(1, 1, 1, D), cos[pos].view(1, 1, 1, -1), sin[pos].view(1, 1, 1, -1)).flatten()

    base = rot(q, 7) @ rot(k, 3)
    for s in (1, 5, 20):
        assert torch.allclose(rot(q, 7 + s) @ rot(k, 3 + s), base, atol=1e-4)
    assert not torch.allclose(rot(q, 8) @ rot(k, 3), base, atol=1e-3)  # and it does depend on the distance


def test_rope_complex_path_gives_the_real_forms_bits_forward_and_backward():
    """Eager CPU calls take RoPE as one complex multiply (speed-up); it must be apply_rope's arithmetic exactly, so that
    a run's figures do not depend on which path computed them. fp32 and bf16, packed-row positions."""
    D = 32
    cos, sin = M.rope_tables(D, 512, 10000.0)
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 512, (3, 50), generator=gen)
    c, s = cos[pos][:, :, None, :], sin[pos][:, :, None, :]  # (B, T, 1, D/2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 50, 4, D, generator=gen).to(dtype).requires_grad_()
        g = torch.randn(3, 50, 4, D, generator=gen).to(dtype)
        real, cplx = M.apply_rope(x, c, s), M.rope_complex(x, c, s)
        assert cplx.dtype == x.dtype and torch.equal(real, cplx), dtype
        assert torch.equal(torch.autograd.grad(real, x, g)[0], torch.autograd.grad(cplx, x, g)[0]), dtype
    assert M.cpu_eager(x)  # this CPU takes the complex form


@pytest.mark.parametrize("kv", [4, 2])
def test_cpu_speedups_equal_the_plain_path(kv, monkeypatch):
    """The three CPU rewrites together (complex RoPE, chunked causal attention, the additive mask) against the plain
    path (each switched off where it is chosen): the same scores and gradients for a packed row's mask."""
    m = tiny(n_kv_heads=kv, head="scalar")
    seg = torch.tensor([0] * 10 + [1] * 20 + [2] * 7)  # three documents in one row
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    mask = ((seg[:, None] == seg[None, :]) & causal)[None, None].expand(2, 1, 37, 37)  # (B, 1, T, T)
    tok = torch.randint(0, 97, (2, 37))
    results = []
    for fast in (True, False):
        if fast:
            monkeypatch.setattr(M, "CAUSAL_CHUNK", 8)  # five chunks
        else:
            monkeypatch.setattr(M, "cpu_eager", lambda x: False)
            monkeypatch.setattr(M, "CAUSAL_CHUNK", 1000)
            monkeypatch.setattr(M, "cpu_additive_mask", lambda mask, h: mask)
        m.zero_grad()
        out = m(tok, mask=mask)[0]
        out.square().sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], atol=1e-5, rtol=1e-4, msg=k)


def _plain_attention_block(attn, x, cos, sin):
    """Textbook causal multi-head attention with explicit softmax, no SDPA."""
    B, T, C = x.shape
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = M.apply_rope(attn.wq(x).view(B, T, H, D), cos, sin).transpose(1, 2)
    k = M.apply_rope(attn.wk(x).view(B, T, K, D), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, T, K, D).transpose(1, 2)
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    return attn.wo((att @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_equals_plain_attention(kv):
    m = tiny(n_kv_heads=kv)
    x = torch.randn(2, 9, 64)
    cos, sin = m.rope_cos[:9][None, :, None], m.rope_sin[:9][None, :, None]
    attn = m.layers[0].attention
    torch.testing.assert_close(attn(x, cos, sin, None), _plain_attention_block(attn, x, cos, sin), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv", [4, 2])
def test_chunked_causal_attention_equals_one_block(kv, monkeypatch):
    """Long CPU sequences attend in query chunks over the keys up to each chunk's end: the same outputs and
    gradients as one call, for plain causal attention and for a packed row's block-diagonal mask, and against the
    textbook formula."""
    m = tiny(n_kv_heads=kv)
    attn = m.layers[0].attention
    x = torch.randn(2, 37, 64, requires_grad=True)
    cos, sin = m.rope_cos[:37][None, :, None], m.rope_sin[:37][None, :, None]
    seg = torch.tensor([0] * 10 + [1] * 20 + [2] * 7)  # three dialogs in one row
    block = ((seg[:, None] == seg[None, :]) & torch.ones(37, 37, dtype=torch.bool).tril())[None, None].expand(2, 1, 37,
                                                                                                             37)
    results = {}
    for chunk in (1000, 8):  # one block (37 < 2 * 1000), then five chunks of 8 rows
        monkeypatch.setattr(M, "CAUSAL_CHUNK", chunk)
        for name, mask in (("causal", None), ("block", block)):
            x.grad = None
            m.zero_grad()
            out = attn(x, cos, sin, mask)
            out.square().sum().backward()
            results[chunk, name] = (out.detach(), x.grad.clone(), attn.wq.weight.grad.clone())
    for name in ("causal", "block"):
        for a, b in zip(results[8, name], results[1000, name]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[8, "causal"][0], _plain_attention_block(attn, x, cos, sin), atol=1e-5,
                               rtol=1e-4)
    assert (results[8, "block"][0] - results[8, "causal"][0]).abs().max() > 1e-3  # the mask matters


def test_gqa_equals_mha_with_repeated_kv_weights():
    g = tiny(n_kv_heads=2)
    mha = M.Transformer(M.ModelArgs(**TINY)).eval()
    sd = g.state_dict()
    D, rep = g.args.head_dim, g.args.n_heads // 2
    for k in list(sd):
        if k.endswith(("wk.weight", "wv.weight")):  # (K*D, C) -> (H*D, C): each KV head serves its group of queries
            sd[k] = sd[k].view(2, D, -1).repeat_interleave(rep, 0).reshape(g.args.n_heads * D, -1)
    mha.load_state_dict(sd)
    tok = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(g(tok)[0], mha(tok)[0], atol=1e-5, rtol=1e-4)


def test_loss_ignores_masked_targets():
    m = tiny()
    tok = torch.randint(0, 97, (2, 8))
    tgt = torch.randint(0, 97, (2, 8))
    tgt[:, :3] = -100
    logits, loss = m(tok, tgt)
    ref = F.cross_entropy(logits[:, 3:].reshape(-1, 97), tgt[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_loss_path_under_bf16_autocast():
    """With targets the logits come back detached in the compute dtype; the loss is still taken over fp32 logits and
    equals the cross-entropy of the no-targets call's fp32 logits, and its gradient reaches the weights."""
    m = tiny()
    tok, tgt = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(tok, tgt)
        full, none = m(tok)
    assert none is None and full.dtype == torch.float32 and full.requires_grad
    assert logits.dtype == torch.bfloat16 and not logits.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(full.reshape(-1, 97), tgt.reshape(-1)))
    loss.backward()
    assert m.output.weight.grad is not None and m.output.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    """--grad-checkpoint recomputes each block's activations in the backward: the loss and every gradient must be
    the same as without (issue 7)."""
    m = tiny(n_kv_heads=2)
    tok, tgt = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    grads, saved = [], []
    for ckpt in (False, True):
        m.zero_grad(set_to_none=True)
        m.grad_checkpoint = ckpt
        n = [0]

        def count(t, n=n):  # every tensor autograd keeps for the backward passes through here
            n[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = m.train()(tok, tgt)[1]
        loss.backward()
        saved.append(n[0])
        grads.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    assert saved[1] < saved[0] / 2  # checkpointing really is on: the blocks' activations were not kept (97 -> 19)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for k in grads[0][1]:
        torch.testing.assert_close(grads[0][1][k], grads[1][1][k], rtol=1e-6, atol=1e-7, msg=k)


def test_scalar_head_shapes():
    m = tiny(head="scalar")
    out, loss = m(torch.randint(0, 97, (3, 5)))
    assert out.shape == (3, 5) and loss is None and not hasattr(m, "output")


def test_meta_layout_round_trip(tmp_path):
    m = tiny(n_kv_heads=2)
    M.save_checkpoint(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck/params.json").read_text())["n_kv_heads"] == 2
    back = M.load_checkpoint(tmp_path / "ck").eval()
    tok = torch.randint(0, 97, (2, 10))
    assert torch.equal(m(tok)[0], back(tok)[0])


def test_meta_sharded_checkpoint_merges(tmp_path):
    """Meta's 13B/70B come as model-parallel shards: split ours the fairscale way, load, same logits."""
    m = tiny(n_kv_heads=2)
    d = tmp_path / "sharded"
    d.mkdir()
    sd = m.state_dict()
    for r in range(2):
        part = {}
        for k, v in sd.items():
            dim = M._shard_dim(k)
            part[k] = v if dim is None else v.chunk(2, dim=dim)[r].clone()
        torch.save(part, d / f"consolidated.{r:02d}.pth")
    params = {k: v for k, v in json.loads(json.dumps(m.args.__dict__)).items() if k != "head"}
    params["vocab_size"] = -1  # as Meta writes it
    (d / "params.json").write_text(json.dumps(params))
    back = M.load_checkpoint(d).eval()
    tok = torch.randint(0, 97, (1, 7))
    assert torch.equal(m(tok)[0], back(tok)[0])


def test_hf_export_round_trip_and_permutation(tmp_path):
    m = tiny(n_kv_heads=2)
    w = torch.randn(4 * 16, 8)
    assert torch.equal(M._hf_unpermute(M._hf_permute(w, 4), 4), w)
    assert not torch.equal(M._hf_permute(w, 4), w)
    M.export_hf(m, tmp_path / "hf")
    back = M.load_checkpoint(tmp_path / "hf").eval()
    tok = torch.randint(0, 97, (2, 10))
    assert torch.equal(m(tok)[0], back(tok)[0])


def test_matches_huggingface_llama(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: HF comparison skipped")
    m = tiny(n_kv_heads=2, vocab_size=128)
    M.export_hf(m, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    tok = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = hf(tok).logits
    torch.testing.assert_close(m(tok)[0], ref, atol=1e-4, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['EVIL_FLAG'], 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    flag = tmp_path / "flag"
    monkeypatch.setenv("EVIL_FLAG", str(flag))
    m = tiny()
    d = tmp_path / "evil"
    M.save_checkpoint(m, d)
    sd = dict(m.state_dict())
    sd["tok_embeddings.weight"] = _Evil()
    buf = io.BytesIO()
    torch.save(sd, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    (d / "consolidated.00.pth").write_bytes(buf.getvalue())
    with pytest.raises(M.CheckpointError, match="refused"):
        M.load_checkpoint(d)
    assert not flag.exists()


def test_shape_mismatch_is_a_clear_error(tmp_path):
    m = tiny()
    M.save_checkpoint(m, tmp_path / "ck")
    p = json.loads((tmp_path / "ck/params.json").read_text())
    p["dim"] = 128
    (tmp_path / "ck/params.json").write_text(json.dumps(p))
    with pytest.raises(M.CheckpointError, match="shape"):
        M.load_checkpoint(tmp_path / "ck")
    with pytest.raises(M.CheckpointError, match="not found"):
        M.load_checkpoint(tmp_path / "nowhere")
