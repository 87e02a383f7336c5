"""Throughput: decode tokens/s and training tokens/s + MFU, side by side with Hugging Face's Llama on the same weights.

  python bench.py                                  # decode + train, 15M preset, this machine's default device
  python bench.py --what decode --batches 1 16     # decode tokens/s at batch 1 and 16, eager and compiled
  python bench.py --what train --model 110M --device cuda --dtype bfloat16 --compile
Every figure is the median of --repeats timed runs after a warm-up; ratios are taken within one run, so the noise of
a shared machine cancels as far as it can. Figures go to BENCHMARKS.md by hand, with the machine, command and date.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

import common
import generate as G
import model as M


@dataclass
class BenchConfig:
    what: str = "all"  # decode, train or all
    model: str = "15M"  # a preset of model.py
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    batches: list[int] = field(default_factory=lambda: [1, 16])  # decode batch sizes
    new_tokens: int = 128  # decode: tokens generated per row
    train_batch: int = 8  # train: sequences per step
    train_seq: int = 256  # train: tokens per sequence
    train_steps: int = 5  # train: timed steps per repeat
    repeats: int = 3  # timed repeats; the median is reported
    compile: bool = True  # also measure the torch.compile variants
    hf: bool = True  # also measure Hugging Face's LlamaForCausalLM on the same weights (when installed)
    seed: int = 0


def _median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up: allocations, compilation
    times = []
    for _ in range(repeats):
        common.synchronize(device)
        t0 = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hf_model(model, device, dtype):
    try:
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        M.export_hf(model, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    return hf.to(device=device, dtype=dtype if dtype != torch.float32 else torch.float32).eval()


def bench_decode(cfg, model, device, dtype, hf):
    rows = []
    for bs in cfg.batches:
        prompts = [[1]] * bs  # BOS only: the figure is pure decode speed
        for name, kw in [("nanollama2 eager", {}), ("nanollama2 compiled", {"compile": True})]:
            if kw and not cfg.compile:
                continue
            fn = lambda: G.generate(model, prompts, cfg.new_tokens, temperature=0.0, eos_id=None, **kw)  # noqa: E731
            rows.append((name, bs, bs * cfg.new_tokens / _median_time(fn, cfg.repeats, device)))
        if hf is not None:
            ids = torch.ones((bs, 1), dtype=torch.long, device=device)

            def hf_fn():
                with torch.no_grad():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.new_tokens,
                                min_new_tokens=cfg.new_tokens, do_sample=False, pad_token_id=0)
            rows.append(("HF generate", bs, bs * cfg.new_tokens / _median_time(hf_fn, cfg.repeats, device)))
    return rows


def _train_step_fn(net, opt, tokens, device, dtype, is_hf):
    ctx_dtype = dtype

    def step():
        for _ in range(1):
            with common.autocast(device, ctx_dtype):
                if is_hf:
                    loss = net(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts labels itself
                else:
                    loss = net(tokens[:, :-1], tokens[:, 1:])[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def bench_train(cfg, args, device, dtype):
    rows = []
    peak, peak_name = common.peak_flops(device, dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, args.vocab_size, (cfg.train_batch, cfg.train_seq + 1), generator=g).to(device)
    ntok = cfg.train_batch * cfg.train_seq
    variants = [("nanollama2 eager", False, False)]
    if cfg.compile:
        variants.append(("nanollama2 compiled", True, False))
    if cfg.hf:
        variants.append(("HF LlamaForCausalLM", False, True))
    base = M.Transformer(args).init_weights(seed=cfg.seed)
    for name, comp, is_hf in variants:
        if is_hf:
            net = _hf_model(base, device, torch.float32)
            if net is None:
                continue
            net.train()
        else:
            net = M.Transformer(args).to(device)
            net.load_state_dict(base.state_dict())
        flops_tok = base.flops_per_token(cfg.train_seq)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                                fused=device.type == "cuda")
        run = net if not comp else torch.compile(net)
        step = _train_step_fn(run, opt, tokens, device, dtype, is_hf)

        def steps():
            for _ in range(cfg.train_steps):
                step()
        dt = _median_time(steps, cfg.repeats, device) / cfg.train_steps
        tps = ntok / dt
        mfu = tps * flops_tok / peak if peak else None
        rows.append((name, tps, mfu))
        del net, opt, run
    return rows, peak_name


def main(cfg: BenchConfig):
    torch.manual_seed(cfg.seed)
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(cfg.dtype, device)
    args = M.preset(cfg.model)
    print(f"# bench: model {cfg.model} ({M.Transformer(args).num_params() / 1e6:.1f}M params, vocab {args.vocab_size}), "
          f"device {device}, dtype {str(dtype).replace('torch.', '')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if cfg.what in ("decode", "all"):
        model = M.Transformer(args).init_weights(seed=cfg.seed).to(device=device, dtype=dtype).eval()
        hf = _hf_model(model.float(), device, dtype) if cfg.hf else None
        model = model.to(dtype)
        rows = bench_decode(cfg, model, device, dtype, hf)
        print(f"\n## decode ({cfg.new_tokens} new tokens per row, greedy, median of {cfg.repeats})")
        print("| implementation | batch | tokens/s | vs HF same batch | vs own batch 1 |")
        print("|---|---|---|---|---|")
        for name, bs, tps in rows:
            hf_same = next((t for n, b, t in rows if n == "HF generate" and b == bs), None)
            own1 = next((t for n, b, t in rows if n == name and b == 1), None)
            print(f"| {name} | {bs} | {tps:,.0f} | {f'{tps / hf_same:.2f}x' if hf_same else '-'} | "
                  f"{f'{tps / own1:.2f}x' if own1 else '-'} |")
        del model, hf
    if cfg.what in ("train", "all"):
        rows, peak_name = bench_train(cfg, args, device, dtype)
        print(f"\n## train (batch {cfg.train_batch} x {cfg.train_seq}, fwd+bwd+AdamW, median of {cfg.repeats}; "
              f"peak: {peak_name})")
        print("| implementation | tokens/s | vs HF | MFU |")
        print("|---|---|---|---|")
        hf_tps = next((t for n, t, _ in rows if n.startswith("HF")), None)
        for name, tps, mfu in rows:
            print(f"| {name} | {tps:,.0f} | {f'{tps / hf_tps:.2f}x' if hf_tps else '-'} | "
                  f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} |")


if __name__ == "__main__":
    main(common.parse_config(BenchConfig, description=__doc__))
