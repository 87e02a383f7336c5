"""Rejection sampling fine-tuning (paper §3.2.3): sample K replies per prompt, keep the one the reward models like
best, fine-tune on the kept replies as on SFT data. Iterate.

  python rejection_sampling.py                      # out/sft + out/rm_* -> out/rs, with Figs. 7 and 8 in miniature
  python rejection_sampling.py --iterations 3 --k 16
  python rejection_sampling.py --iterations 1 --init-from out/rlhf_v1 --base out/sft --previous out/rlhf_v1 \
      --rm-helpful out/rm_helpful_v2 --rm-safety out/rm_safety_v2 --out-dir out/rlhf_v2   # version 2 of the loop
  torchrun --nproc_per_node=8 rejection_sampling.py --device cuda [--fsdp]   # data parallel; --fsdp for the fine-tuning

One iteration:
  1. temperature: the best temperature shifts as the model changes (Fig. 8), so each iteration re-tunes it on a few
     prompts: the one whose samples give the highest mean best-of-K reward;
  2. sample: K replies per prompt in one batched call (each prompt is prefilled once, its K samples share the cache);
  3. score: the paper's combined reward (safety RM on safety prompts or when it scores below 0.15, helpfulness RM
     otherwise; rlhf.combined_reward), and keep the argmax per prompt;
  4. keep the best of ALL iterations so far per prompt (keep_best): from RLHF-V4 on, §3.2.3's fix for the regressions
     seen when only the last iteration's samples were used. The earlier versions' kept replies (--previous DIR's
     kept.jsonl, prompts keyed by their text) compete too, re-scored by THIS run's reward models first;
  5. fine-tune with sft.py's recipe on the kept (prompt, best reply) dialogues.
Fig. 7: the max and median reward among N samples, N = 1, 2, 4, ... K: the max grows with N, the median does not;
their gap is what rejection sampling can harvest. Fig. 8: the max-of-N curve at several temperatures, for the model
sampled from and the RS model. metrics.json adds how often R_s set a helpfulness prompt's reward (safety_decides).

Choices where the paper is silent:
  1. Every iteration fine-tunes the base model (--base, default --init-from) on the kept set, rather than the last RS
     model on it again, so that no reply is trained on twice; the samples of iteration i+1 come from the model of
     iteration i. In the loop (pipeline.py) version k samples from version k-1 (--init-from) but fine-tunes SFT
     (--base out/sft) on the best of all versions' samples, for the same reason.
  2. K = 8 (the paper's figures go up to N = 100); 600 prompts per iteration, from the world's training prompts. The
     draw depends on the seed and the iteration number only, so with --iterations 1 every version of the loop samples
     the same prompts and improves their best replies (keep_best across versions).
  3. Aid, off by default: --instruction-share s > 0 adds s of the SFT data's instruction-following dialogues per kept
     reply to each fine-tune (SFT's own share is INSTRUCTION_SHARE). Our RL prompts carry no persistent instruction
     and the reward models never judged one, so a fine-tune on kept replies alone may erode that skill, which Ghost
     Attention (§3.3) later samples from; the paper fine-tunes on the kept replies alone.
  4. A sample cut off at --max-new-tokens (no EOS) is not a reply: it scores UNFINISHED_REWARD (0, the bottom of the
     sigmoid scale) in the selection and in Figs. 7-8, and is never kept. The reward models read it at a state they
     never saw in training and may rate it above a finished reply; kept, it would teach the model to stop mid-word.

Under torchrun every rank holds the whole model and both reward models and samples and scores its own share of the
prompts (the last section); the kept records are gathered to every rank, so keep_best gives the same set everywhere;
the fine-tuning (sft.main, in the same processes) is data-parallel, DDP or FSDP2 with --fsdp; rank 0 alone writes files
and evaluates against the start (--init-from) at the end.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from types import SimpleNamespace
from typing import Optional

import torch

import common
import rlhf
from data import DataError, _field, _messages, _read_jsonl, write_dialogs_jsonl
from generate import chat_generate, load_model_and_tokenizer
from model import CheckpointError
from world import World


@dataclass
class RSConfig:
    iterations: int = 2  # RLHF-V1..V4 used rejection sampling; V4 on kept the best of all iterations
    k: int = 8  # samples per prompt (not stated; the paper's Fig. 7 goes to N = 100)
    n_prompts: int = 600  # training prompts per iteration
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2, 1.4])  # Fig. 8's sweep
    safety_threshold: float = 0.15  # §3.2.3
    # -- advanced --
    init_from: str = "out/sft"  # the model to sample from first (the latest chat model)
    base: Optional[str] = None  # the model each fine-tune starts from (choice 1); None: --init-from
    previous: list[str] = field(default_factory=list)  # earlier RS runs' output dirs: their kept replies compete too
    rm_helpful: str = "out/rm_helpful"
    rm_safety: str = "out/rm_safety"
    out_dir: str = "out/rs"
    n_sweep: int = 48  # prompts used to pick each iteration's temperature and for Figs. 7-8
    max_new_tokens: int = 64  # stories with the demonstrations' closer need ~55 tokens
    lr: float = 5e-4  # fine-tuning peak lr (sft.py's recipe)
    epochs: int = 2
    instruction_share: float = 0.0  # aid: SFT's instruction dialogues per kept reply in each fine-tune (choice 3)
    n_test: int = 200  # test prompts for the win rate against the start (0: none; pipeline.py's eval_v* stages)
    world_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    fsdp: bool = False  # under torchrun: fine-tune with FSDP2 instead of DDP (sampling always uses whole models)
    quick: bool = False  # a seconds-long smoke run
    RANGES = common.ranges(  # each numeric flag's range, checked before any work (common.parse_config)
        positive="iterations k n_prompts temperatures n_sweep max_new_tokens lr epochs",
        non_negative="instruction_share n_test world_seed seed", open_share="safety_threshold")


# ---- selection and Fig. 7, small functions the tests check by hand ---------------------------------------------------
def best_of_k(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (P, K) -> index of the best sample per prompt (P,): the argmax, first one on ties."""
    return rewards.argmax(dim=1)


