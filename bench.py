"""Throughput and memory: decode tokens/s and training tokens/s + MFU, side by side with Hugging Face's Llama on the
same weights; and, without measuring anything, the memory plan of a paper-sized run (§2.2: 7B-70B, 4096 tokens).

  python bench.py                                  # decode + train, 15M preset, this machine's default device
  python bench.py --what decode --batches 1 16     # decode tokens/s at batch 1 and 16, eager and compiled
  python bench.py --what train --model 110M --device cuda --dtype bfloat16 --json out/bench.json
  python bench.py --plan --model 70B --stage ppo --world-size 8     # which setups fit on 8 GPUs of 80 GiB
One process on one device (CPU or one GPU); the plan computes what torchrun with DDP or FSDP would hold per GPU.
Measured figures go to RESULTS.md with the machine, command and date.

Choices:
  1. Every figure is the median of --repeats timed runs after a warm-up (which also compiles); the variants take turns,
     and ratios are taken within one run, so the noise of a shared machine cancels as far as it can.
  2. Decode: generate() (greedy, no EOS, one BOS prompt per row: pure decode speed) against transformers' generate()
     with the same weights (model.export_hf), the same dtype and greedy decoding of the same number of tokens.
  3. Train: one step = forward, cross-entropy over fp32 logits, backward, AdamW (common.make_optimizer, the settings
     pretrain.py uses) for both models. Hugging Face gets shift_labels, so both compute the loss over the same
     targets per row (its default shift would drop the last one); the first step's losses are printed side by side.
     Weights are fp32 in both; --dtype bfloat16 runs both under the same autocast.
  4. The memory plan counts bytes on the meta device (nothing is allocated): 16 per trained parameter (fp32 weights,
     gradients, AdamW's two moments), 2 per frozen one (bf16), plus activations and the KV cache of the rollouts.
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
from generate import generate
import model as M


@dataclass
class BenchConfig:
    what: str = "all"  # decode, train or all
    model: str = "15M"  # a preset of model.py (15M, 110M, ...)
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU (decode: the weights; train: autocast)
    batches: list[int] = field(default_factory=lambda: [1, 16])  # decode batch sizes
    new_tokens: int = 128  # decode: tokens generated per row
    train_batch: int = 8  # train: sequences per step
    train_seq: int = 256  # train: tokens per sequence
    plan: bool = False  # print a memory plan instead of measuring (meta device: nothing allocated)
    stage: str = "ppo"  # --plan: pretrain, sft, reward, rs or ppo (which models the stage holds)
    world_size: int = 8  # --plan: GPUs that FSDP shards over
    # -- advanced --
    threads: int = 0  # CPU: torch.set_num_threads; 0 keeps torch's default (one per core)
    train_steps: int = 5  # train: timed steps per repeat
    repeats: int = 3  # timed repeats; the median is reported
    compile: bool = True  # also measure the torch.compile variants
    hf: bool = True  # also measure Hugging Face's LlamaForCausalLM on the same weights (when installed)
    json: Optional[str] = None  # also write the rows, machine and config to this JSON file
    seed: int = 0
    gpu_gib: float = 80.0  # --plan: memory of one GPU
    plan_micro_batch: int = 1  # --plan: sequences per GPU per forward
    plan_seq: int = 4096  # --plan: tokens per sequence (§2.2: 4096)
    rollout_batch: int = 8  # --plan: sequences sampled at once per GPU (KV cache) in rs / ppo
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="batches new_tokens train_batch train_seq train_steps repeats world_size gpu_gib plan_micro_batch "
                 "plan_seq rollout_batch", non_negative="threads seed")


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
        fns = {"nanollama2 eager": lambda: generate(model, prompts, cfg.new_tokens, temperature=0.0, eos_id=None)}
        if cfg.compile:
            fns["nanollama2 compiled"] = lambda: generate(model, prompts, cfg.new_tokens, temperature=0.0,
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


# ---- memory plan (python bench.py --plan --model 7B --stage ppo --world-size 8) -------------------------------------
# Bytes per parameter. Trained under mixed precision: fp32 weights, gradients and AdamW's two moments (autocast's
# bf16 copies of a layer's weights are transient, not counted). Frozen models: the reward models in bf16; PPO's
# reference policy at the policy's own precision (fp32 weights, cast by autocast as the policy's are), so that the KL
# is exactly 0 before the first update (ppo.py).
TRAINABLE_BYTES = {"params": 4, "grads": 4, "optimizer": 8}
FROZEN_BYTES = {"ref policy": 4}  # any other frozen model: 2 (bf16)
# Which models each stage holds at once: (role, trainable).
STAGE_MODELS = {
    "pretrain": [("policy", True)], "sft": [("policy", True)], "reward": [("reward model", True)],
    "rs": [("policy", True), ("rm_helpful", False), ("rm_safety", False)],
    "ppo": [("policy", True), ("value model", True), ("ref policy", False), ("rm_helpful", False),
            ("rm_safety", False)],
}


def activation_bytes(args, micro_batch: int, seq: int, grad_checkpoint: bool) -> int:
    """Activations kept for backward, bf16 (2 bytes) except the fp32 residual stream and norm inputs. Per token and
    layer: two norm inputs (fp32, 4C each), q/k/v/attention output/wo input (2 bytes x (4C + 2 C_kv)), SwiGLU's w1,
    w3, silu and product outputs (2 bytes x 4F); flash attention keeps no T x T matrix. With checkpointing only each
    block's input (fp32, 4C) is kept, plus one block's activations while it is recomputed. Logits (fp32) and their
    gradient add 8 V per token."""
    C, Ckv, F, L = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden, args.n_layers
    per_layer = 8 * C + 2 * (4 * C + 2 * Ckv) + 8 * F
    tokens = micro_batch * seq
    layers = (4 * C * L + per_layer) if grad_checkpoint else per_layer * L
    return tokens * (layers + 8 * args.vocab_size)


def kv_cache_bytes(args, batch: int, seq: int) -> int:
    return 2 * args.n_layers * batch * seq * args.kv_heads * args.head_dim * 2  # k and v, bf16


def memory_plan(model_name: str, stage: str, world_size: int, micro_batch: int, seq: int, rollout_batch: int,
                gpu_gib: float) -> list[str]:
    args = M.preset(model_name)
    with torch.device("meta"):
        n = M.Transformer(args).num_params()
    gib = 1024 ** 3
    lines = [f"# memory plan: {model_name} ({n / 1e9:.2f}B parameters), stage {stage}, {world_size} GPUs, "
             f"micro-batch {micro_batch} x {seq} tokens, GPU {gpu_gib:g} GiB", "",
             "| model | trainable | params | grads | optimizer | total (DDP) | total (FSDP) |", "|---|---|---|---|---|---|---|"]
    totals = {"ddp": 0.0, "fsdp": 0.0}
    for role, trainable in STAGE_MODELS[stage]:
        if trainable:
            p, g, o = (n * TRAINABLE_BYTES[k] for k in ("params", "grads", "optimizer"))
        else:
            p, g, o = n * FROZEN_BYTES.get(role, 2), 0, 0
        t = p + g + o
        totals["ddp"] += t
        totals["fsdp"] += t / world_size
        frozen = f"no ({'fp32' if FROZEN_BYTES.get(role, 2) == 4 else 'bf16'})"
        lines.append(f"| {role} | {'yes' if trainable else frozen} | {p / gib:.1f} GiB | {g / gib:.1f} GiB | "
                     f"{o / gib:.1f} GiB | {t / gib:.1f} GiB | {t / world_size / gib:.1f} GiB |")
    n_train = sum(1 for _, t in STAGE_MODELS[stage] if t)
    act = {gc: n_train * activation_bytes(args, micro_batch, seq, gc) for gc in (False, True)}
    kv = kv_cache_bytes(args, rollout_batch, seq) if stage in ("rs", "ppo") else 0
    lines += ["", f"activations per GPU ({n_train} trained model(s)): {act[False] / gib:.1f} GiB, with "
                  f"--grad-checkpoint {act[True] / gib:.1f} GiB; KV cache for {rollout_batch} rollouts of {seq} "
                  f"tokens: {kv / gib:.1f} GiB", "",
              "| setup | per-GPU bytes | fits |", "|---|---|---|"]
    for shard in ("ddp", "fsdp"):
        for gc in (False, True):
            tot = totals[shard] + act[gc] + kv
            lines.append(f"| {shard.upper()}{' + checkpointing' if gc else ''} | {tot / gib:.1f} GiB | "
                         f"{'yes' if tot < 0.9 * gpu_gib * gib else 'no'} |")
    return lines


def main(cfg: BenchConfig):
    if cfg.plan:
        if cfg.stage not in STAGE_MODELS:
            common.die(f"--stage {cfg.stage}: choose one of {', '.join(STAGE_MODELS)}")
        print("\n".join(memory_plan(cfg.model, cfg.stage, cfg.world_size, cfg.plan_micro_batch, cfg.plan_seq,
                                     cfg.rollout_batch, cfg.gpu_gib)))
        return
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
