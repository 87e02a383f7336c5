"""generate.py: the cached, batched, left-padded path against plain full recomputation, and the sampling rules."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import cpu_speed
import generate as G
import model as M


def tiny(**kw):
    args = M.ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                                   max_seq_len=64), **kw})
    return M.Transformer(args).init_weights(seed=1).eval()


PROMPTS = [[1, 5, 9, 13, 2, 7, 7], [1, 3], [1, 40, 41, 42, 43]]


def naive_greedy(m, prompt, n):
    """No cache, no padding: recompute the whole sequence for every token."""
    seq, logps = list(prompt), []
    for _ in range(n):
        logits = m(torch.tensor([seq]))[0][0, -1]
        t = int(logits.argmax())
        logps.append(float(F.log_softmax(logits, -1)[t]))
        seq.append(t)
    return seq[len(prompt):], logps


def test_cached_batched_greedy_equals_full_recomputation():
    m = tiny()
    with torch.no_grad():
        toks, logps = G.generate(m, PROMPTS, 12, temperature=0.0, eos_id=None, logprobs=True)
        for p, t, lp in zip(PROMPTS, toks, logps):
            ref_t, ref_lp = naive_greedy(m, p, 12)
            assert t == ref_t
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


def test_kv_cache_logits_equal_uncached_logits():
    m = tiny()
    seq = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        full = m(seq)[0]
        cache = G.KVCache(m, 2, 20)
        cols = torch.arange(20)
        first = m(seq[:, :8], mask=torch.ones(8, 8, dtype=torch.bool).tril()[None, None], cache=cache,
                  cache_pos=cols[:8], kv_len=8)[0]
        torch.testing.assert_close(first, full[:, :8], atol=1e-5, rtol=1e-4)
        for t in range(8, 20):
            step = m(seq[:, t:t + 1], positions=torch.full((2, 1), t), mask=torch.ones(1, 1, 1, t + 1, dtype=torch.bool),
                     cache=cache, cache_pos=cols[t:t + 1], kv_len=t + 1)[0]
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=1e-4)


def test_compiled_decode_matches_eager():
    m = tiny()
    eager = G.generate(m, PROMPTS, 6, temperature=0.0, eos_id=None)
    compiled = G.generate(m, PROMPTS, 6, temperature=0.0, eos_id=None, compile=True)
    assert eager == compiled


def test_num_samples_shares_prefill_and_matches_separate_rows():
    m = tiny()
    shared = G.generate(m, PROMPTS[:2], 5, temperature=0.0, eos_id=None, num_samples=3)
    single = G.generate(m, PROMPTS[:2], 5, temperature=0.0, eos_id=None)
    assert shared == [single[0]] * 3 + [single[1]] * 3


def test_stops_per_row_at_eos_and_includes_it():
    m = tiny()
    greedy = G.generate(m, PROMPTS, 10, temperature=0.0, eos_id=None)
    eos = greedy[0][3]  # pretend row 0's 4th token is EOS
    out = G.generate(m, PROMPTS, 10, temperature=0.0, eos_id=eos)
    assert out[0] == greedy[0][:greedy[0].index(eos) + 1]
    for o, g in zip(out, greedy):
        assert o == (g[:g.index(eos) + 1] if eos in g else g)


def test_top_p_never_leaves_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    s = G.sample_top_p(probs, 0.75, gen)
    # mass before token 0 = 0, before 1 = 0.5, before 2 = 0.8 > 0.75: the nucleus is {0, 1}
    assert set(s.tolist()) == {0, 1}
    # within the nucleus the renormalized odds are 5:3; 4000 draws, p(0)=0.625, sd 0.00765: +-0.04 is 5.23 sd, a
    # two-sided false-failure probability of 1.7e-7 for a random seed (seed 0 here: the draws are fixed)
    assert abs((s == 0).float().mean().item() - 0.625) < 0.04
    assert set(G.sample_top_p(probs[:50], 0.0, gen).tolist()) == {0}  # top_p 0 keeps only the top token


def test_exponential_race_draws_what_torch_multinomial_draws():
    """draw() against torch.multinomial(probs, 1): the same tokens bit for bit from the same seed, and the generator
    left in the same state, with one generator for the batch, one per row, zero-probability tokens (the nucleus) and
    the global generator; then its frequencies against the probabilities, independently of torch's sampler."""
    torch.manual_seed(0)
    for B, V in ((1, 7), (64, 61), (5, 32000)):
        probs = torch.softmax(3 * torch.randn(B, V), -1)
        probs[:, 1::3] = 0  # tokens outside a nucleus
        probs /= probs.sum(-1, keepdim=True)
        a, b = torch.Generator().manual_seed(B), torch.Generator().manual_seed(B)
        for _ in range(10):
            assert torch.equal(G.draw(probs, a), torch.multinomial(probs, 1, generator=b).squeeze(-1))
        assert torch.equal(a.get_state(), b.get_state())
        rows_a = [torch.Generator().manual_seed(100 + r) for r in range(B)]
        rows_b = [torch.Generator().manual_seed(100 + r) for r in range(B)]
        want = torch.cat([torch.multinomial(probs[r:r + 1], 1, generator=g)[:, 0] for r, g in enumerate(rows_b)])
        assert torch.equal(G.draw(probs, rows_a), want)
        assert all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(rows_a, rows_b))
    state = torch.get_rng_state()
    first = G.draw(probs, None)
    torch.set_rng_state(state)
    assert torch.equal(first, torch.multinomial(probs, 1).squeeze(-1))
    # frequencies: 200,000 draws from 5 tokens (seed 0); chi-square with 4 degrees of freedom, P(> 33.4) = 1e-6
    p = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03])
    n = 200_000
    counts = torch.bincount(G.draw(p.repeat(n, 1), torch.Generator().manual_seed(0)), minlength=5).double()
    assert ((counts - n * p) ** 2 / (n * p)).sum().item() < 33.4


