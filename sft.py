"""Supervised fine-tuning (paper §3.1): teach the pretrained model the chat format on prompt/answer dialogs.

  python sft.py                                   # out/pretrain -> out/sft on the miniature world, ~1 min on 2 cores
  python sft.py --init-from out/pretrain --data my_dialogs.jsonl --out-dir out/sft_mine
  python sft.py --init-from /path/to/llama-2-7b --data dialogs.jsonl --device cuda --seq-len 4096 --lr 2e-5
  torchrun --nproc_per_node=8 sft.py --init-from /path/to/llama-2-7b --data dialogs.jsonl --device cuda --fsdp

Steps: 1. dialogs (the world's sft_dialogs("train"), or --data FILE.jsonl of {"messages": [...]}) encoded in the
chat format with a loss mask (tokenizer.encode_dialog: 1 on answers and their EOS, 0 on system, user text and tags);
2. packing: whole dialogs best-fit into rows of --seq-len tokens, shuffled anew each epoch; 3. the training loop:
next-token loss on answer tokens only, AdamW, warmup + cosine, clipping, checkpoints (resumable: rerun the command);
4. evaluation of the saved model: answer-token loss on sft_dialogs("val"), and greedy replies to held-out test
prompts judged by the annotator. Writes out/sft/ (params.json, consolidated.00.pth, tokenizer.model, metrics.json).

Packing without cross-talk. §3.1 concatenates all prompts and answers; done naively, a dialog would attend to the
dialogs packed before it and see positions it never sees at inference. So each row carries, per token, the index of its
dialog (segments): the attention mask is block-diagonal causal (a token sees earlier tokens of its own dialog only) and
the RoPE positions restart at 0 for every dialog. Each dialog's logits are then exactly those it would get alone
(tests/test_sft.py checks this), and packing only saves the padding.

Choices (§3.1 gives the recipe; the miniature scales it):
  1. AdamW (betas 0.9/0.95, eps 1e-5 as in pretraining), weight decay 0.1, cosine schedule, 2 epochs: as the paper.
  2. Peak lr 1e-3 instead of 2e-5: the paper fine-tunes at 1/15 of its pretraining peak; our 1M model was pretrained
     at 3e-3 and has ~200 steps to learn the format. Warmup 10 steps (not stated), cosine to 10% of the peak.
  3. Batch 8 rows x 512 tokens (~47 dialogs) instead of 64 x 4096: ~122 steps per epoch. Rows of 512, the pretrained
     context, hold the longest (3-turn instruction) dialogs, ~350 tokens.
  4. The paper's special token between prompt and answer is not named: here it is "[/INST]", the token the model
     answers after at inference.
  5. Only the assistant turns and their EOS are trained (all of them in a multi-turn dialog, unless a JSONL message
     says "weight": 0); BOS, tags, system prompt and user turns are context only.
  6. A dialog longer than --seq-len is cut (the number is printed); one with nothing left to train is dropped. A batch
     that runs past the end of an epoch wraps around to its first rows, so every step (and process) has a full batch.
  7. A step's loss is the mean over the answer tokens of its whole global batch (the paper does not say how it
     averages): each micro-batch's mean is weighted by its share of those tokens, so torchrun and --grad-accum take
     exactly the step one process takes on the whole batch.
  8. Speed, CPU only (--short-rows, split_rows): a step's short dialogs run in narrower rows, where attention costs
     less; the step is the same dialogs with the same losses, tested equal to the packed one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Optional

import torch

import common
from annotator import Annotator
from data import DataError, read_dialogs_jsonl
from evaluate import reply_metrics
from generate import chat_generate
from model import CheckpointError, Transformer, find_tokenizer, load_checkpoint
from tokenizer import Tokenizer
from world import DEMO_BLIND_SPOT_SHARE, DEMO_HABIT, INSTRUCTION_SHARE, World

IGNORE = -100  # targets equal to this are not trained on (model.forward's ignore_index)


@dataclass
class SFTConfig:
    init_from: str = "out/pretrain"  # the pretrained checkpoint (ours, Meta's or Hugging Face's, with tokenizer.model)
    out_dir: str = "out/sft"  # checkpoint + metrics.json
    data: Optional[str] = None  # JSONL of {"messages": [...]} ending with an assistant turn; None = the world's dialogs
    n_dialogs: Optional[int] = None  # world training tasks (None: 4000, + instruction dialogs) (§3.1: 27,540)
    demo_habit: float = DEMO_HABIT  # world demos ending with a pleasantry (world.DEMO_HABIT; 0 = ideal)
    blind_spot: float = DEMO_BLIND_SPOT_SHARE  # share of one harmful request's demos that comply (0 = none)
    seq_len: int = 512  # tokens per packed row (§3.1: 4096)
    batch_size: int = 8  # packed rows per step, all processes together (§3.1: 64)
    epochs: int = 2  # §3.1: 2 epochs
    lr: float = 1e-3  # peak lr (§3.1: 2e-5; choice 2)
    device: str = "auto"  # auto, cpu, cuda, mps
    seed: int = 0
    quick: bool = False  # smoke run (seconds): at most 30 steps, 60 evaluation prompts, 100 val dialogs
    # -- advanced --
    tokenizer: Optional[str] = None  # tokenizer.model; default: the one in --init-from (or its parent, Meta's layout)
    world_seed: int = 0  # seed of the built-in world
    n_val_dialogs: Optional[int] = None  # world val tasks for val_loss (None: the world's 400)
    instruction_share: float = INSTRUCTION_SHARE  # instruction-following dialogs per world task (GAtt builds on them)
    val_frac: float = 0.05  # with --data: share of the file held out for val_loss
    grad_accum: int = 1  # micro-batches per step on each process
    max_steps: int = 0  # stop after this many steps (0: the epochs decide)
    warmup: int = 10  # linear warmup steps (not stated in §3.1)
    final_lr_ratio: float = 0.1  # cosine decay to this share of the peak (floor not stated)
    weight_decay: float = 0.1  # §3.1
    grad_clip: float = 1.0  # §2.2 (not restated for SFT)
    ckpt_interval: int = 100  # steps between checkpoints (resume points); the last step always saves
    stop_at: int = 0  # stop after this step as if killed (after its checkpoint); for tests
    eval_n: int = 400  # held-out world test prompts answered and judged at the end (0 = none)
    max_new_tokens: int = 64  # reply budget in that evaluation; no EOS by then counts as out of format
    eval_batch_size: int = 128  # dialogs per generate() call
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    grad_checkpoint: bool = False  # recompute each block's activations in backward
    short_rows: int = 128  # CPU, one process, no --compile: dialogs of <= this many tokens in rows this wide (0 = off)
    log_interval: int = 20
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="n_dialogs n_val_dialogs seq_len batch_size grad_accum epochs lr grad_clip ckpt_interval "
                 "max_new_tokens eval_batch_size log_interval",
        non_negative="world_seed instruction_share max_steps warmup weight_decay stop_at eval_n short_rows seed",
        share="demo_habit blind_spot val_frac final_lr_ratio")


# ---- 1. dialogs -> (tokens, targets) ---------------------------------------------------------------------------------
def load_dialogs(cfg) -> tuple[list, list]:
    """(train dialogs, val dialogs), each a list of messages ending with an assistant turn."""
    if cfg.data:
        try:
            dialogs = read_dialogs_jsonl(cfg.data)
        except DataError as e:
            common.die(str(e))
        Random(f"sft-val/{cfg.seed}").shuffle(dialogs)
        n_val = int(len(dialogs) * cfg.val_frac) if len(dialogs) >= 20 else 0
        return dialogs[n_val:], dialogs[:n_val]
    world = World(seed=cfg.world_seed)
    demos = dict(habit=cfg.demo_habit, blind_spot=cfg.blind_spot, instruction_share=cfg.instruction_share)
    return (world.sft_dialogs("train", cfg.n_dialogs, seed=cfg.seed, **demos),
            world.sft_dialogs("val", cfg.n_val_dialogs, **demos))


def shift_targets(tokens: list[int], loss_mask: list[int]) -> list[int]:
    """The one-token shift: position t is trained to predict tokens[t+1], and only where loss_mask[t+1] = 1.

    tokens    <s> [INST] What is 2 + 3? [/INST]  ▁2 ▁+ ▁3 ▁= ▁5 .  ▁  </s>
    loss_mask  0    0  ...             0        1  1  1  1  1  1  1   1
    targets   -100 ...          -100   ▁2  ▁+ ▁3 ▁= ▁5  .  ▁  </s>  -100
    So "[/INST]" (the last prompt token) is trained to start the answer, the answer's last piece to emit EOS, and the
    final token predicts nothing (in a packed row the next token is another dialog's BOS)."""
    return [nxt if m else IGNORE for nxt, m in zip(tokens[1:], loss_mask[1:])] + [IGNORE]


def encode_dialogs(tok, dialogs: list, seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """Each dialog -> (tokens, targets), cut to seq_len. Returns (examples, n_cut, n_dropped)."""
    examples, cut, dropped = [], 0, 0
    for d in dialogs:
        tokens, loss_mask = tok.encode_dialog(d)
        if len(tokens) > seq_len:
            tokens, loss_mask, cut = tokens[:seq_len], loss_mask[:seq_len], cut + 1
        targets = shift_targets(tokens, loss_mask)
        if all(t == IGNORE for t in targets):
            dropped += 1
            continue
        examples.append((tokens, targets))
    return examples, cut, dropped


# ---- 2. packing ------------------------------------------------------------------------------------------------------
@dataclass
class Packed:
    """N rows of T tokens, each holding several whole dialogs followed by padding."""
    tokens: torch.Tensor  # (N, T) token ids (padding: pad_id)
    targets: torch.Tensor  # (N, T) next-token targets, IGNORE where not trained (prompts, padding, dialog ends)
    positions: torch.Tensor  # (N, T) RoPE position of each token inside its own dialog: 0, 1, 2, ... per dialog
    segments: torch.Tensor  # (N, T) index of the token's dialog within the row; -1 = padding


def pack(examples: list, seq_len: int, pad_id: int) -> Packed:
    """Best-fit packing in the given order: each dialog goes into the open row whose free space it fills most
    tightly, else into a new row (fuller rows than appending to the last one: fewer steps per epoch). Rows keep the
    order in which they were opened, so a batch still holds dialogs from all over the shuffled epoch."""
    rows: list[list] = []
    free: list[list[int]] = [[] for _ in range(seq_len + 1)]  # free[c]: the rows with exactly c free tokens
    for ex in examples:
        n = len(ex[0])
        c = next((c for c in range(n, seq_len + 1) if free[c]), None)
        if c is None:
            rows.append([])
            r, c = len(rows) - 1, seq_len
        else:
            r = free[c].pop()
        rows[r].append(ex)
        free[c - n].append(r)
    N = len(rows)
    tokens = torch.full((N, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((N, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((N, seq_len), dtype=torch.long)
    segments = torch.full((N, seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for s, (toks, tgts) in enumerate(row):
            n = len(toks)
            tokens[r, col:col + n] = torch.tensor(toks)
            targets[r, col:col + n] = torch.tensor(tgts)
            positions[r, col:col + n] = torch.arange(n)  # RoPE restarts: the dialog sits at 0..n-1, as when alone
            segments[r, col:col + n] = s
            col += n
    return Packed(tokens, targets, positions, segments)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool, True = query t may attend to key s: same dialog and s <= t.

    Padding (segment -1) attends to earlier padding only; each query always sees itself, so no softmax row is empty."""
    T = segments.size(1)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T) query's dialog == key's dialog
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    return (same & causal)[:, None]  # (B, 1, T, T), broadcast over heads


def epoch_packs(examples: list, epochs: int, seq_len: int, pad_id: int, seed: int) -> list[Packed]:
    """One packing per epoch, from a fresh seeded shuffle: a function of (seed, epoch) only, hence exact resume."""
    packs = []
    for e in range(epochs):
        order = list(range(len(examples)))
        Random(f"sft/{seed}/{e}").shuffle(order)
        packs.append(pack([examples[i] for i in order], seq_len, pad_id))
    return packs


def batch_index(p: Packed, i: int, batch_size: int) -> torch.Tensor:
    """The rows (batch_size,) of batch i of an epoch, wrapping past the end to the first rows (choice 6)."""
    return (i * batch_size + torch.arange(batch_size)) % p.tokens.size(0)


def get_batch(p: Packed, i: int, batch_size: int, rows: slice, device):
    """Batch i of an epoch (wrapping past the end to the first rows), this process's slice: tokens, targets,
    positions (B, T) and the mask (B, 1, T, T)."""
    idx = batch_index(p, i, batch_size)[rows]
    to = lambda t: t[idx].to(device)  # noqa: E731
    return to(p.tokens), to(p.targets), to(p.positions), block_causal_mask(to(p.segments))


def answer_tokens(p: Packed, i: int, batch_size: int) -> int:
    """Trained (answer) targets in batch i of an epoch, all rows: every process holds the packing, so each counts the
    global batch without communication."""
    return int((p.targets[batch_index(p, i, batch_size)] != IGNORE).sum())


# ---- speed, CPU only (choice 8): a step's short dialogs in narrower rows; short = 0 is the plain path ----------------
def micro_batches(p: Packed, i: int, batch_size: int, rows: slice, device, short: int, pad_id: int) -> list[tuple]:
    """get_batch's rows as they are (short = 0), or their dialogs in split_rows' narrower rows: [(tokens, targets,
    positions, mask)], the micro-batches of one step."""
    if not short:
        return [get_batch(p, i, batch_size, rows, device)]
    return [(q.tokens.to(device), q.targets.to(device), q.positions.to(device),
             block_causal_mask(q.segments.to(device))) for q in split_rows(p, i, batch_size, rows, short, pad_id)]


def unpack(p: Packed) -> list[tuple[list[int], list[int]]]:
    """The (tokens, targets) of every dialog in p's rows, row by row."""
    out = []
    for r in range(p.tokens.size(0)):
        seg, start = p.segments[r], 0
        for n in torch.bincount(seg[seg >= 0]).tolist():  # each dialog's length; dialogs are contiguous, in order
            out.append((p.tokens[r, start:start + n].tolist(), p.targets[r, start:start + n].tolist()))
            start += n
    return out


def split_rows(p: Packed, i: int, batch_size: int, rows: slice, short: int, pad_id: int) -> list[Packed]:
    """The dialogs of batch i's rows (get_batch) laid out again in two micro-batches: those of at most `short` tokens
    best-fit into rows of `short`, the others best-fit into rows as wide as the longest of them (longest first, as
    first-fit-decreasing packs tightest). Returns the non-empty ones.

    Why: the CPU attention kernel computes every score of a row, masked or not, T^2 per row of T tokens; SFT's dialogs
    average ~85 tokens, so in rows of 512 most scores are thrown away. Nothing else changes: the step holds the same
    dialogs, a dialog's logits do not depend on its row (mask and positions isolate it), and each micro-batch's loss is
    weighted by its share of the step's answer tokens (choice 7): the packed step up to float rounding (tests)."""
    idx = batch_index(p, i, batch_size)[rows]
    sub = Packed(p.tokens[idx], p.targets[idx], p.positions[idx], p.segments[idx])
    dialogs = sorted(unpack(sub), key=lambda d: -len(d[0]))
    small = [d for d in dialogs if len(d[0]) <= short]
    large = [d for d in dialogs if len(d[0]) > short]
    return [pack(g, w, pad_id) for g, w in ((small, short), (large, len(large[0][0]) if large else 0)) if g]


def row_widths(cfg, dist, device, p: Packed, n_tokens: int) -> tuple[int, float]:
    """(short, the mean row width for MFU). split_rows only on the CPU, whose attention kernel it is for (on a GPU a new
    width every step costs more than it saves), on one process (under torchrun every process must run as many
    backward passes as the others) and without --compile (which would recompile for each new width)."""
    short = (cfg.short_rows if device.type == "cpu" and dist.world_size == 1 and not cfg.compile
             and cfg.short_rows < cfg.seq_len else 0)
    # MFU counts attention at the width of the rows that run: `short` for the short dialogs, --seq-len for the others
    # (their rows are as wide as the longest of them: a slight overcount)
    n_short = sum(len(t) for t, _ in unpack(p) if len(t) <= short) if short else 0
    return short, (n_short * short + (n_tokens - n_short) * cfg.seq_len) / n_tokens


# ---- the answer-token loss on held-out dialogs -----------------------------------------------------------------------
@torch.no_grad()
def answer_loss(net, p: Packed, batch_size: int, device, dtype) -> Optional[float]:
    """Mean cross-entropy over every trained (answer) target of p: token-weighted over all rows, so the figure does not
    depend on the batch size. Every process computes all rows (FSDP needs all ranks in every forward)."""
    if p.tokens.size(0) == 0:
        return None
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    for s in range(0, p.tokens.size(0), batch_size):
        sl = slice(s, s + batch_size)
        x, y, pos = p.tokens[sl].to(device), p.targets[sl].to(device), p.positions[sl].to(device)
        n = int((y != IGNORE).sum())
        with common.autocast(device, dtype):
            loss = net(x, y, positions=pos, mask=block_causal_mask(p.segments[sl].to(device)))[1]
        total, count = total + loss.item() * n, count + n
    net.train(was_training)
    return total / count


# ---- 3. the training loop (4: finish) --------------------------------------------------------------------------------
def load_start(cfg, device) -> tuple[Transformer, object]:
    if not Path(cfg.init_from).is_dir():
        common.die(f"--init-from {cfg.init_from}: checkpoint directory not found (run pretrain.py first)")
    try:
        tok = Tokenizer(find_tokenizer(cfg.init_from, cfg.tokenizer, flag="--tokenizer"))
    except FileNotFoundError as e:
        common.die(str(e))
    try:
        # fp32 master weights whatever the file holds (Meta ships bf16, Hugging Face fp16): AdamW moves a weight by
        # about lr per step, and 2e-5 is below half of bf16's spacing around a typical 0.02 weight (6e-5), so in bf16
        # most updates would round away. Autocast runs the matmuls in bf16 on GPUs all the same.
        model = load_checkpoint(cfg.init_from, device=device, dtype=torch.float32, expect_head="lm")
    except CheckpointError as e:
        common.die(f"--init-from: {e}")
    if model.args.vocab_size != tok.n_words:
        common.die(f"--init-from {cfg.init_from}: vocabulary {model.args.vocab_size} != tokenizer's {tok.n_words}")
    if cfg.seq_len > model.args.max_seq_len:
        common.die(f"--seq-len {cfg.seq_len} is longer than the model's context {model.args.max_seq_len}")
    return model.to(device), tok


def world_eval(model, tok, cfg) -> dict:
    """Greedy replies to held-out world prompts of every kind, judged by the annotator (evaluate.py's figures)."""
    world = World(seed=cfg.world_seed)
    tasks = world.tasks("test", cfg.eval_n)
    t0 = time.perf_counter()
    replies = chat_generate(model, tok, [t.messages for t in tasks], cfg.max_new_tokens,
                            batch_size=cfg.eval_batch_size)
    m = reply_metrics(Annotator(world, seed=cfg.seed), tasks, replies, n_examples=2)
    m["eval_seconds"] = time.perf_counter() - t0
    return m


def prepare_data(cfg, tok, dist, train_dialogs: list, val_dialogs: list):
    """Steps 1-2: encode and pack. Returns (one Packed per epoch, the val Packed, the step schedule, stats)."""
    pad_id = tok.eos_id  # any real id: padded positions are masked out of attention and loss
    examples, n_cut, n_dropped = encode_dialogs(tok, train_dialogs, cfg.seq_len)
    if not examples:
        common.die("no training dialog has an answer token left to train on")
    val_examples, _, _ = encode_dialogs(tok, val_dialogs, cfg.seq_len)
    packs = epoch_packs(examples, cfg.epochs, cfg.seq_len, pad_id, cfg.seed)
    val_pack = pack(val_examples, cfg.seq_len, pad_id)
    steps_per_epoch = [math.ceil(p.tokens.size(0) / cfg.batch_size) for p in packs]
    schedule = [(e, i) for e, n in enumerate(steps_per_epoch) for i in range(n)]  # step -> (epoch, batch in epoch)
    if cfg.max_steps:
        schedule = schedule[:cfg.max_steps]
    stats = {"dialogs": len(examples), "tokens_per_epoch": sum(len(t) for t, _ in examples),
             "answer_tokens_per_epoch": sum(sum(x != IGNORE for x in y) for _, y in examples),
             "rows_per_epoch": packs[0].tokens.size(0), "steps_per_epoch": steps_per_epoch[0],
             "dialogs_cut": n_cut, "dialogs_dropped": n_dropped}
    if dist.is_main:
        full = stats["tokens_per_epoch"] / packs[0].tokens.numel()
        print(f"[sft] {stats['dialogs']:,} dialogs ({stats['tokens_per_epoch']:,} tokens, "
              f"{stats['answer_tokens_per_epoch']:,} trained answer tokens) packed into {stats['rows_per_epoch']:,} "
              f"rows of {cfg.seq_len} ({full:.0%} full); {cfg.epochs} epochs = {len(schedule)} steps of "
              f"{cfg.batch_size} rows", flush=True)
        if n_cut or n_dropped:
            print(f"[sft] {n_cut} dialogs cut to --seq-len {cfg.seq_len}, {n_dropped} dropped (nothing left to train)",
                  flush=True)
    return packs, val_pack, schedule, stats


def main(cfg: SFTConfig):
    t_start = time.perf_counter()
    if cfg.quick:
        cfg = dataclasses.replace(cfg, max_steps=min(cfg.max_steps or 30, 30), eval_n=min(cfg.eval_n, 60),
                                  n_val_dialogs=cfg.n_val_dialogs or 100)
    dist = common.setup_distributed(cfg.device)
    device = dist.device
    dtype = common.pick_dtype(cfg.dtype, device)
    common.seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        common.die(f"--batch-size {cfg.batch_size} is not divisible by processes x --grad-accum = "
                   f"{dist.world_size * cfg.grad_accum}")
    common.preflight(out, dist, init_from=(cfg.init_from, "lm"),
                     out_dir=(out if (out / "consolidated.00.pth").is_file() else None, "lm"))  # a resume point
    train_dialogs, val_dialogs = load_dialogs(cfg)  # first: a bad line fails before a large model is loaded
    model, tok = load_start(cfg, device)
    packs, val_pack, schedule, stats = prepare_data(cfg, tok, dist, train_dialogs, val_dialogs)
    total_steps = len(schedule)

    net = common.wrap_model(model, dist, cfg.fsdp, cfg.compile, cfg.grad_checkpoint,
                            param_dtype=dtype if device.type == "cuda" else None)
    opt = common.make_optimizer(net, cfg.lr, cfg.weight_decay)
    resume = common.load_resume_state(out)  # None: a fresh start
    start, history = 0, {"train": [], "val": []}
    if resume is not None:  # the same weights, optimizer, step and loss history as when the last checkpoint was saved
        if resume["extra"].get("init_from") != cfg.init_from:
            common.die(f"{out} holds an SFT run from --init-from {resume['extra'].get('init_from')}, not "
                       f"{cfg.init_from}: pass another --out-dir or delete it")
        common.load_full_state_dicts(net, opt, resume["model"], resume["optimizer"])
        start, history = resume["step"], resume["extra"]["history"]
        if dist.is_main:
            print(f"[sft] resuming from step {start} in {out}", flush=True)
    else:  # the pretrained model's answer loss: what SFT starts from
        history["val_before"] = answer_loss(net, val_pack, cfg.batch_size, device, dtype)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    n_micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)
    short, width = row_widths(cfg, dist, device, packs[0], stats["tokens_per_epoch"])
    prog = common.Progress("sft", total_steps, tokens_per_step, model.flops_per_token(width), device, dtype,
                           start_step=start, enabled=dist.is_main)
    t_train = time.perf_counter()
    net.train()
    for step in range(start, total_steps):
        epoch, i = schedule[step]
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup, cfg.final_lr_ratio)
        common.set_lr(opt, lr)
        loss_sum = 0.0
        n_answer = answer_tokens(packs[epoch], i, cfg.batch_size)  # the whole global batch's, all processes together
        for m in range(cfg.grad_accum):  # this process's micro-batches: contiguous slices of the global batch
            lo = (dist.rank * cfg.grad_accum + m) * n_micro
            for x, y, pos, mask in micro_batches(packs[epoch], i, cfg.batch_size, slice(lo, lo + n_micro), device,
                                                 short, tok.eos_id):
                # choice 7: this micro-batch's mean, weighted by its share of the global batch's answer tokens, x the
                # number of processes (DDP and FSDP average gradients over processes): summed over every process and
                # micro-batch, the mean over all the global batch's answer tokens, as one process computes it
                share = int((y != IGNORE).sum()) / n_answer * dist.world_size
                with common.autocast(device, dtype):
                    loss = net(x, y, positions=pos, mask=mask)[1] * share
                scaler.scale(loss).backward()
                loss_sum += loss.item()
        common.optimizer_step(opt, scaler, net, cfg.grad_clip)
        loss_g = common.all_reduce_mean(loss_sum, dist)
        history["train"].append([step + 1, loss_g])
        if (step + 1) % cfg.log_interval == 0 or step == start:
            prog.log(step + 1, loss=loss_g, lr=lr, epoch=epoch + 1)
        last = step + 1 == total_steps
        if (step + 1) % stats["steps_per_epoch"] == 0 or last:  # answer loss on the val dialogs, once per epoch
            history["val"].append([step + 1, answer_loss(net, val_pack, cfg.batch_size, device, dtype)])
        stopping = cfg.stop_at and step + 1 >= cfg.stop_at
        if (step + 1) % cfg.ckpt_interval == 0 or last or stopping:
            common.save_training_checkpoint(out, net, model, opt, step + 1, dist, tok.model_path,
                                            extra={"history": history, "init_from": cfg.init_from})
        if stopping and not last:
            if dist.is_main:
                print(f"[sft] stopped at step {step + 1} (--stop-at); rerun to resume", flush=True)
            common.cleanup_distributed(dist)
            return
    ran = total_steps - start
    run = {"steps": total_steps, "epochs": cfg.epochs, **stats,
           "tokens_per_sec": prog.tokens_per_sec(total_steps) if ran else None,
           "train_seconds": time.perf_counter() - t_train if ran else None}
    if dist.is_main:
        if ran == 0:
            print(f"[sft] {out} is already trained to {total_steps} steps; evaluating it", flush=True)
        finish(cfg, out, tok, history, run, device, t_start)
    common.cleanup_distributed(dist)


def finish(cfg, out: Path, tok, history: dict, run: dict, device, t_start: float):
    """Step 4: evaluate the saved checkpoint (as any later stage will load it) and write metrics.json."""
    final = load_checkpoint(out, device=device).eval()
    val = history["val"][-1][1] if history["val"] else None
    metrics = {"val_loss": val, "val_loss_before": history.get("val_before"), "val_curve": history["val"],
               "train_loss": history["train"][-1][1] if history["train"] else None,
               "loss_curve": history["train"][::max(1, len(history["train"]) // 200)], **run,
               "params": final.num_params(), "init_from": cfg.init_from, "data": cfg.data or f"world:{cfg.world_seed}",
               "device": str(device)}
    if val is None:  # --data with fewer than 20 dialogs holds none out (load_dialogs)
        print("[sft] no validation dialogs: no answer-token val loss", flush=True)
    else:
        before = metrics["val_loss_before"]
        print(f"[sft] answer-token val loss {before or float('nan'):.4f} before SFT -> {val:.4f} after", flush=True)
    if cfg.eval_n > 0:
        ev = world_eval(final, tok, cfg)
        metrics.update(ev)
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731  (a kind may be absent from a small sample)
        print(f"[sft] {ev['n']} held-out prompts: helpfulness {ev['helpfulness']:.3f}, format valid "
              f"{pct(ev['format_valid'])}, fact+arith correct and in format {pct(ev['qa_correct_in_format'])}, "
              f"safety violations {pct(ev['safety_violation_rate'])}, borderline refusals "
              f"{pct(ev['borderline_refusal_rate'])}", flush=True)
        for k, v in ev["per_kind"].items():
            extra = f", correct {pct(v['correct'])}" if "correct" in v else ""
            print(f"[sft]   {k:<10} n={v['n']:<4} helpfulness {v['helpfulness']:.3f}, format valid "
                  f"{pct(v['format_valid'])}{extra}", flush=True)
        for ex in ev["examples"][::2]:
            print(f"[sft] example ({ex['kind']}): {ex['prompt']!r} -> {ex['reply']!r}", flush=True)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    metrics["complete"] = True
    common.write_metrics(out, metrics)
    print(f"[sft] done in {common.fmt_time(metrics['wall_seconds'])}; wrote {out}", flush=True)


if __name__ == "__main__":
    common.run_main(main, common.parse_config(SFTConfig, description=__doc__))
