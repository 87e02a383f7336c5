"""The reward models at work (paper §3.2.2-§3.2.3), shared by reward.py, rejection sampling, PPO and evaluation.

A reward model (reward.py trains it) is a chat model whose next-token head became a scalar head: one number per
position, (B, T). What every RL stage does with it:
  1. Score a reply: encode_reply builds the row prompt + reply; the reward is the scalar at the row's LAST token, the
     only position that has seen the prompt and the whole reply (last_token_index: from the row lengths and the
     padding side, never by searching for a pad or EOS id). rewards_of_rows scores a batch of rows; score() does it for
     dialogs and replies, text or token ids.
  2. Combine the two RMs (§3.2.3): R_c = R_s if the prompt is a safety prompt or R_s < 0.15, else R_h, on the sigmoid
     scale (combined_reward; combined_score runs the helpfulness RM only where R_c reads it; RewardModels holds both).
     0.15 is the paper's threshold for "unsafe"; reward.py calibrates both RMs' zero points so that the level means
     the same for both.
  3. logit undoes the sigmoid before PPO whitens the reward (§3.2.3).

Speed-up (the last section): replies to one prompt packed into one row over their shared prompt (pack_shared,
shared_rewards), each reply seeing the prompt and itself. The same rewards as rewards_of_rows on separate rows, up to
float rounding (tests/test_reward.py), for one pass over the prompt; score() and reward.py's training step use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from model import Transformer, load_checkpoint


def load_reward_model(path, device="cpu") -> Transformer:
    """A reward model saved by reward.py (params.json says head "scalar"), in eval mode. Its tokenizer is
    path/tokenizer.model."""
    return load_checkpoint(path, device=device, expect_head="scalar").eval()


# ---- 1. scoring a reply ----------------------------------------------------------------------------------------------
def encode_reply(tok, dialog: list[dict], reply: Union[str, Sequence[int]], max_len: int) -> list[int]:
    """Token ids of prompt + reply, the row whose last token carries the reward.

    str reply: the finished turn as SFT trains it, "<s>[INST] ... [/INST] reply </s>": the last token is EOS.
    token ids (a sample as generated): the open prompt "<s>[INST] ... [/INST]" + the ids as given, EOS or not.
    Longer than max_len: the oldest tokens are cut (the reply's end, where the reward is read, is kept)."""
    if isinstance(reply, str):
        ids = tok.encode_dialog(list(dialog) + [{"role": "assistant", "content": reply}])[0]
    else:
        ids = tok.encode_dialog(list(dialog))[0] + [int(t) for t in reply]
    return ids[-max_len:]


def last_token_index(lengths: torch.Tensor, T: int, padding: str) -> torch.Tensor:
    """Column of each row's last real token in a (B, T) batch, from the lengths alone (no search for pad/EOS ids).
    right padding: row b fills columns 0 .. len-1, so len - 1. left padding: row b fills T - len .. T - 1, so
    (T - len) + len - 1 = T - 1 for every row."""
    if padding == "right":
        return lengths - 1
    if padding == "left":
        return (T - lengths) + lengths - 1
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")


def rewards_of_rows(model, rows: list[list[int]], device, padding: str = "right", pad_id: int = 0) -> torch.Tensor:
    """One reward per row (B,) fp32: the scalar head's output at each row's last token. `model` may be wrapped (DDP).

    Right padding (the default, used in training) needs no mask: under causal attention a pad AFTER the row cannot
    change any position of the row. Left padding (how generate.py batches) needs each row's own RoPE positions from
    0 and a mask that hides the pads from the real tokens. Both give the unpadded row's reward (tests check it)."""
    lengths = torch.tensor([len(r) for r in rows], device=device)  # (B,)
    B, T = len(rows), int(lengths.max())
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)  # (B, T)
    for b, r in enumerate(rows):
        if padding == "right":
            tokens[b, :len(r)] = torch.tensor(r, device=device)
        else:
            tokens[b, T - len(r):] = torch.tensor(r, device=device)
    if padding == "right":
        scores, _ = model(tokens)  # (B, T): plain causal attention
    else:
        pad_len = T - lengths  # (B,)
        cols = torch.arange(T, device=device)
        positions = (cols[None, :] - pad_len[:, None]).clamp(min=0)  # (B, T): RoPE counts from each row's first token
        real = cols[None, :] >= pad_len[:, None]  # (B, T) key is a real token
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=device)  # a pad query attends to itself: no empty softmax row
        mask = causal[None] & (real[:, None, :] | eye[None])  # (B, T, T) True = may attend
        scores, _ = model(tokens, positions=positions, mask=mask[:, None])  # (B, T)
    idx = last_token_index(lengths, T, padding)  # (B,)
    return scores.gather(1, idx[:, None]).squeeze(1).float()  # (B,)