def keep_best(kept: dict, candidates: list) -> tuple[dict, int]:
    """Step 4, the best reply per prompt over ALL iterations so far (§3.2.3, from RLHF-V4 on).
    kept: prompt id -> (reward, reply), the best of the earlier iterations; candidates: this iteration's best of K per
    prompt, (prompt id, reward, reply, or None when none of its K samples finished: nothing to keep, choice 4).
    A candidate replaces a kept reply only with a strictly higher reward (a tie keeps the earlier one). Returns the new
    dict (kept prompts in their order, new ones after them in the candidates' order) and how many prompts were new or
    improved."""
    kept, improved = dict(kept), 0
    for key, r, reply in candidates:
        if reply is None:
            continue
        if key not in kept or r > kept[key][0]:
            kept[key], improved = (r, reply), improved + 1
    return kept, improved


def max_median_by_n(rewards: torch.Tensor) -> tuple[list[int], list[float], list[float]]:
    """Fig. 7 from rewards (P, K): for N = 1, 2, 4, ... K, the mean over prompts of the max and of the median of the
    first N samples (the first N of K i.i.d. samples are N i.i.d. samples)."""
    K = rewards.size(1)
    ns = [n for n in (2 ** i for i in range(K.bit_length())) if n <= K]
    if ns[-1] != K:
        ns.append(K)
    maxes = [rewards[:, :n].max(1).values.mean().item() for n in ns]
    # the true median (the mean of the two middle values for even N; torch.median would take the lower one)
    medians = [rewards[:, :n].quantile(0.5, dim=1).mean().item() for n in ns]
    return ns, maxes, medians


# ---- sampling and scoring --------------------------------------------------------------------------------------------
class Scorer(rlhf.RewardModels):
    """The combined reward R_c and the safety score R_s (sigmoid scale) of replies to tasks (their messages and
    IS_SAFETY), from the two frozen reward models (rlhf.RewardModels)."""

    def __init__(self, cfg, device):
        super().__init__(cfg.rm_helpful, cfg.rm_safety, device, cfg.safety_threshold)

    def __call__(self, tok, tasks, replies) -> tuple[torch.Tensor, torch.Tensor]:
        return super().__call__(tok, [t.messages for t in tasks], replies,
                                torch.tensor([bool(t.is_safety) for t in tasks]))


