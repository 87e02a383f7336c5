"""Throughput: decode tokens/s and training tokens/s + MFU, side by side with Hugging Face's Llama on the same weights.

  python bench.py                                  # decode + train, 15M preset, this machine's default device
  python bench.py --what decode --batches 1 16     # decode tokens/s at batch 1 and 16, eager and compiled
  python bench.py --what train --model 110M --device cuda --dtype bfloat16 --json out/bench.json
Every figure is the median of --repeats timed runs after a warm-up (which also compiles); ratios are taken within one
run, so the noise of a shared machine cancels as far as it can. Figures go to BENCHMARKS.md by hand, with the machine,
command and date.

What is compared, and why it is a fair comparison:
  1. Decode: generate() (greedy, no EOS, one BOS prompt per row: pure decode speed) against transformers' generate()
     with the same weights (model.export_hf), the same dtype and greedy decoding of the same number of tokens.
  2. Train: one step = forward, cross-entropy over fp32 logits, backward, AdamW (common.make_optimizer, the settings
     pretrain.py uses) for both models. Hugging Face gets shift_labels, so both compute the loss over the same
     256 targets per row (its default shift would drop the last one); the first step's losses are printed side by side.
     Weights are fp32 in both; --dtype bfloat16 runs both under the same autocast.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

import common
import generate as G
import model as M


@dataclass
class BenchConfig:
    what: str = "all"  # decode, train or all
    model: str = "15M"  # a preset of model.py (15M, 110M, ...)
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU. Decode: the weights' dtype; train: the autocast dtype
    threads: int = 0  # CPU: torch.set_num_threads; 0 keeps torch's default (one per core)
    batches: list[int] = field(default_factory=lambda: [1, 16])  # decode batch sizes
    new_tokens: int = 128  # decode: tokens generated per row
    train_batch: int = 8  # train: sequences per step
    train_seq: int = 256  # train: tokens per sequence
    train_steps: int = 5  # train: timed steps per repeat
    repeats: int = 3  # timed repeats; the median is reported
    compile: bool = True  # also measure the torch.compile variants
    hf: bool = True  # also measure Hugging Face's LlamaForCausalLM on the same weights (when installed)
    json: Optional[str] = None  # also write the rows, machine and config to this JSON file
    seed: int = 0


def _median_times(fns: dict, repeats: int, device) -> dict:
    """Median seconds of each fn. The variants take turns (A B C, A B C, ...) rather than running one after the other,
    so a slow minute of a shared machine slows them all alike instead of whichever ran during it."""
    for fn in fns.values():
        fn()  # warm-up: allocations, compilation, CUDA graph recording
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            common.synchronize(device)  # CUDA runs asynchronously: time what the GPU did, not what was queued
            t0 = time.perf_counter()
            fn()
            common.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def _hf_model(model, device, dtype):
    """transformers' LlamaForCausalLM holding the same weights as `model` (through export_hf), or None."""
    try:
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        M.export_hf(model, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    return hf.to(device=device, dtype=dtype)


def bench_decode(cfg, args, device, dtype):
    model = M.Transformer(args).init_weights(seed=cfg.seed).to(device=device).eval()
    hf = _hf_model(model, device, dtype).eval() if cfg.hf else None
    model = model.to(dtype)
    rows = []
    for bs in cfg.batches:
        prompts = [[1]] * bs  # BOS only: the figure is pure decode speed
        ids = torch.ones((bs, 1), dtype=torch.long, device=device)
        fns = {"nanollama2 eager": lambda: G.generate(model, prompts, cfg.new_tokens, temperature=0.0, eos_id=None)}
        if cfg.compile:
            fns["nanollama2 compiled"] = lambda: G.generate(model, prompts, cfg.new_tokens, temperature=0.0,
                                                            eos_id=None, compile=True)
        if hf is not None:
            fns["HF generate"] = torch.no_grad()(lambda: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.new_tokens,
                min_new_tokens=cfg.new_tokens, do_sample=False, pad_token_id=0))
        for name, sec in _median_times(fns, cfg.repeats, device).items():
            rows.append({"impl": name, "batch": bs, "tokens_per_s": bs * cfg.new_tokens / sec})
    for r in rows:
        hf_same = next((x["tokens_per_s"] for x in rows if x["impl"] == "HF generate" and x["batch"] == r["batch"]),
                       None)
        own1 = next((x["tokens_per_s"] for x in rows if x["impl"] == r["impl"] and x["batch"] == 1), None)
        r["vs_hf"] = r["tokens_per_s"] / hf_same if hf_same else None
        r["vs_own_batch1"] = r["tokens_per_s"] / own1 if own1 else None
    return rows