@torch.no_grad()
def score(reward_model: Transformer, tok, dialogs: list[list[dict]], replies: list, sigmoid: bool = False,
          batch_size: int = 64) -> torch.Tensor:
    """Rewards (N,) of replies to dialogs (each ending with a user message), as a CPU tensor in the input order.

    replies: text (scored as a finished turn, EOS appended, exactly as in training) or token ids as generated (scored
    as given: EOS when the sample finished; encode_reply). sigmoid=True: on the (0, 1) scale that §3.2.3 thresholds
    (R_s < 0.15). Each distinct row is scored once (the same reply sampled twice is common) and its reward copied.
    Speed-up: replies to the same dialog are packed over their shared prompt (pack_shared, below), in batches of
    similar length, so little is spent on padding or on prompts seen twice."""
    if len(dialogs) != len(replies):
        raise ValueError(f"{len(dialogs)} dialogs but {len(replies)} replies")
    was_training = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    max_len = reward_model.args.max_seq_len
    index: dict = {}  # token row -> its index among the distinct rows
    rows, copy_of, groups = [], [], {}  # distinct rows; each input's distinct row; distinct rows by dialog
    for d, r in zip(dialogs, replies):
        row = encode_reply(tok, d, r, max_len)
        if tuple(row) not in index:
            index[tuple(row)] = len(rows)
            # replies to the same dialog share its prompt: packed over it (pack_shared)
            groups.setdefault(tuple((m["role"], m["content"]) for m in d), []).append(len(rows))
            rows.append(row)
        copy_of.append(index[tuple(row)])
    packed = sorted(pack_shared(rows, list(groups.values()), max_len), key=lambda p: len(p.tokens))
    out = torch.zeros(len(rows))
    start = 0
    while start < len(packed):  # batches of similar length holding about batch_size replies
        end, n = start, 0
        while end < len(packed) and (n == 0 or n + len(packed[end].members) <= batch_size):
            n, end = n + len(packed[end].members), end + 1
        chunk = packed[start:end]
        out[[i for p in chunk for i in p.members]] = rewards_of_shared(reward_model, chunk, device).cpu()
        start = end
    reward_model.train(was_training)
    out = out[torch.tensor(copy_of, dtype=torch.long)]  # (N,) every input row, copies included
    return out.sigmoid() if sigmoid else out


# ---- 2. the combined reward (§3.2.3) ---------------------------------------------------------------------------------
def combined_reward(r_safety: torch.Tensor, r_helpful: torch.Tensor, is_safety: torch.Tensor,
                    threshold: float = 0.15) -> torch.Tensor:
    """§3.2.3: R_c = R_s if IS_SAFETY(p) or R_s < 0.15 else R_h, from sigmoid-scale scores (B,) of the two RMs: the
    safety RM speaks for risky prompts and for any reply it finds unsafe, the helpfulness RM for the rest."""
    use_safety = is_safety | (r_safety < threshold)
    return torch.where(use_safety, r_safety, r_helpful)