UNFINISHED_REWARD = 0.0  # choice 4: a reply cut off at the budget scores the bottom of the sigmoid scale


def sample_shard(model, tok, tasks, k: int, temperature: float, scorer, max_new_tokens: int, seed: int, dist,
                 progress: Optional[str] = None) -> list:
    """This rank's share of `tasks` (common.rank_shard), K samples each (prompt-major), scored: one record per task,
    (rewards of its K samples, the best sample's text or None when not one of the K finished, tokens sampled, R_s of
    its finished samples, the task's IS_SAFETY). A
    sample that did not end within max_new_tokens gets UNFINISHED_REWARD whatever the RMs say (choice 4). Each rank
    draws from its own seed (rank 0 from `seed` itself, so one process samples as it always did); progress: a name for
    the sampling's progress lines (rank 0's)."""
    mine = common.rank_shard(tasks, dist)
    if not mine:
        return []
    replies = chat_generate(model, tok, [t.messages for t in mine], max_new_tokens, temperature=temperature, top_p=1.0,
                            seed=seed + 7919 * dist.rank, num_samples=k, progress=progress if dist.is_main else None)
    rewards, r_s = scorer(tok, [t for t in mine for _ in range(k)], [r.tokens for r in replies])
    rewards, r_s = rewards.view(len(mine), k), r_s.view(len(mine), k)
    finished = torch.tensor([r.finished for r in replies]).view(len(mine), k)
    rewards = rewards.masked_fill(~finished, UNFINISHED_REWARD)
    best = [replies[p * k + b] for p, b in enumerate(best_of_k(rewards).tolist())]
    return [(rewards[p].tolist(), best[p].text if best[p].finished else None,
             sum(len(r.tokens) for r in replies[p * k:(p + 1) * k]), r_s[p][finished[p]].tolist(), bool(t.is_safety))
            for p, t in enumerate(mine)]


def sample_all(model, tok, tasks, k: int, temperature: float, scorer, max_new_tokens: int, seed: int, dist,
               progress: Optional[str] = None):
    """sample_shard on every rank, gathered: (rewards (P, K), best reply text per task (None: no finished sample),
    tokens sampled, (R_s, IS_SAFETY) of every finished sample: rlhf.safety_decides' inputs), the same on every rank
    and in the order of `tasks`."""
    records = common.all_gather_shards(sample_shard(model, tok, tasks, k, temperature, scorer, max_new_tokens, seed,
                                                    dist, progress), dist)
    r_s = torch.tensor([x for r in records for x in r[3]])
    is_safety = torch.tensor([r[4] for r in records for _ in r[3]], dtype=torch.bool)
    return (torch.tensor([r[0] for r in records]), [r[1] for r in records], sum(r[2] for r in records),
            (r_s, is_safety))


# ---- the best of all versions: the kept set on disk, read back by a later run's --previous --------------------------
KEPT_FILE = "kept.jsonl"  # written by every run (after each iteration), read back by --previous


