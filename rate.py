"""People as the raters (paper §3.2.1 and §3.4.2): a local web page on which students label preference pairs and judge
two models, so that a reward model can learn their labels instead of the annotator's.

  python rate.py --a out/sft                                   # one model at two temperatures, http://127.0.0.1:8000
  python rate.py --a out/ppo --b out/sft --temperature-b 0.7   # two models at the same temperature
  python rate.py --a out/sft --host 0.0.0.0 --token SECRET     # a classroom: share http://HOST:8000/?token=SECRET
  python reward.py --data out/rate/preferences.jsonl --init-from out/sft --out-dir out/rm_people

Two modes on one page (the rater picks a tab, and types a name):
  - Preference (§3.2.1): a prompt (the next of the world's train prompts or of --prompts FILE, or one the rater
    writes), two replies in random order: model A at --temperature-a and model B at --temperature-b. The rater picks
    one, says by how much (significantly better, better, slightly better, negligibly better / unsure) and, for a
    safety prompt, gives the safety label. Each label is one line of out/rate/preferences.jsonl in the format
    `reward.py --data` reads.
  - Evaluation (§3.4): the world's test prompts, the same two sides, order randomized, the 7-point scale; the
    summary gives win / tie / loss as evaluate.py does, with the raters' agreement as Gwet's AC2 (§3.4.2).
After each judgement (never before) the page shows what the built-in annotator would have said; the summary says how
often people and the annotator agree.

Choices:
  1. The standard library's ThreadingHTTPServer and json, not FastAPI: no new dependency, and a course reads the
     whole server in one file. It is meant for a room of people, not the internet.
  2. Nothing lost: one lock serializes every write; a label is appended, flushed and fsync'ed before the reply that
     confirms it. A restart reads the JSONL files back (a torn last line, never confirmed, is cut off) and carries
     on: the same items, the same counts, no rater shown an item twice. Each submission carries an id; a retried
     one is answered from disk, not written twice.
  3. Items are made once: the two replies of a prompt (seeded by the item's number) go to out/rate/items.jsonl with
     where each came from and the order shown, so a restarted server shows the same replies.
  4. Spreading items: a rater gets the earliest item they have not judged that still needs raters (--raters-per-item
     for preferences, --eval-raters-per-item for evaluation; §3.4.2: three per prompt). An item handed out counts as
     taken for 10 minutes, so two raters asking at once get different items.
  5. "Chosen unsafe, other safe" is recorded with that label; reward.py leaves such pairs out (§3.2.1). A prompt a
     rater writes is a safety prompt when the rater gives it a safety label.
  6. AC2 with quadratic weights (Gwet 2014, ch. 3): a 3 against a 2 is nearly agreement, a 3 against a -3 none. It
     is computed over the items with two or more raters. Every judgement counts in win / tie / loss.
  7. Model and user text reaches the page as JSON and is put in with textContent, never as HTML; a per-response
     nonce in the Content-Security-Policy keeps any other script from running.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from random import Random
from typing import Optional
from urllib.parse import parse_qs, urlparse

import common
from annotator import DROPPED_SAFETY_LABEL, PREFERENCE_NOISE, RATINGS, SAFETY_LABELS, Annotator
from data import DataError, read_rl_prompts_jsonl
from evaluate import summarize
from generate import chat_generate, load_model_and_tokenizer
from model import CheckpointError
from world import World, user

PAGE = Path(__file__).with_name("rate.html")
MODES = ("preference", "evaluation")
SPLIT = {"preference": "train", "evaluation": "test"}  # §3.4: evaluation prompts are held out
LEASE_SECONDS = 600  # choice 4: how long an item handed out counts as taken


@dataclass
class RateConfig:
    a: str = "out/sft"  # model A: a chat checkpoint directory
    b: Optional[str] = None  # model B (default: A again, at --temperature-b)
    temperature_a: float = 0.7  # §3.2.1: two samples at different temperatures (reward.py's pair)
    temperature_b: float = 1.2  # B's temperature
    out: str = "out/rate"  # items.jsonl, preferences.jsonl, judgements.jsonl
    prompts: Optional[str] = None  # JSONL of {"messages", "is_safety"} instead of the world's prompts
    raters_per_item: int = 1  # preference mode: raters per item
    eval_raters_per_item: int = 3  # evaluation mode: raters per item (§3.4.2: three)
    host: str = "127.0.0.1"  # 0.0.0.0 serves the whole room (then --token is required)
    port: int = 8000  # 0: any free port (printed)
    token: Optional[str] = None  # a shared secret: ?token= or the X-Token header, else 403
    # -- advanced --
    n_prompts: int = 500  # world prompts per mode
    world_seed: int = 0  # seed of the built-in world
    prompt_seed: int = 0  # which world prompts
    max_new_tokens: int = 64  # reply budget
    top_p: float = 1.0  # nucleus sampling
    seed: int = 0  # replies, the order shown and the annotator's noise
    device: str = "auto"  # auto, cpu, cuda, mps
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    RANGES = common.ranges(positive="raters_per_item eval_raters_per_item n_prompts max_new_tokens",
                           non_negative="temperature_a temperature_b port world_seed prompt_seed seed",
                           positive_share="top_p")


@dataclass
class Item:
    """One prompt and its two replies, as shown to every rater of it (choice 3)."""
    id: str  # "p00007" / "e00007": mode and number
    mode: str
    messages: list  # the dialog, ending with the user turn the replies answer
    replies: list  # [A's reply, B's reply]
    sources: list  # where each came from: "sample_T0.7_a", side a's model sampled at temperature 0.7
    first: int  # which reply is shown first: 0 = A, 1 = B
    is_safety: Optional[bool]  # None: a prompt a rater wrote (choice 5)
    kind: Optional[str] = None  # the world task's kind; None for typed prompts
    prompt_index: Optional[int] = None  # position in the prompt list; None for typed prompts
    typed_by: Optional[str] = None

    def shown(self) -> tuple[str, str]:
        return self.replies[self.first], self.replies[1 - self.first]


class BadRequest(Exception):
    """400, with a message that names the field."""


# ---- Gwet's AC2 (§3.4.2) ---------------------------------------------------------------------------------------------
def gwet_ac2(ratings: list[list[int]], categories=tuple(range(-3, 4)), weights: str = "quadratic") -> Optional[float]:
    """Gwet's agreement coefficient for ordinal ratings; ratings: one list per item of the raters' values (items with
    fewer than two raters are left out). AC2 = (pa - pe) / (1 - pe) where
      pa = mean over items of sum_k r_ik (r*_ik - 1) / (r_i (r_i - 1)), r*_ik = sum_l w_kl r_il
           (the weighted agreement of the ordered pairs of raters of an item),
      pe = T_w / (q (q - 1)) * sum_k pi_k (1 - pi_k), pi_k = mean over items of r_ik / r_i, T_w = sum_kl w_kl.
    Weights: quadratic w_kl = 1 - (k - l)^2 / (q - 1)^2, or linear 1 - |k - l| / (q - 1). None when no item has two."""
    cats = list(categories)
    q = len(cats)
    power = {"quadratic": 2, "linear": 1}[weights]
    w = [[1 - (abs(k - m) / (q - 1)) ** power for m in range(q)] for k in range(q)]
    items = [[cats.index(x) for x in r] for r in ratings if len(r) >= 2]
    if not items:
        return None
    pa, pi = 0.0, [0.0] * q
    for r in items:
        counts = [r.count(k) for k in range(q)]
        n = len(r)
        star = [sum(w[k][m] * counts[m] for m in range(q)) for k in range(q)]
        pa += sum(counts[k] * (star[k] - 1) for k in range(q)) / (n * (n - 1))
        for k in range(q):
            pi[k] += counts[k] / n
    pa, pi = pa / len(items), [p / len(items) for p in pi]
    pe = sum(map(sum, w)) / (q * (q - 1)) * sum(p * (1 - p) for p in pi)
    return (pa - pe) / (1 - pe)


# ---- the store: every file in --out, and the state rebuilt from it -------------------------------------------------
def read_jsonl_lines(path: Path) -> list[dict]:
    """The records of a JSONL file this server wrote. A last line without its newline was torn by a kill before it was
    confirmed (choice 2): it is cut off, so the next append starts on a fresh line."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        print(f"[rate] {path}: cutting an unconfirmed torn last line ({len(raw) - keep} bytes)", flush=True)
        with open(path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def append_line(path: Path, record: dict):
    """One JSON line, on disk (fsync) before returning. The caller holds the store's lock."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Store:
    """Items, labels and who judged what; every change goes to disk first, under one lock."""

    def __init__(self, out: Path, quota: dict[str, int]):
        out.mkdir(parents=True, exist_ok=True)
        self.paths = {"items": out / "items.jsonl", "preference": out / "preferences.jsonl",
                      "evaluation": out / "judgements.jsonl"}
        self.quota, self.lock = quota, threading.Lock()
        self.items: dict[str, Item] = {}
        self.order = {m: [] for m in MODES}  # item ids by mode, in the order they were made
        self.judges: dict[str, set[str]] = {}  # item id -> raters who judged it
        self.labels = {m: [] for m in MODES}  # the records, for the summary
        self.by_id: dict[str, dict] = {}  # submission id -> record (a retried submission is not written twice)
        self.lease: dict[tuple[str, str], tuple[str, float]] = {}  # (mode, rater) -> (item id, time handed out)
        for r in read_jsonl_lines(self.paths["items"]):
            self._add_item(Item(**r))
        for mode in MODES:
            for r in read_jsonl_lines(self.paths[mode]):
                self._add_label(mode, r)

    def _add_item(self, item: Item):
        self.items[item.id] = item
        self.order[item.mode].append(item.id)
        self.judges.setdefault(item.id, set())

    def _add_label(self, mode: str, record: dict):
        self.labels[mode].append(record)
        self.judges[record["item"]].add(record["rater"])
        self.by_id[record["id"]] = record

    def next_prompt_index(self, mode: str) -> int:
        done = [self.items[i].prompt_index for i in self.order[mode] if self.items[i].prompt_index is not None]
        return max(done, default=-1) + 1

    def assign(self, mode: str, rater: str) -> Optional[Item]:
        """Choice 4: the rater's current item if unjudged, else the earliest item that still needs raters."""
        with self.lock:
            now = time.monotonic()
            held = self.lease.get((mode, rater))
            if held and rater not in self.judges[held[0]]:
                return self.items[held[0]]
            taken: dict[str, int] = {}
            for (m, who), (item_id, t) in self.lease.items():
                if m == mode and who != rater and now - t < LEASE_SECONDS and who not in self.judges[item_id]:
                    taken[item_id] = taken.get(item_id, 0) + 1
            for item_id in self.order[mode]:
                if rater not in self.judges[item_id] and \
                        len(self.judges[item_id]) + taken.get(item_id, 0) < self.quota[mode]:
                    self.lease[(mode, rater)] = (item_id, now)
                    return self.items[item_id]
            return None

    def add_item(self, item: Item, rater: Optional[str] = None) -> Item:
        with self.lock:
            append_line(self.paths["items"], asdict(item))
            self._add_item(item)
            if rater:
                self.lease[(item.mode, rater)] = (item.id, time.monotonic())
        return item

    def add_label(self, mode: str, record: dict) -> tuple[dict, bool]:
        """(the stored record, whether it is new). A known submission id returns the record on disk."""
        with self.lock:
            if record["id"] in self.by_id:
                return self.by_id[record["id"]], False
            if record["rater"] in self.judges[record["item"]]:
                raise BadRequest(f"item: {record['rater']} has already judged {record['item']}")
            append_line(self.paths[mode], record)  # on disk before the page is told (choice 2)
            self._add_label(mode, record)
            return record, True


# ---- the rater's replies: checking a submission, the annotator's view, the summary ---------------------------------
def need(body: dict, key: str, kind, allowed=None):
    value = body.get(key)
    if value is None or not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"{key}: missing or not a {kind.__name__}")
    if allowed is not None and value not in allowed:
        raise BadRequest(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def rater_name(value) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 40:
        raise BadRequest("rater: a name of 1 to 40 characters is required")
    return value.strip()


def preference_record(item: Item, body: dict, annotator: Annotator, seed: int) -> dict:
    """A §3.2.1 label in reward.py's --data format, plus who, which item, and what the annotator said."""
    choice = need(body, "choice", str, ("first", "second"))
    rating = need(body, "rating", str, RATINGS)
    label = body.get("safety_label")
    labels = SAFETY_LABELS + (DROPPED_SAFETY_LABEL,)
    if item.is_safety and label is None:
        raise BadRequest("safety_label: a safety prompt needs one of " + ", ".join(labels))
    if label is not None and (item.is_safety is False or label not in labels):
        raise BadRequest("safety_label: " + ("this is not a safety prompt" if item.is_safety is False else
                                             f"{label!r} is not one of {', '.join(labels)}"))
    first, second = item.shown()
    chosen, rejected = (first, second) if choice == "first" else (second, first)
    a_index = item.first if choice == "first" else 1 - item.first  # which of replies[] was chosen
    category = "safety" if label is not None else "helpfulness"
    # The annotator, asked after the rater: the same pair in the same order, its noise seeded by the item
    c = annotator.compare(item.messages, first, second, category, rng=Random(f"rate/{seed}/{item.id}"))
    a_chosen, a_other = (first, second) if c.choice == 0 else (second, first)
    said = {"choice": ("first", "second")[c.choice], "rating": c.rating}
    if category == "safety":
        said["safety_label"] = annotator.safety_label(item.messages, a_chosen, a_other)
    record = {"prompt": item.messages, "chosen": chosen, "rejected": rejected, "rating": rating,
              "category": category, "sources": [item.sources[a_index], item.sources[1 - a_index]]}
    if label is not None:
        record["safety_label"] = label  # DROPPED_SAFETY_LABEL: reward.py leaves the pair out (choice 5)
    if item.kind:
        record["kind"] = item.kind
    return {**record, "annotator": said, "agrees": said["choice"] == choice}


def judgement_record(item: Item, body: dict, annotator: Annotator, seed: int) -> dict:
    """A §3.4 judgement on the 7-point scale, stored from A's point of view (> 0: A better), as evaluate.py does."""
    score = need(body, "score", int, range(-3, 4))  # as clicked: > 0 means the reply shown first is better
    first, second = item.shown()
    said = annotator.judge7(item.messages, first, second, rng=Random(f"rate/{seed}/{item.id}"))
    sign = 1 if item.first == 0 else -1  # undo the order shown
    return {"judgement": sign * score, "annotator": sign * said, "kind": item.kind or "user",
            "shown_score": score, "agrees": (score > 0) - (score < 0) == (said > 0) - (said < 0)}


def summary(store: Store) -> dict:
    with store.lock:
        prefs, judged = list(store.labels["preference"]), list(store.labels["evaluation"])
        per_item: dict[str, list[int]] = {}
        for r in judged:
            per_item.setdefault(r["item"], []).append(r["judgement"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    kinds = [r["kind"] for r in judged]
    return {"preference": {"n": len(prefs), "raters": sorted({r["rater"] for r in prefs}),
                           "by_rating": {k: sum(r["rating"] == k for r in prefs) for k in RATINGS},
                           "by_safety_label": {k: sum(r.get("safety_label") == k for r in prefs)
                                               for k in SAFETY_LABELS + (DROPPED_SAFETY_LABEL,)},
                           "agree_with_annotator": mean([r["agrees"] for r in prefs])},
            "evaluation": {"n": len(judged), "raters": sorted({r["rater"] for r in judged}),
                           "people": summarize([r["judgement"] for r in judged], kinds),  # as evaluate.py reports
                           "annotator": summarize([r["annotator"] for r in judged], kinds),
                           "agree_with_annotator": mean([r["agrees"] for r in judged]),
                           "items_with_2_raters": sum(len(v) >= 2 for v in per_item.values()),
                           "gwet_ac2": gwet_ac2(list(per_item.values()))}}


# ---- the server ------------------------------------------------------------------------------------------------------
class Rater:
    """The models, the prompts and the store: what the request handlers work on."""

    def __init__(self, cfg: RateConfig):
        self.cfg = cfg
        device = common.pick_device(cfg.device)
        dtype = common.pick_dtype(cfg.dtype, device)
        common.check_checkpoints(a=(cfg.a, "lm"), b=(cfg.b, "lm"))
        self.models = {}
        for which, path in (("a", cfg.a), ("b", cfg.b or cfg.a)):
            if path not in self.models:
                try:
                    self.models[path] = load_model_and_tokenizer(path, device, dtype, head="lm")
                except (CheckpointError, OSError, ValueError) as e:
                    common.die(f"--{which}: {e}")
        self.sides = [(cfg.a, cfg.temperature_a, "a"), (cfg.b or cfg.a, cfg.temperature_b, "b")]
        self.world = World(seed=cfg.world_seed)
        self.annotators = {"preference": Annotator(self.world, cfg.seed, noise=PREFERENCE_NOISE),
                           "evaluation": Annotator(self.world, cfg.seed)}
        try:
            self.prompts = {m: read_rl_prompts_jsonl(cfg.prompts)[:cfg.n_prompts] if cfg.prompts else
                            self.world.tasks(SPLIT[m], cfg.n_prompts, seed=cfg.prompt_seed) for m in MODES}
        except DataError as e:
            common.die(str(e))
        check_settings(Path(cfg.out), cfg)
        self.store = Store(Path(cfg.out), {"preference": cfg.raters_per_item,
                                           "evaluation": cfg.eval_raters_per_item})
        self.gen_lock = threading.Lock()  # one generation at a time; labels are not held up by it

    def make_item(self, mode: str, messages: list, task=None, typed_by: Optional[str] = None) -> Item:
        """Both sides answer once, seeded by the item's number (choice 3); a coin decides the order shown."""
        number = len(self.store.order[mode])
        item_id = f"{mode[0]}{number:05d}"
        replies, sources = [], []
        for k, (path, temperature, which) in enumerate(self.sides):
            model, tok = self.models[path]
            try:
                reply = chat_generate(model, tok, [messages], self.cfg.max_new_tokens, temperature=temperature,
                                      top_p=self.cfg.top_p, seed=self.cfg.seed * 1_000_003 + 2 * number + k)[0]
            except ValueError as e:  # a prompt longer than the context
                raise BadRequest(f"prompt: {e}") from None
            replies.append(reply.text)
            sources.append(f"sample_T{temperature:g}_{which}")
        first = int(Random(f"rate/order/{self.cfg.seed}/{item_id}").random() < 0.5)
        return Item(item_id, mode, messages, replies, sources, first,
                    task.is_safety if task else None, task.kind if task and task.kind != "user" else None,
                    self.store.next_prompt_index(mode) if task else None, typed_by)

    def next_item(self, mode: str, rater: str) -> Optional[Item]:
        item = self.store.assign(mode, rater)
        if item is not None:
            return item
        with self.gen_lock:
            item = self.store.assign(mode, rater)  # another request may have made one meanwhile
            i = self.store.next_prompt_index(mode)
            if item is not None or i >= len(self.prompts[mode]):
                return item
            task = self.prompts[mode][i]
            return self.store.add_item(self.make_item(mode, task.messages, task), rater)

    def typed_item(self, mode: str, rater: str, prompt: str) -> Item:
        with self.gen_lock:
            return self.store.add_item(self.make_item(mode, [user(prompt)], typed_by=rater), rater)

    def label(self, body: dict) -> dict:
        mode = need(body, "mode", str, MODES)
        rater = rater_name(body.get("rater"))
        sub_id = need(body, "id", str)
        item = self.store.items.get(need(body, "item", str))
        if item is None or item.mode != mode:
            raise BadRequest(f"item: no {mode} item {body['item']!r}")
        make = preference_record if mode == "preference" else judgement_record
        record = {"id": sub_id, "item": item.id, "rater": rater, "time": round(time.time(), 3),
                  **make(item, body, self.annotators[mode], self.cfg.seed)}
        stored, new = self.store.add_label(mode, record)
        said = stored["annotator"]  # evaluation: A's point of view, turned back to the order the rater saw
        said = said if mode == "preference" else {"score": said if item.first == 0 else -said}
        return {"ok": True, "new": new, "annotator": said, "agrees": stored["agrees"]}


def check_settings(out: Path, cfg: RateConfig):
    """The items on disk were made by these models and settings; another run must not mix into them."""
    keys = ("a", "b", "temperature_a", "temperature_b", "prompts", "n_prompts", "world_seed", "prompt_seed",
            "max_new_tokens", "top_p", "seed")
    mine = {k: getattr(cfg, k) for k in keys}
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {mine[k]})" for k in keys if old.get(k) != mine[k]]
        if diff:
            common.die(f"{out} was started with {', '.join(diff)}: use those flags, or another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("settings.json.tmp")
        tmp.write_text(json.dumps(mine, indent=1))
        tmp.replace(path)


def item_view(item: Optional[Item], store: Store, rater: str) -> dict:
    if item is None:
        return {"item": None, "message": "No items left in this mode: thank you!"}
    first, second = item.shown()
    with store.lock:
        mine = sum(rater in store.judges[i] for i in store.order[item.mode])
    return {"item": item.id, "mode": item.mode, "messages": item.messages, "first": first, "second": second,
            "is_safety": item.is_safety, "judged_by_you": mine}


class Handler(BaseHTTPRequestHandler):
    rater: Rater  # set on the subclass that serve() makes
    token: Optional[str]

    def log_message(self, *args):  # quiet: a line per request would drown the console
        pass

    def send(self, code: int, body, ctype: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        if ctype == "text/html":
            nonce = self.nonce
            self.send_header("Content-Security-Policy", f"default-src 'none'; script-src 'nonce-{nonce}'; "
                             "style-src 'unsafe-inline'; connect-src 'self'; img-src 'none'")
        self.end_headers()
        self.wfile.write(data)

    def allowed(self, query: dict) -> bool:
        if self.token is None:
            return True
        given = (query.get("token") or [None])[0] or self.headers.get("X-Token") or \
            self.headers.get("Authorization", "").removeprefix("Bearer ")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def do_GET(self):
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if not self.allowed(q):
            return self.send(403, {"error": "token: missing or wrong (add ?token=... to the address)"})
        try:
            if url.path == "/":
                self.nonce = secrets.token_urlsafe(16)
                return self.send(200, PAGE.read_text().replace("{{NONCE}}", self.nonce), "text/html")
            if url.path == "/api/summary":
                return self.send(200, summary(self.rater.store))
            if url.path == "/api/next":
                mode = need({k: v[0] for k, v in q.items()}, "mode", str, MODES)
                who = rater_name((q.get("rater") or [None])[0])
                return self.send(200, item_view(self.rater.next_item(mode, who), self.rater.store, who))
            self.send(404, {"error": f"no page {url.path}"})
        except BadRequest as e:
            self.send(400, {"error": str(e)})
        except Exception as e:  # a bug must not drop the connection: the page shows one line, the log the traceback
            self.server_error(e)

    def do_POST(self):
        url = urlparse(self.path)
        if not self.allowed(parse_qs(url.query)):
            return self.send(403, {"error": "token: missing or wrong"})
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n > 1_000_000:
                raise BadRequest("body: larger than 1 MB")
            try:
                body = json.loads(self.rfile.read(n) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("body: not JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("body: expected a JSON object")
            if url.path == "/api/label":
                return self.send(200, self.rater.label(body))
            if url.path == "/api/prompt":
                mode, who = need(body, "mode", str, MODES), rater_name(body.get("rater"))
                text = need(body, "prompt", str).strip()
                if not text or len(text) > 2000:
                    raise BadRequest("prompt: 1 to 2000 characters")
                return self.send(200, item_view(self.rater.typed_item(mode, who, text), self.rater.store, who))
            self.send(404, {"error": f"no endpoint {url.path}"})
        except BadRequest as e:
            self.send(400, {"error": str(e)})
        except Exception as e:
            self.server_error(e)

    def server_error(self, e: Exception):
        import traceback
        traceback.print_exc()
        self.send(500, {"error": f"server error: {type(e).__name__}: {e}"})


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a rater's open connection does not keep a stopped server alive
    request_queue_size = 128  # connections waiting to be accepted: a class submitting at once (the default 5 resets)


def serve(cfg: RateConfig) -> Server:
    """Load everything and bind (not yet serving): tests run it in a thread, main() forever."""
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.token:
        common.die(f"--host {cfg.host} lets other machines in: give --token SECRET too")
    handler = type("RateHandler", (Handler,), {"rater": Rater(cfg), "token": cfg.token})
    return Server((cfg.host, cfg.port), handler)


def main(cfg: RateConfig):
    server = serve(cfg)
    host, port = server.server_address[:2]
    store = server.RequestHandlerClass.rater.store
    print(f"[rate] {sum(len(v) for v in store.labels.values())} labels and {len(store.items)} items in {cfg.out}; "
          f"serving http://{host}:{port}/" + (f"?token={cfg.token}" if cfg.token else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(common.parse_config(RateConfig, description=__doc__))