def combined_score(rm_helpful: Transformer, rm_safety: Transformer, tok, dialogs: list[list[dict]], replies: list,
                   is_safety: torch.Tensor, threshold: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_c, R_s), each (N,) on the sigmoid scale, of replies to dialogs: combined_reward of both RMs' scores, with the
    helpfulness RM run only on the replies where R_c uses it (benign prompts whose reply R_s finds safe): on a
    safety prompt or an unsafe reply its score would be computed and thrown away."""
    r_s = score(rm_safety, tok, dialogs, replies, sigmoid=True)  # (N,)
    r_h = torch.zeros_like(r_s)  # read by combined_reward only where use_h
    use_h = ~(is_safety | (r_s < threshold))
    idx = use_h.nonzero().flatten().tolist()
    if idx:
        r_h[use_h] = score(rm_helpful, tok, [dialogs[i] for i in idx], [replies[i] for i in idx], sigmoid=True)
    return combined_reward(r_s, r_h, is_safety, threshold), r_s


class RewardModels:
    """The two frozen reward models with §3.2.3's switch between them: models(tok, dialogs, replies, is_safety) ->
    (R_c, R_s), each (N,) on the sigmoid scale (combined_score). What rejection sampling and GAtt's RM filter score
    with."""

    def __init__(self, rm_helpful, rm_safety, device="cpu", threshold: float = 0.15):
        self.helpful = load_reward_model(rm_helpful, device)
        self.safety = load_reward_model(rm_safety, device)
        self.threshold = threshold

    def __call__(self, tok, dialogs: list[list[dict]], replies: list,
                 is_safety: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return combined_score(self.helpful, self.safety, tok, dialogs, replies, is_safety, self.threshold)


def safety_decides(r_safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15) -> dict:
    """How often R_s decides R_c, from the sigmoid-scale safety scores (N,) and the prompts' IS_SAFETY (N,): on every
    safety prompt by rule, and on a helpfulness prompt only when R_s < threshold (the reply looks unsafe). Returns
    {"helpful_prompts", "share_on_helpful": the share of helpfulness prompts whose reward R_s set, "safety_prompts"}."""
    benign = ~is_safety.bool()
    n = int(benign.sum())
    flagged = int(((r_safety < threshold) & benign).sum())
    return {"helpful_prompts": n, "share_on_helpful": flagged / n if n else None,
            "safety_prompts": int(is_safety.bool().sum())}


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo the sigmoid: log(p / (1 - p)), clamped so a score of exactly 0 or 1 stays finite (§3.2.3's LOGIT)."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


# ---- speed-up: several replies to one prompt in one row --------------------------------------------------------------
# Rejection sampling scores K = 8 replies to each prompt, and a training pair holds two replies to one prompt: scored as
# separate rows, the prompt (often longer than the reply) goes through the model K or 2 times. Packed as
#     prefix | reply 1 | reply 2 | ...        (RoPE positions: 0..L-1 | L, L+1, ... | L, L+1, ... )
# with a mask that lets each reply see the prefix and itself but not the other replies, every reply's tokens get the
# same positions and the same visible context as in its own row, so the same reward (to float rounding; tests check
# it), for one pass over the prefix.
@dataclass
class SharedRow:
    tokens: list[int]
    positions: list[int]  # RoPE position of each token: each reply's count on from the prefix's
    branch: list[int]  # 0 = the shared prefix, j = the j-th reply packed here
    ends: list[int]  # column of each reply's last token, where its reward is read
    members: list[int]  # the input row each reply came from, in packing order


def common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the longest prefix all rows share, kept at least one token short of the shortest row: every reply
    keeps its last token (where the reward is read) in its own branch."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(0, n)):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return max(0, n)


def pack_shared(rows: list[list[int]], groups: list[list[int]], max_len: int) -> list[SharedRow]:
    """Rows (token lists, each at most max_len) in groups that share a prefix (replies to one prompt) -> packed rows
    of at most max_len tokens: the group's common prefix once, then as many of its replies as fit, then a new row
    with the prefix again. Row order within a group is kept; every input row is packed exactly once."""
    out = []
    for g in groups:
        L = common_prefix_len([rows[i] for i in g])
        prefix = rows[g[0]][:L]
        cur = None
        for i in g:
            tail = rows[i][L:]
            if cur is None or len(cur.tokens) + len(tail) > max_len:  # L + len(tail) = len(rows[i]) <= max_len
                cur = SharedRow(list(prefix), list(range(L)), [0] * L, [], [])
                out.append(cur)
            cur.tokens += tail
            cur.positions += range(L, L + len(tail))
            cur.branch += [len(cur.members) + 1] * len(tail)
            cur.ends.append(len(cur.tokens) - 1)
            cur.members.append(i)
    return out


def rewards_of_shared(model, packed: list[SharedRow], device, pad_id: int = 0) -> torch.Tensor:
    """Rewards of every reply in `packed` (sum of len(members),) in packing order (row 0's members first). Right
    padded; query t may attend to key s when s <= t and s is in the prefix or in t's own reply. Padding forms a
    branch of its own (-1) that sees the prefix and earlier padding, so no softmax row is empty."""
    B, T = len(packed), max(len(p.tokens) for p in packed)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    branch = torch.full((B, T), -1, dtype=torch.long)
    for b, p in enumerate(packed):
        n = len(p.tokens)
        tokens[b, :n], positions[b, :n], branch[b, :n] = (torch.tensor(p.tokens), torch.tensor(p.positions),
                                                          torch.tensor(p.branch))
    tokens, positions, branch = tokens.to(device), positions.to(device), branch.to(device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # (B, T query, T key)
    scores, _ = model(tokens, positions=positions, mask=(causal[None] & visible)[:, None])  # (B, T)
    rows = torch.tensor([b for b, p in enumerate(packed) for _ in p.ends], device=device)
    cols = torch.tensor([e for p in packed for e in p.ends], device=device)
    return scores[rows, cols].float()


def shared_rewards(model, rows: list[list[int]], groups: list[list[int]], max_len: int, device) -> torch.Tensor:
    """Rewards (len(rows),) in the input order, each group's rows packed over their common prefix (pack_shared, rows of
    at most max_len) in one forward pass: with gradients when the model trains (the RM's training step)."""
    packed = pack_shared(rows, groups, max_len)
    r = rewards_of_shared(model, packed, device)
    order = torch.tensor([i for p in packed for i in p.members], device=device)
    return torch.empty_like(r).index_copy(0, order, r)