def prompt_key(messages: list[dict]) -> str:
    """A prompt's identity across runs: its turns' roles and texts, so the same world prompt has the same key whatever
    --seed drew it and wherever it sat in the list of training prompts."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def write_kept(path: Path, kept: dict, prompts: dict):
    """kept (key -> (reward, reply)) as JSONL, one {"key", "messages", "is_safety", "reply", "reward"} per line;
    prompts: key -> (the prompt's messages, IS_SAFETY). The reward is this run's reward models' and is never read back:
    a later run re-scores the reply with its own (rescore_previous)."""
    text = "".join(json.dumps({"key": key, "messages": prompts[key][0], "is_safety": prompts[key][1],
                               "reply": reply, "reward": r}) + "\n" for key, (r, reply) in kept.items())
    common.atomic_write(path, lambda f: f.write(text.encode()))


def read_kept(path) -> list[tuple[str, list, bool, str]]:
    """The records of write_kept as (key, messages, is_safety, reply); DataError naming the line for a bad one."""
    def parse(r: dict, where: str):
        return (_field(r, "key", str, where), _messages(_field(r, "messages", list, where), where, "user"),
                _field(r, "is_safety", bool, where), _field(r, "reply", str, where))
    if not Path(path).read_text().strip():
        return []  # an earlier run where no prompt had a finished sample
    return _read_jsonl(path, parse, "kept replies")


def load_previous(dirs: list[str]) -> list[tuple[str, list, bool, str]]:
    """Every --previous directory's kept replies, in the order given; one clear error naming the flag and the directory
    for a missing or broken file, before any work."""
    records = []
    for d in dirs:
        path = Path(d) / KEPT_FILE
        if not path.is_file():
            common.die(f"--previous {d}: no {KEPT_FILE} there (the kept replies an earlier rejection_sampling.py run "
                       f"writes in its --out-dir)")
        try:
            records += read_kept(path)
        except (DataError, OSError, UnicodeDecodeError) as e:
            common.die(f"--previous {d}: {e}")
    return records


def rescore_previous(records: list, tok, scorer, dist) -> list:
    """The earlier versions' kept replies as keep_best candidates (key, reward, reply), scored by THIS run's reward
    models: their old rewards came from older reward models and are not comparable. Each rank scores its share."""
    mine = common.rank_shard(records, dist)
    rewards = scorer(tok, [SimpleNamespace(messages=m, is_safety=s) for _, m, s, _ in mine],
                     [reply for *_, reply in mine])[0].tolist() if mine else []
    rewards = common.all_gather_shards(rewards, dist)
    return [(key, r, reply) for (key, _, _, reply), r in zip(records, rewards)]


# ---- the script ------------------------------------------------------------------------------------------------------
def main(cfg: RSConfig):
    check_flags(cfg)
    previous = load_previous(cfg.previous)
    base = cfg.base or cfg.init_from
    t0 = time.perf_counter()
    common.check_checkpoints(init_from=(cfg.init_from, "lm"), base=(cfg.base, "lm"),
                             rm_helpful=(cfg.rm_helpful, "scalar"), rm_safety=(cfg.rm_safety, "scalar"))
    dist = common.setup_distributed(cfg.device)
    common.preflight(cfg.out_dir, dist, init_from=(cfg.init_from, "lm"), base=(cfg.base, "lm"),
                     rm_helpful=(cfg.rm_helpful, "scalar"), rm_safety=(cfg.rm_safety, "scalar"))
    device = dist.device
    common.seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        start, tok = load_model_and_tokenizer(cfg.init_from, device)
        scorer = Scorer(cfg, device)
    except (CheckpointError, OSError, ValueError) as e:
        common.die(str(e))
    world = World(seed=cfg.world_seed)
    sweep_tasks = world.tasks("val", cfg.n_sweep, seed=cfg.seed)
    all_train = world.tasks("train", seed=cfg.seed)
    # the earlier versions' best replies, re-scored by this run's reward models, are the kept set to beat (§3.2.3)
    prompts: dict[str, tuple[list, bool]] = {}  # prompt_key -> (the prompt's messages, IS_SAFETY)
    for key, messages, is_safety, _ in previous:
        prompts.setdefault(key, (messages, is_safety))
    kept: dict[str, tuple[float, str]] = keep_best({}, rescore_previous(previous, tok, scorer, dist))[0]
    # prompt_key -> (reward, reply): the best of the earlier versions by this run's RMs. A prompt counts as kept from
    # them while its kept reply is that text (the same text sampled again may score a hair higher and replace it)
    from_previous = dict(kept)
    metrics: dict = {"iterations": [], "start": cfg.init_from, "base": base, "previous": list(cfg.previous),
                     "previous_kept": len(from_previous)}
    if dist.is_main and cfg.previous:
        print(f"[rs] {len(from_previous)} prompts' best replies from {len(cfg.previous)} earlier run(s), re-scored: "
              f"mean reward now {sum(r for r, _ in kept.values()) / max(len(kept), 1):.3f}", flush=True)
    safety_inputs = []  # (R_s, IS_SAFETY) of every finished sample of every iteration: rlhf.safety_decides
    model = start
    for it in range(1, cfg.iterations + 1):
        # 1. re-tune the temperature on a few prompts: highest mean best-of-K reward
        if dist.is_main:
            print(f"[rs] iteration {it}: best-of-{cfg.k} of {len(sweep_tasks)} prompts at each temperature "
                  f"{', '.join(map(str, cfg.temperatures))}, then of {cfg.n_prompts} prompts at the best", flush=True)
        sweep = {T: sample_all(model, tok, sweep_tasks, cfg.k, T, scorer, cfg.max_new_tokens, cfg.seed, dist,
                               progress=f"rs sweep T={T}")[0] for T in cfg.temperatures}
        temp = max(cfg.temperatures, key=lambda T: sweep[T].max(1).values.mean().item())
        if it == 1:  # Figs. 7 and 8 for the model sampled from (--init-from; "sft": its name when it was always SFT)
            metrics["fig8_sft"] = metrics["fig8_start"] = {str(T): max_median_by_n(r)[1] for T, r in sweep.items()}
            ns, maxes, medians = max_median_by_n(sweep[1.0] if 1.0 in sweep else sweep[temp])
            metrics.update(n_values=ns, max_reward_by_n=maxes, median_reward_by_n=medians)
        # 2-3. K samples per prompt, scored, argmax: each rank its share, the records gathered to every rank
        ids = Random(f"rs/{cfg.seed}/{it}").sample(range(len(all_train)), min(cfg.n_prompts, len(all_train)))
        ts = time.perf_counter()
        rewards, best_replies, n_tok, safety = sample_all(model, tok, [all_train[i] for i in ids], cfg.k, temp,
                                                          scorer, cfg.max_new_tokens, cfg.seed + it, dist,
                                                          progress=f"rs sampling T={temp}")
        dt = time.perf_counter() - ts
        best = best_of_k(rewards)
        safety_inputs.append(safety)
        # 4. the best per prompt over all iterations and versions so far (the same records, hence the same dict, on
        # every rank)
        keys = [prompt_key(all_train[i].messages) for i in ids]
        for i, key in zip(ids, keys):
            prompts.setdefault(key, (all_train[i].messages, all_train[i].is_safety))
        kept, improved = keep_best(kept, [(key, rewards[p, best[p]].item(), best_replies[p])
                                          for p, key in enumerate(keys)])
        rows = [prompts[key][0] + [{"role": "assistant", "content": reply}] for key, (_, reply) in kept.items()]
        path, n_mix = write_training_set(rows, world, cfg, out, it, dist.is_main)
        if dist.is_main:
            write_kept(out / KEPT_FILE, kept, prompts)
        n_prev = sum(kept[key][1] == reply for key, (_, reply) in from_previous.items())
        stats = {"iteration": it, "temperature": temp, "mean_reward": rewards.mean().item(),
                 "mean_best_reward": rewards.max(1).values.mean().item(), "kept": len(kept), "improved": improved,
                 "kept_from_previous": n_prev, "instruction_dialogs": n_mix,
                 "sampled_tokens_per_sec": n_tok / max(dt, 1e-9), "prompts_by_rank": prompts_by_rank(ids, dist),
                 "safety_decides": rlhf.safety_decides(*safety, cfg.safety_threshold)}
        metrics["iterations"].append(stats)
        if dist.is_main:
            print(f"[rs] iteration {it}: T={temp}, mean reward {stats['mean_reward']:.3f}, best-of-{cfg.k} "
                  f"{stats['mean_best_reward']:.3f}, kept {len(kept)} ({improved} new or better, {n_prev} from "
                  f"earlier runs), "
                  f"{stats['sampled_tokens_per_sec']:,.0f} sampled tokens/s", flush=True)
        # 5. fine-tune the base model (--base, default --init-from) on the kept replies (choice 1)
        model = fine_tune(cfg, base, out, path, it, dist)
    n_prev = sum(kept[key][1] == reply for key, (_, reply) in from_previous.items())
    metrics.update(kept=len(kept), kept_from_previous=n_prev, previous_replaced=len(from_previous) - n_prev,
                   safety_decides=rlhf.safety_decides(torch.cat([r for r, _ in safety_inputs]),
                                                      torch.cat([s for _, s in safety_inputs]), cfg.safety_threshold))
    # Fig. 8 for the RS model, and the score against the model sampled from, --init-from (rank 0 alone)
    sweep = {T: sample_all(model, tok, sweep_tasks, cfg.k, T, scorer, cfg.max_new_tokens, cfg.seed, dist)[0]
             for T in cfg.temperatures}
    metrics["fig8_rs"] = {str(T): max_median_by_n(r)[1] for T, r in sweep.items()}
    if dist.is_main:
        if cfg.n_test:
            import evaluate as E
            test = world.tasks("test", cfg.n_test, seed=cfg.seed)
            metrics.update(E.compare_models(model, start, tok, test, world, cfg.seed, cfg.max_new_tokens,
                                            prefix="start"))
        metrics.update(k=cfg.k, world_size=dist.world_size, rs_seconds=time.perf_counter() - t0, complete=True)
        common.write_metrics(out, metrics)
        won = f"win rate vs {Path(cfg.init_from).name} {metrics['win_rate_vs_start']:.1%}; " if cfg.n_test else ""
        print(f"[rs] done: {won}max reward by N "
              f"{[round(x, 3) for x in metrics['max_reward_by_n']]}, median "
              f"{[round(x, 3) for x in metrics['median_reward_by_n']]}; wrote {out} "
              f"({common.fmt_time(metrics['rs_seconds'])})", flush=True)
    common.cleanup_distributed(dist)


def check_flags(cfg: RSConfig):
    """--quick's sizes, and one clear error for an empty temperature sweep, before any work (--previous: load_previous,
    right after)."""
    if cfg.quick:
        cfg.iterations, cfg.k, cfg.n_prompts, cfg.n_sweep, cfg.n_test, cfg.epochs = 1, 4, 32, 8, min(cfg.n_test, 16), 1
        cfg.temperatures = [0.8, 1.2]
    if not cfg.temperatures:
        common.die("--temperatures: give at least one (Fig. 8's sweep picks each iteration's temperature among them)")


def write_training_set(rows: list, world: World, cfg: RSConfig, out: Path, it: int, is_main: bool) -> tuple[Path, int]:
    """The kept set (rs_iter<it>.jsonl) and the fine-tuning set (rs_train<it>.jsonl): the kept set plus the SFT mix's
    share of instruction dialogues (choice 3), shuffled. Returns the latter's path and the number of those dialogues."""
    mix = world.instruction_dialogs("train", round(cfg.instruction_share * len(rows)), seed=cfg.seed + it)
    train_rows = rows + mix
    Random(f"rs-mix/{cfg.seed}/{it}").shuffle(train_rows)
    path = out / f"rs_train{it}.jsonl"
    if is_main:
        write_dialogs_jsonl(out / f"rs_iter{it}.jsonl", rows)
        write_dialogs_jsonl(path, train_rows)
    return path, len(mix)


