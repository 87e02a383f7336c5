"""Pretraining (paper §2): a SentencePiece BPE tokenizer, then next-token prediction on a corpus.

  python pretrain.py                                  # the miniature world: ~5-6 minutes on a 2-core CPU
  python pretrain.py --mix club=0,story=0.2           # another document mix (world.PRETRAIN_MIX)
  python pretrain.py --data my1.txt my2.txt --vocab-size 8000 --model 15M --device cuda     # your text, one GPU
  python pretrain.py --init-from /path/to/llama-2-7b --data more.txt --device cuda --fsdp  # continued pretraining
  torchrun --nproc_per_node=8 pretrain.py --model 110M --device cuda --compile --batch-size 256

Steps: 1. the tokenizer (trained with Llama 2's settings, or taken from --tokenizer / --init-from); 2. the corpus,
tokenized once into a memory-mapped uint16 file (cached by content hash); 3. the training loop, close to nanoGPT's:
random windows of seq_len tokens, AdamW, warmup + cosine, clipping, periodic validation loss and checkpoints
(resumable at any moment: rerun the same command); 4. evaluation of the saved checkpoint: validation loss against the
unigram entropy, fact recall and held-out sums from completion prompts, a few samples. Writes out/pretrain/
(params.json, consolidated.00.pth, tokenizer.model, metrics.json).

Choices (§2.2 gives the recipe; the miniature scales it):
  1. AdamW beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1, clipping 1.0: as the paper.
  2. Peak lr 3e-3 instead of 3e-4, warmup 50 steps instead of 2000, cosine to 10% of the peak: a 1M-parameter model
     tolerates (and needs) a 10x larger rate, and 1000 steps cannot spend 2000 on warmup.
  3. Batch 32 x 128 tokens (4k tokens) instead of 4M, ~4M tokens in all instead of 2T: what a CPU does in minutes.
  4. Context: 128 tokens, then the last 10% of steps at 512 (same tokens per step), so that the later stages' long
     dialogues (Ghost Attention's 8 turns) sit at positions the model has trained on: RoPE does not extrapolate.
  5. Batches are random windows of the token stream (each document is BOS ... EOS), a function of (seed, step) only:
     the same global batch whatever the number of processes, and an exact resume.
  6. The tokenizer also reads chat-formatted dialogs (never the model): a 512-piece vocabulary must learn "[INST]"
     and "[/INST]" as pieces, or every turn would spend ~6 pieces on each tag.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import common
from data import DataError, read_text_files
from generate import generate
from model import PRESETS, CheckpointError, Transformer, find_tokenizer, load_checkpoint, preset
from tokenizer import B_INST, B_SYS, E_INST, E_SYS, Tokenizer, train_tokenizer
from world import PRETRAIN_MIX, World, arith_question, arith_reply, recall_correct


@dataclass
class PretrainConfig:
    out_dir: str = "out/pretrain"  # checkpoint + metrics.json
    data: list[str] = field(default_factory=list)  # text files, one document each; empty = the built-in world
    init_from: Optional[str] = None  # continue from a checkpoint (ours, Meta's, Hugging Face's); None = from scratch
    model: str = "1M"  # a model.py preset (1M, 15M, 110M, 7B, ...); ignored with --init-from
    vocab_size: int = 512  # §2.2: 32k
    seq_len: int = 128  # tokens per training sequence (choice 4)
    batch_size: int = 32  # sequences per step, all processes together (§2.2: 4M tokens)
    max_steps: int = 1000  # optimizer steps (§2.2: 2T tokens)
    lr: float = 3e-3  # peak lr (§2.2: 3e-4 for 7B/13B; choice 2)
    warmup: int = 50  # §2.2: 2000 steps
    mix: str = ""  # the world's document mix, KIND=WEIGHT,... over PRETRAIN_MIX (e.g. club=0,story=0.2)
    device: str = "auto"  # auto, cpu, cuda, mps
    seed: int = 0
    # -- advanced --
    world_seed: int = 0  # seed of the built-in world
    corpus_bytes: int = 8_000_000  # size of the generated world corpus
    tokenizer: Optional[str] = None  # an existing tokenizer.model; default: train one (or take --init-from's)
    long_seq_len: int = 512  # the final phase's sequence length (0 = no long phase)
    long_frac: float = 0.1  # share of the steps spent at long_seq_len
    grad_accum: int = 1  # micro-batches per step on each process
    final_lr_ratio: float = 0.1  # §2.2: cosine decay to 10% of the peak
    weight_decay: float = 0.1  # §2.2
    grad_clip: float = 1.0  # §2.2
    eval_interval: int = 200  # steps between validation losses
    eval_batches: int = 8  # validation windows = eval_batches x batch_size
    ckpt_interval: int = 250  # steps between checkpoints (resume points)
    stop_at: int = 0  # stop after this step as if killed (after its checkpoint); for tests
    recall_eval: bool = True  # fact recall of the built-in world at the end
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    grad_checkpoint: bool = False  # recompute each block's activations in backward
    log_interval: int = 50
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="corpus_bytes vocab_size seq_len batch_size grad_accum max_steps lr grad_clip eval_interval "
                 "eval_batches ckpt_interval log_interval",
        non_negative="world_seed long_seq_len warmup weight_decay stop_at seed", share="long_frac final_lr_ratio")


# ---- 1-2. tokenizer and the tokenized corpus -------------------------------------------------------------------------
def load_documents(cfg) -> tuple[list[str], str]:
    if cfg.mix and cfg.data:
        common.die("--mix: the document mix is the built-in world's; with --data the documents are your files")
    if cfg.data:
        try:
            return read_text_files(cfg.data), "files:" + ",".join(sorted(cfg.data))
        except DataError as e:
            common.die(str(e))
    mix = parse_mix(cfg.mix)
    world = World(seed=cfg.world_seed)
    try:
        docs = world.pretrain_documents(cfg.corpus_bytes, seed=cfg.seed, mix=mix)
    except ValueError as e:
        common.die(f"--mix: {e}")
    key = f"world:{cfg.world_seed}:{cfg.corpus_bytes}" + (f":{sorted(mix.items())}" if mix else "")
    return docs, key


def parse_mix(text: str) -> dict[str, float]:
    """--mix "club=0,story=0.2" -> {"club": 0.0, "story": 0.2}: weights that replace PRETRAIN_MIX's
    (which kinds and weights are valid, World.pretrain_documents checks)."""
    mix = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, _, weight = (x.strip() for x in item.partition("="))
        try:
            mix[kind] = float(weight)
        except ValueError:
            common.die(f"--mix: {item!r} is not KIND=WEIGHT (kinds: {', '.join(PRETRAIN_MIX)})")
    return mix


def get_tokenizer(cfg, docs, out: Path):
    if cfg.tokenizer or cfg.init_from:
        try:
            return Tokenizer(find_tokenizer(cfg.init_from, cfg.tokenizer, flag="--tokenizer"))
        except FileNotFoundError as e:
            common.die(str(e))
    path = out / "tokenizer.model"
    texts = list(docs)
    if not cfg.data:
        texts += chat_texts(cfg.world_seed)
    print(f"[pretrain] training a {cfg.vocab_size}-token BPE tokenizer on {len(texts):,} texts", flush=True)
    try:
        return train_tokenizer(texts, cfg.vocab_size, path, seed=cfg.seed)
    except ValueError as e:  # a vocabulary too small for byte fallback and the corpus's characters
        common.die(f"--vocab-size {cfg.vocab_size}: {e}")


def chat_texts(world_seed: int, n: int = 3000) -> list[str]:
    """Dialogs in the Llama 2 chat format, for the tokenizer's training text only (choice 6): so that a 512-piece
    vocabulary learns the tags as pieces and an 8-turn Ghost Attention dialogue fits the context."""
    out = []
    # blind_spot=0: the tokenizer, and so pretraining, stay the same whatever sft.py --blind-spot is
    for i, d in enumerate(World(seed=world_seed).sft_dialogs("train", n=n, blind_spot=0)):
        turns = [m["content"] for m in d if m["role"] != "system"]
        sys_prefix = f"{B_SYS}Be brief.{E_SYS}" if i % 4 == 0 else ""
        out.append(" ".join(f"{B_INST} {sys_prefix if j == 0 else ''}{u} {E_INST} {a}"
                            for j, (u, a) in enumerate(zip(turns[::2], turns[1::2]))))
    return out


def tokenize_corpus(docs, tok, cache_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """BOS doc EOS BOS doc EOS ... as one stream, 99% train / 1% validation (by document), cached as .bin files."""
    digest = hashlib.sha1((key + hashlib.md5(Path(tok.model_path).read_bytes()).hexdigest()).encode()).hexdigest()[:12]
    dtype = np.uint16 if tok.n_words < 2 ** 16 else np.uint32
    files = {s: cache_dir / f"{s}-{digest}.bin" for s in ("train", "val")}
    if not all(f.is_file() for f in files.values()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ids = tok.sp_model.encode(docs)  # batched in C++
        n_val = max(1, len(docs) // 100)
        for split, rows in (("train", ids[n_val:]), ("val", ids[:n_val])):
            flat = np.fromiter((t for r in rows for t in (tok.bos_id, *r, tok.eos_id)), dtype=dtype)
            tmp = files[split].with_suffix(".tmp")
            flat.tofile(tmp)
            tmp.replace(files[split])
        print(f"[pretrain] tokenized {len(docs):,} documents in {time.perf_counter() - t0:.1f}s", flush=True)
    return tuple(np.memmap(files[s], dtype=dtype, mode="r") for s in ("train", "val"))


def prepare_data(cfg, dist, out: Path):
    """Steps 1-2: (tokenizer, train stream, val stream). Rank 0 trains the tokenizer and writes the token cache; the
    other ranks wait for it, then read both."""
    docs, key = load_documents(cfg)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tok = get_tokenizer(cfg, docs, out)
        train, val = tokenize_corpus(docs, tok, out / "data", key)
    if dist.world_size > 1:
        torch.distributed.barrier()
    if not dist.is_main:
        given = cfg.tokenizer or cfg.init_from
        tok = get_tokenizer(cfg, docs, out) if given else Tokenizer(str(out / "tokenizer.model"))
        train, val = tokenize_corpus(docs, tok, out / "data", key)
    return tok, train, val


def unigram_entropy(stream: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores all context."""
    counts = np.bincount(np.asarray(stream[:5_000_000], dtype=np.int64)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def get_batch(stream: np.ndarray, step: int, seed: int, n: int, seq_len: int, rank_slice: slice):
    """The global batch of step `step` (n windows of seq_len + 1 tokens), this rank's slice of it: (x, y) (b, T)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (n,), generator=g)[rank_slice]
    rows = np.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).astype(np.int64)
    xy = torch.from_numpy(rows)
    return xy[:, :-1], xy[:, 1:]  # input tokens, next-token targets (B, T)


def phase(cfg, step: int) -> tuple[int, int]:
    """(sequence length, global batch) at this step: the long phase keeps tokens per step constant."""
    if cfg.long_seq_len and step >= int(cfg.max_steps * (1 - cfg.long_frac)):
        return cfg.long_seq_len, max(1, cfg.batch_size * cfg.seq_len // cfg.long_seq_len)
    return cfg.seq_len, cfg.batch_size


# ---- 4. evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def val_loss(net, stream, cfg, dist, device, dtype) -> float:
    net.eval()
    losses = []
    per_rank = slice(dist.rank, None, dist.world_size)
    for i in range(cfg.eval_batches):  # fixed windows (negative steps never collide with training batches)
        x, y = get_batch(stream, -1 - i, cfg.seed, cfg.batch_size, cfg.seq_len, per_rank)
        with common.autocast(device, dtype):
            losses.append(net(x.to(device), y.to(device))[1].item())
    net.train()
    return common.all_reduce_mean(sum(losses) / len(losses), dist)


@torch.no_grad()
def completion_accuracy(model, tok, prompts, correct, max_new_tokens: int = 4, batch: int = 64) -> tuple[float, list]:
    """Greedy completion of each (prompt, expected) pair; correct(text, expected) judges it. (share, 5 examples)"""
    hits, examples = 0, []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        outs = generate(model, [tok.encode(p, bos=True, eos=False) for p, _ in chunk], max_new_tokens,
                        temperature=0.0, eos_id=tok.eos_id)
        for (p, want), out in zip(chunk, outs):
            text = tok.decode([t for t in out if t != tok.eos_id])
            ok = correct(text, want)
            hits += ok
            if len(examples) < 5:
                examples.append(f"{p}|{' '.join(text.split())} [{'ok' if ok else 'want ' + want}]")  # one line
    return hits / len(prompts), examples


def fact_recall(model, tok, world_seed: int) -> tuple[float, list]:
    """Greedy completion of "Alice's pet is a" ... for every fact; correct if the first word is the fact."""
    return completion_accuracy(model, tok, World(seed=world_seed).fact_recall_prompts(), recall_correct)


def arithmetic(model, tok, world_seed: int, n: int = 600) -> tuple[float, list]:
    """Greedy completion of "Q: What is 26 + 16? A: 26 + 16 =" for n of the sums that chat fine-tuning holds out (the
    world's test split; pretraining, like the web, has them all); correct if the next number is the result."""
    keys = World(seed=world_seed).sums("test")[:n]
    prompts = [(f"Q: {arith_question(a, op, b)} A: {a} {op} {b} =", str(a + b if op == "+" else a - b))
               for a, op, b in keys]
    return completion_accuracy(model, tok, prompts, _starts_with_number, max_new_tokens=5)


def arithmetic_asked(model, tok, world_seed: int, n: int = 600) -> tuple[float, list]:
    """The same sums asked as a question, "Q: What is 26 + 16? A:": correct if the completion writes the operands back
    and then the result ("26 + 16 = 42"), as the world's Q&A documents and SFT's answers do. Copying the operands
    from the question is a skill of its own, apart from adding them: the world asks a share of its sums as questions
    (world.ARITH_ASKED) so that pretraining teaches it."""
    keys = World(seed=world_seed).sums("test")[:n]
    prompts = [(f"Q: {arith_question(a, op, b)} A:", arith_reply(a, op, b).rstrip(".")) for a, op, b in keys]
    return completion_accuracy(model, tok, prompts, _writes, max_new_tokens=12)


def _writes(text: str, want: str) -> bool:
    """text begins with want, and want's last number is not the start of a longer one ("= 42" yes, "= 421" no)."""
    text = text.strip()
    return text.startswith(want) and not text[len(want):len(want) + 1].isdigit()


def _starts_with_number(text: str, want: str) -> bool:
    m = re.match(r"\s*(\d+)", text)  # " 42." -> "42": the whole number, so "4" or "421" is wrong
    return bool(m) and m.group(1) == want


# ---- 3. the training loop --------------------------------------------------------------------------------------------
def build_model(cfg, tok, device) -> Transformer:
    if cfg.init_from:
        try:
            # fp32 master weights whatever the file holds (sft.load_start says why)
            model = load_checkpoint(cfg.init_from, device=device, dtype=torch.float32, expect_head="lm")
        except CheckpointError as e:
            common.die(f"--init-from: {e}")
        if model.args.vocab_size != tok.n_words:
            common.die(f"--init-from {cfg.init_from}: vocabulary {model.args.vocab_size} != tokenizer's {tok.n_words}")
        for flag, n in (("--seq-len", cfg.seq_len), ("--long-seq-len", cfg.long_seq_len)):
            if n > model.args.max_seq_len:  # else the long phase would fail at its first step, 90% into the run
                common.die(f"{flag} {n} is longer than the context of --init-from {cfg.init_from} "
                           f"({model.args.max_seq_len}); --long-seq-len 0 skips the long phase")
        return model.to(device)
    max_len = max(cfg.seq_len, cfg.long_seq_len)
    args = preset(cfg.model, vocab_size=tok.n_words, max_seq_len=max(max_len, preset(cfg.model).max_seq_len))
    return Transformer(args).init_weights(seed=cfg.seed).to(device)


def evaluate_final(cfg: PretrainConfig, out: Path, tok, device, dtype, history: dict, run: dict):
    """Step 4: the saved checkpoint, reloaded in one process (also right after FSDP training): losses against the
    unigram entropy, fact recall and held-out sums (the built-in world), a few samples; writes metrics.json.
    run: unigram_entropy, train_seconds, tokens_per_sec (None when this run trained no step)."""
    H, train_time, tps = run["unigram_entropy"], run["train_seconds"], run["tokens_per_sec"]
    final = load_checkpoint(out, device=device).eval()
    metrics = {"train_loss": history["train"][-1][1] if history["train"] else None,
               "val_loss": history["val"][-1][1] if history["val"] else None, "unigram_entropy": H,
               "loss_curve": history["train"][::max(1, len(history["train"]) // 200)],
               "val_curve": history["val"], "steps": cfg.max_steps, "params": final.num_params(),
               "tokens_per_sec": tps, "train_seconds": train_time,
               "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.seq_len, "vocab_size": tok.n_words,
               "device": str(device),
               "document_mix": None if cfg.data else {**PRETRAIN_MIX, **parse_mix(cfg.mix)}}
    peak, _ = common.peak_flops(device, dtype)
    metrics["mfu"] = tps * final.flops_per_token(cfg.seq_len) / peak if peak and tps else None
    if cfg.recall_eval and not cfg.data:
        metrics["fact_recall"], metrics["recall_examples"] = fact_recall(final, tok, cfg.world_seed)
        print(f"[pretrain] fact recall {100 * metrics['fact_recall']:.1f}%: " + " | ".join(
            metrics["recall_examples"][:3]), flush=True)
        metrics["arith_correct"], metrics["arith_examples"] = arithmetic(final, tok, cfg.world_seed)
        print(f"[pretrain] held-out sums {100 * metrics['arith_correct']:.1f}%: " + " | ".join(
            metrics["arith_examples"][:3]), flush=True)
        metrics["arith_asked_correct"], metrics["arith_asked_examples"] = arithmetic_asked(final, tok,
                                                                                           cfg.world_seed)
        print(f"[pretrain] held-out sums asked as questions {100 * metrics['arith_asked_correct']:.1f}%: "
              + " | ".join(metrics["arith_asked_examples"][:2]), flush=True)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    starts = [tok.encode(s, bos=True, eos=False) for s in ("Once upon a time", "Q: What is", "12 + 7 =")]
    samples = [tok.decode(s + [t for t in o if t != tok.eos_id]) for s, o in
               zip(starts, generate(final, starts, 40, temperature=0.8, eos_id=tok.eos_id, generator=g))]
    metrics["samples"] = samples
    for s in samples:
        print(f"[pretrain] sample: {s!r}", flush=True)
    metrics["complete"] = True
    common.write_metrics(out, metrics)
    speed = f"{tps:,.0f} tokens/s, " if tps else ""
    print(f"[pretrain] done: val_loss {metrics['val_loss']:.4f}, {speed}{common.fmt_time(train_time)}; wrote {out}",
          flush=True)


def main(cfg: PretrainConfig):
    if cfg.model not in PRESETS:  # before the tokenizer's training, not after it
        common.die(f"--model {cfg.model}: not a preset; choose one of {', '.join(PRESETS)}")
    dist = common.setup_distributed(cfg.device)
    device = dist.device
    dtype = common.pick_dtype(cfg.dtype, device)
    common.seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        common.die(f"--init-from {cfg.init_from}: directory not found")
    n_micro = dist.world_size * cfg.grad_accum
    for L, B in {phase(cfg, 0), phase(cfg, cfg.max_steps - 1)}:
        if B % n_micro:
            common.die(f"--batch-size {cfg.batch_size} gives {B} sequences at length {L}, not divisible by "
                       f"processes x --grad-accum = {n_micro}")
    common.preflight(out, dist, init_from=(cfg.init_from, "lm"),
                     out_dir=(out if (out / "consolidated.00.pth").is_file() else None, "lm"))  # a resume point

    tok, train, val = prepare_data(cfg, dist, out)
    tok_path = Path(tok.model_path)

    model = build_model(cfg, tok, device)
    resume = common.load_resume_state(out)  # None: a fresh start
    net = common.wrap_model(model, dist, cfg.fsdp, cfg.compile, cfg.grad_checkpoint,
                            param_dtype=dtype if device.type == "cuda" else None)
    opt = common.make_optimizer(net, cfg.lr, cfg.weight_decay)
    start, history = 0, {"train": [], "val": []}
    if resume is not None:  # pick up the last checkpoint: same weights, optimizer, step, loss history
        common.load_full_state_dicts(net, opt, resume["model"], resume["optimizer"])
        start, history = resume["step"], resume["extra"]["history"]
        if dist.is_main:
            print(f"[pretrain] resuming from step {start} in {out}", flush=True)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)

    H = unigram_entropy(train)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    prog = common.Progress("pretrain", cfg.max_steps, tokens_per_step, model.flops_per_token(cfg.seq_len), device,
                           dtype, start_step=start, enabled=dist.is_main)
    if dist.is_main:
        print(f"[pretrain] {model.num_params() / 1e6:.2f}M parameters, vocab {tok.n_words}, "
              f"{len(train):,} train tokens, unigram entropy {H:.3f} nats; {cfg.max_steps} steps x "
              f"{tokens_per_step:,} tokens", flush=True)
    t_start = time.perf_counter()
    net.train()
    step = start
    for step in range(start, cfg.max_steps):
        seq, gb = phase(cfg, step)
        lr = common.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.final_lr_ratio)
        common.set_lr(opt, lr)
        micro = gb // n_micro
        loss_sum = 0.0
        for m in range(cfg.grad_accum):  # this rank's micro-batches: a contiguous slice of the global batch
            lo = (dist.rank * cfg.grad_accum + m) * micro
            x, y = get_batch(train, step, cfg.seed, gb, seq, slice(lo, lo + micro))
            with common.autocast(device, dtype):
                loss = net(x.to(device), y.to(device))[1] / cfg.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        common.optimizer_step(opt, scaler, net, cfg.grad_clip)
        loss_g = common.all_reduce_mean(loss_sum, dist)
        history["train"].append([step + 1, loss_g])
        if (step + 1) % cfg.log_interval == 0 or step == start:
            prog.log(step + 1, loss=loss_g, lr=lr)
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_steps:
            vl = val_loss(net, val, cfg, dist, device, dtype)
            history["val"].append([step + 1, vl])
            if dist.is_main:
                print(f"[pretrain] step {step + 1} val_loss {vl:.4f} (unigram entropy {H:.3f})", flush=True)
        stopping = cfg.stop_at and step + 1 >= cfg.stop_at
        if (step + 1) % cfg.ckpt_interval == 0 or step + 1 == cfg.max_steps or stopping:
            common.save_training_checkpoint(out, net, model, opt, step + 1, dist, tok_path,
                                            extra={"history": history})
        if stopping:
            if dist.is_main:
                print(f"[pretrain] stopped at step {step + 1} (--stop-at); rerun to resume", flush=True)
            common.cleanup_distributed(dist)
            return
    train_time = time.perf_counter() - t_start
    tps = prog.tokens_per_sec(cfg.max_steps)
    if start >= cfg.max_steps and dist.is_main:
        print(f"[pretrain] {out} is already trained to {cfg.max_steps} steps", flush=True)

    if dist.is_main:  # 4. evaluate the saved checkpoint in one process (also right after FSDP training)
        run = {"unigram_entropy": H, "train_seconds": train_time,
               "tokens_per_sec": tps if start < cfg.max_steps else None}
        evaluate_final(cfg, out, tok, device, dtype, history, run)
    common.cleanup_distributed(dist)


if __name__ == "__main__":
    common.run_main(main, common.parse_config(PretrainConfig, description=__doc__))