def test_temperature_zero_is_deterministic_and_sampling_is_seeded():
    m = tiny()
    assert G.generate(m, PROMPTS, 8, temperature=0.0) == G.generate(m, PROMPTS, 8, temperature=0.0)
    a = G.generate(m, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = G.generate(m, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_recorded_logprobs_equal_recomputed_logprobs():
    """PPO's invariant: the log-probs recorded while sampling are the policy's log-probs of those tokens."""
    m = tiny()
    gen = torch.Generator().manual_seed(0)
    toks, logps = G.generate(m, PROMPTS, 9, temperature=0.8, top_p=1.0, eos_id=None, logprobs=True, generator=gen)
    with torch.no_grad():
        re = G.sequence_logprobs(m, PROMPTS, toks, temperature=0.8)
    for b, lp in enumerate(logps):
        torch.testing.assert_close(re[b, :len(lp)], torch.tensor(lp), atol=1e-4, rtol=1e-4)


def test_prompt_longer_than_context_is_rejected():
    m = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="context"):
        G.generate(m, [[1] * 16], 4)


def test_static_full_cache_step_equals_sliced_step():
    """The CUDA-graph step attends over the whole preallocated cache and masks what is not written yet (and the left
    padding); it must give the logits of the eager step, which attends over the first t+1 columns only."""
    m = tiny()
    B, P, S = 3, 5, 16
    pad_len = torch.tensor([0, 2, 4])
    real = torch.arange(S)[None, :] >= pad_len[:, None]  # (B, S)
    tokens = torch.randint(3, 61, (B, S))
    positions = (torch.arange(P)[None, :] - pad_len[:, None]).clamp(min=0)  # (B, P)
    # prefill the P prompt columns as generate does: pad queries attend to themselves only
    mask = torch.ones(P, P, dtype=torch.bool).tril()[None] & (real[:, None, :P] | torch.eye(P, dtype=torch.bool))
    with torch.no_grad():
        caches = [G.KVCache(m, B, S), G.KVCache(m, B, S)]
        for cache in caches:
            m.trunk(tokens[:, :P], positions=positions, mask=mask[:, None], cache=cache,
                    cache_pos=torch.arange(P), kv_len=P)
        for t in range(P, S - 1):
            col = torch.tensor([t])
            sliced = G._decode_step(m, tokens[:, t:t + 1], col, pad_len, real, caches[0], t + 1)
            full = G._decode_step(m, tokens[:, t:t + 1], col, pad_len, real, caches[1], None)
            torch.testing.assert_close(full, sliced, atol=1e-5, rtol=1e-5)


def test_greedy_tokens_do_not_depend_on_asking_for_logprobs():
    m = tiny()
    plain = G.generate(m, PROMPTS, 7, temperature=0.0, eos_id=None)
    toks, logps = G.generate(m, PROMPTS, 7, temperature=0.0, eos_id=None, logprobs=True)
    assert plain == toks and all(len(lp) == len(t) for lp, t in zip(logps, toks))


def test_zero_new_tokens_returns_empty_completions():
    m = tiny()
    assert G.generate(m, PROMPTS, 0, temperature=0.0) == [[], [], []]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_per_row_generators_make_a_row_independent_of_its_batch(top_p):
    """With one generator per row, a row samples the same tokens alone as in a batch of prompts of other lengths (other
    left padding, other rows drawing beside it) and in any position: PPO's rollouts under torchrun depend on this. The
    logits of a row alone and in a batch differ by float rounding only (~1e-6), which could flip a sampled token with a
    probability of that order per token; on these seeds none flips. One generator shared by the batch does not have
    this property (its draws are laid out by row position): with it, the same seed samples other tokens for a prompt
    alone than in the batch (every row here differs)."""
    m = tiny()
    seeds = [11, 12, 13]

    def gens(ss):  # fresh generators with these seeds, one per row
        return [torch.Generator().manual_seed(s) for s in ss]
    batch, logps = G.generate(m, PROMPTS, 10, temperature=1.0, top_p=top_p, eos_id=None, logprobs=True,
                              generator=gens(seeds))
    for b, p in enumerate(PROMPTS):
        alone, lp_alone = G.generate(m, [p], 10, temperature=1.0, top_p=top_p, eos_id=None, logprobs=True,
                                     generator=gens([seeds[b]]))
        assert alone[0] == batch[b]
        torch.testing.assert_close(torch.tensor(lp_alone[0]), torch.tensor(logps[b]), atol=1e-5, rtol=1e-5)
    rev = G.generate(m, PROMPTS[::-1], 10, temperature=1.0, top_p=top_p, eos_id=None, generator=gens(seeds[::-1]))
    assert rev == batch[::-1]  # the batch reordered: each row follows its own generator
    shared = G.generate(m, PROMPTS, 10, temperature=1.0, top_p=top_p, eos_id=None,
                        generator=torch.Generator().manual_seed(11))
    assert any(shared[b] != G.generate(m, [p], 10, temperature=1.0, top_p=top_p, eos_id=None,
                                       generator=torch.Generator().manual_seed(11))[0] for b, p in enumerate(PROMPTS))
    with pytest.raises(ValueError, match="one per completion"):
        G.generate(m, PROMPTS, 4, temperature=1.0, generator=gens(seeds[:2]))



def test_cpu_speed_is_speed_only(monkeypatch):
    """With cpu_speed's switch and sampler replaced by the plain path (contiguous weights, no packing, torch.multinomial),
    generate() samples the same tokens with the same log-probs to fp32 rounding: 6 rows, so the packing is on."""
    def run():
        return G.generate(tiny(), PROMPTS * 2, 10, temperature=1.0, top_p=0.9, eos_id=None, logprobs=True,
                          generator=torch.Generator().manual_seed(5))
    fast_toks, fast_lp = run()
    monkeypatch.setattr(cpu_speed, "fast_decode", lambda model, rows, compile: contextlib.nullcontext())
    monkeypatch.setattr(cpu_speed, "exponential_race",
                        lambda probs, g: torch.multinomial(probs, 1, generator=g).squeeze(-1))
    plain_toks, plain_lp = run()
    assert plain_toks == fast_toks
    torch.testing.assert_close(torch.tensor(plain_lp), torch.tensor(fast_lp), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_cpu_packed_weights_decode_like_plain_linears_and_are_undone(monkeypatch):
    """From PACK_MIN_ROWS rows on, a CPU decode multiplies by oneDNN's prepacked weights: the same greedy tokens as full
    recomputation without any cache or packing, log-probs equal to fp32 rounding, and afterwards (also after an error
    mid-decode) every Linear is a plain nn.Linear again."""
    m = tiny()
    prompts = PROMPTS * 2  # 6 rows >= PACK_MIN_ROWS
    linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert len(prompts) >= cpu_speed.PACK_MIN_ROWS and cpu_speed._packable(linears)
    seen = []
    hook = m.output.register_forward_pre_hook(lambda mod, args: seen.append("forward" in mod.__dict__))
    toks, logps = G.generate(m, prompts, 12, temperature=0.0, eos_id=None, logprobs=True)
    hook.remove()
    assert seen and all(seen)  # the head ran packed in the prefill and every decode step
    assert not any("forward" in mod.__dict__ for mod in m.modules())
    with torch.no_grad():
        for p, t, lp in zip(prompts, toks, logps):
            ref_t, ref_lp = naive_greedy(m, p, 12)
            assert t == ref_t
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(cpu_speed, "PACK_MIN_ROWS", 10 ** 9)  # the plain column-major path, same rows
    plain, plain_lp = G.generate(m, prompts, 12, temperature=0.0, eos_id=None, logprobs=True)
    assert plain == toks
    torch.testing.assert_close(torch.tensor(plain_lp), torch.tensor(logps), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(cpu_speed, "PACK_MIN_ROWS", 4)
    # the packed copies are kept between calls: a changed weight must be packed again, however it was changed
    with torch.no_grad():
        m.layers[0].feed_forward.w1.weight.add_(0.05)  # in place, seen by the version counter (an optimizer step)
        m.output.weight.data.mul_(1.5)  # in place through .data, which the version counter does not see
    toks, logps = G.generate(m, prompts, 12, temperature=0.0, eos_id=None, logprobs=True)
    with torch.no_grad():
        for p, t, lp in zip(prompts, toks, logps):
            ref_t, ref_lp = naive_greedy(m, p, 12)
            assert t == ref_t
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(cpu_speed, "PACK_MIN_ROWS", 4)

    def fail(mod, args):
        if len(seen) > 3:
            raise RuntimeError("stop")
        seen.append(1)
    seen.clear()
    hook = m.output.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="stop"):
        G.generate(m, prompts, 12, temperature=0.0, eos_id=None)
    hook.remove()
    assert not any("forward" in mod.__dict__ for mod in m.modules())


@pytest.mark.parametrize("kind", ["greedy", "shared generator", "shared generator, top-p", "per-row generators"])
def test_dropping_finished_rows_changes_no_token(kind, monkeypatch):
    """generate() copies the rows still decoding into a smaller cache once enough rows have finished (step 4). The
    tokens must be exactly those of the run that keeps every row (COMPACT_AT = 0), for greedy decoding and for every
    kind of generator, and the recorded log-probs equal to float rounding. The EOS is the model's most frequent greedy
    token and the output layer is sharpened, so rows end at many different steps and the cache shrinks several times
    (counted: a test that never compacted would prove nothing)."""
    m = tiny()
    with torch.no_grad():
        m.output.weight.mul_(4.0)  # peaked distributions: sampled rows repeat tokens, the EOS among them
    prompts = [[1, (7 * i) % 60 + 1, (11 * i) % 60 + 1][: 1 + i % 3] for i in range(16)]
    greedy = G.generate(m, prompts, 24, temperature=0.0, eos_id=None)
    eos = max(range(61), key=lambda t: sum(g.count(t) for g in greedy))
    kw = dict(temperature=0.0) if kind == "greedy" else dict(temperature=1.0, top_p=0.8 if "top-p" in kind else 1.0)

    def run(compact_at):
        monkeypatch.setattr(G, "COMPACT_AT", compact_at)
        gen = ([torch.Generator().manual_seed(s) for s in range(32)] if kind == "per-row generators"
               else torch.Generator().manual_seed(5))
        return G.generate(m, prompts, 24, eos_id=eos, num_samples=2, logprobs=True, generator=gen, **kw)

    calls = []
    select = G.KVCache.select_rows
    monkeypatch.setattr(G.KVCache, "select_rows", lambda self, rows: calls.append(len(rows)) or select(self, rows))
    (full, lp_full), compacted = run(0.0), {}
    assert not calls  # COMPACT_AT = 0: never
    for at in (0.75, 1.0):
        calls.clear()
        toks, lps = run(at)
        assert toks == full
        for a, b in zip(lps, lp_full):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
        compacted[at] = list(calls)
    lengths = sorted(len(t) for t in full)
    assert lengths[0] < lengths[-1] and sum(t[-1] == eos for t in full) >= 8, lengths  # rows end at different steps
    assert len(compacted[1.0]) >= 3 and compacted[1.0] == sorted(compacted[1.0], reverse=True), compacted
    assert len(compacted[0.75]) >= 1


def test_cached_prompts_prefill_only_new_tokens_and_change_no_token(monkeypatch):
    """A chat's next turn through CachedPrompt: the prompt grows by the reply and a new message; one row's prompt also
    changes in front (an early turn dropped) and one gets shorter. Greedy tokens and log-probs equal a fresh prefill's,
    and the prefill computes only the columns after the shared prefixes."""
    m = tiny(max_seq_len=128)
    rows = [list(p) for p in PROMPTS]
    cached = [G.CachedPrompt() for _ in rows]
    widths = []
    trunk = m.trunk

    def spy(tokens, *a, **k):
        if tokens.size(1) > 1:  # the prefill (decode steps pass one column)
            widths.append(tokens.size(1))
        return trunk(tokens, *a, **k)
    monkeypatch.setattr(m, "trunk", spy)
    for turn in range(4):
        widths.clear()
        fresh, fresh_lp = G.generate(m, rows, 6, temperature=0.0, eos_id=None, logprobs=True)
        assert widths == [max(len(r) for r in rows)]
        widths.clear()
        got, got_lp = G.generate(m, rows, 6, temperature=0.0, eos_id=None, logprobs=True, prefix=cached)
        assert got == fresh
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(fresh_lp), atol=1e-5, rtol=1e-5)
        reuse = [len(c.tokens) for c in cached]  # each row's last prompt, now cached
        if turn > 0:  # only what the rows added since the last turn was computed
            assert widths == [max(len(r) - n for r, n in zip(rows, new_from))]
            assert widths[0] < max(len(r) for r in rows)
        assert reuse == [len(r) for r in rows]
        # the next turn: every row appends its reply and a new message
        rows = [r + g + [3, 4 + turn] for r, g in zip(rows, got)]
        new_from = [len(r) - len(g) - 2 for r, g in zip(rows, got)]  # the shared prefix: the last prompt
        if turn == 1:  # row 2 drops its first tokens after BOS (an early turn dropped to fit the context)
            rows[2] = rows[2][:1] + rows[2][3:]
            new_from[2] = 1
        if turn == 2:  # row 1 restarts short: a different conversation, nothing to reuse but BOS
            rows[1] = [1, 50, 51]
            new_from[1] = 1