def fine_tune(cfg: RSConfig, base: str, out: Path, path: Path, it: int, dist):
    """Step 5: sft.py's recipe from the base model on the training set at `path`; returns the fine-tuned model.
    Under torchrun sft.main runs in these same processes, data-parallel, in the process group started here (it leaves
    the group open for us)."""
    import sft
    if dist.world_size > 1:
        torch.distributed.barrier()  # rank 0 has written the kept set that every rank's sft.main reads
    sft.main(sft.SFTConfig(init_from=base, out_dir=str(out), data=str(path), lr=cfg.lr,
                           epochs=cfg.epochs, eval_n=0, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed + it,
                           val_frac=0.02, fsdp=cfg.fsdp))
    if dist.is_main:
        common.forget_resume(out)  # the next iteration trains from the start, not from here
        common.write_metrics(out, {"complete": False})  # sft.main marked its part done; RS is done at the end
    if dist.world_size > 1:
        torch.distributed.barrier()
    model, _ = load_model_and_tokenizer(out, dist.device)
    return model


# ==== under torchrun ==================================================================================================
# Each rank samples and scores the prompts at positions rank, rank + W, ... (common.rank_shard: disjoint, together all
# of them) from its own seed (sample_shard), and common.all_gather_shards hands every rank all the records in the
# prompts' order: keep_best, the files and the statistics are then the same on every rank.
def prompts_by_rank(ids: list, dist) -> list[int]:
    """How many of an iteration's prompts each rank samples (logged)."""
    W = dist.world_size
    return [len(common.rank_shard(ids, common.Dist(rank=r, world_size=W))) for r in range(W)]


if __name__ == "__main__":
    common.run_main(main, common.parse_config(RSConfig, description=__doc__))