def bench_train(cfg, args, device, dtype):
    peak, peak_name = common.peak_flops(device, dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, args.vocab_size, (cfg.train_batch, cfg.train_seq + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()  # targets[t] is the token after inputs[t]
    ntok = cfg.train_batch * cfg.train_seq
    base = M.Transformer(args).init_weights(seed=cfg.seed)
    flops_tok = base.flops_per_token(cfg.train_seq)
    variants = [("nanollama2 eager", False, False)]
    if cfg.compile:
        variants.append(("nanollama2 compiled", True, False))
    if cfg.hf:
        variants.append(("HF LlamaForCausalLM", False, True))
    steps, losses = {}, {}
    for name, comp, is_hf in variants:
        if is_hf:
            net = _hf_model(base, device, torch.float32)
            if net is None:
                continue
        else:
            net = M.Transformer(args).to(device)
            net.load_state_dict(base.state_dict())
        net.train()
        opt = common.make_optimizer(net, lr=1e-4)  # pretrain.py's AdamW (fused on CUDA), for every variant
        run = torch.compile(net) if comp else net

        def step(run=run, opt=opt, is_hf=is_hf, name=name):
            with common.autocast(device, dtype):
                if is_hf:  # shift_labels: the same 256 targets per row as ours (HF's own shift would use 255)
                    loss = run(input_ids=inputs, labels=targets, shift_labels=targets).loss
                else:
                    loss = run(inputs, targets)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if name not in losses:
                losses[name] = loss.item()

        steps[name] = lambda step=step: [step() for _ in range(cfg.train_steps)]
    rows = []
    for name, sec in _median_times(steps, cfg.repeats, device).items():
        tps = ntok * cfg.train_steps / sec
        rows.append({"impl": name, "tokens_per_s": tps, "mfu": tps * flops_tok / peak if peak else None,
                     "first_loss": losses[name]})
    hf_tps = next((r["tokens_per_s"] for r in rows if r["impl"].startswith("HF")), None)
    for r in rows:
        r["vs_hf"] = r["tokens_per_s"] / hf_tps if hf_tps else None
    return rows, peak_name


def _x(v):
    return f"{v:.2f}x" if v is not None else "-"


def main(cfg: BenchConfig):
    torch.manual_seed(cfg.seed)
    device = common.pick_device(cfg.device)
    dtype = common.pick_dtype(cfg.dtype, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    args = M.preset(cfg.model)
    machine = _machine(device)
    n_params = M.Transformer(args).num_params()
    print(f"# bench: model {cfg.model} ({n_params / 1e6:.1f}M params, vocab {args.vocab_size}), {machine}, "
          f"dtype {str(dtype).replace('torch.', '')}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    report = {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "config": asdict(cfg)}
    if cfg.what in ("decode", "all"):
        rows = bench_decode(cfg, args, device, dtype)
        print(f"\n## decode ({cfg.new_tokens} new tokens per row, greedy, median of {cfg.repeats})")
        print("| implementation | batch | tokens/s | vs HF same batch | vs own batch 1 |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {_x(r['vs_hf'])} | "
                  f"{_x(r['vs_own_batch1'])} |")
        report["decode"] = rows
    if cfg.what in ("train", "all"):
        rows, peak_name = bench_train(cfg, args, device, dtype)
        print(f"\n## train (batch {cfg.train_batch} x {cfg.train_seq}, fwd+bwd+AdamW, median of {cfg.repeats}; "
              f"peak: {peak_name})")
        print("| implementation | tokens/s | vs HF | MFU | first loss |")
        print("|---|---|---|---|---|")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"| {r['impl']} | {r['tokens_per_s']:,.0f} | {_x(r['vs_hf'])} | {mfu} | {r['first_loss']:.4f} |")
        report["train"], report["peak"] = rows, peak_name
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(common.parse_config(BenchConfig, description=__doc__))
