"""data.py: readers of your own data files, for the stages that can learn from them instead of the world (world.py).

  pretrain.py --data a.txt b.txt   read_text_files: UTF-8 text, one document per file (§2)
  sft.py --data dialogs.jsonl      read_dialogs_jsonl: {"messages": [{"role", "content"}, ...]} ending with the reply
                                   to learn (§3.1); write_dialogs_jsonl writes it (RS and GAtt hand their sets to SFT)
  reward.py --data prefs.jsonl     read_preferences_jsonl: {"prompt", "chosen", "rejected", "rating", "category"}
                                   (§3.2.1); prompt is a string or a messages list, ratings take short aliases
  evaluate.py --prompts p.jsonl    read_rl_prompts_jsonl: {"messages" ending with a user turn, "is_safety"} (§3.4)
The JSONL files follow the common chat conventions: an optional system message, then user/assistant turns from the
user; "weight": 0 marks an assistant turn that is context, not learned. A bad line fails at once with
"path:line: reason", never halfway into training, and an empty dataset names its file. Input is bounded: a line longer
than MAX_LINE_BYTES, or a text file larger than MAX_TEXT_FILE_BYTES, is refused with its size before it is read whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from annotator import RATINGS, Preference
from world import Task, user


class DataError(ValueError):
    pass


# Bounds on what a reader takes in, so that a wrong file fails at once with its size instead of filling memory.
MAX_LINE_BYTES = 1 << 20  # 1 MiB a JSONL line: a long dialog is tens of kB, so a longer line is a broken file
MAX_TEXT_FILE_BYTES = 1 << 30  # 1 GiB a text file: each file is one document, read whole into memory

RATING_ALIASES = {**{r: r for r in RATINGS}, "significantly better": RATINGS[0], "better": RATINGS[1],
                  "slightly better": RATINGS[2], "negligibly better": RATINGS[3], "unsure": RATINGS[3]}


def read_text_files(paths) -> list[str]:
    """Pretraining text: one document per file (pretrain.py packs documents into sequences)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("no text files given")
    docs = []
    for path in map(Path, paths):
        try:
            size = path.stat().st_size
            text = path.read_text(encoding="utf-8") if size <= MAX_TEXT_FILE_BYTES else None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
        if text is None:
            raise DataError(f"{path}: file of {size} bytes is larger than the limit of {MAX_TEXT_FILE_BYTES} bytes")
        if not text.strip():
            raise DataError(f"{path}: empty file (no text to pretrain on)")
        docs.append(text)
    return docs


def _lines(f, path):
    """(line number, text) for each line of the binary file f, a line read only once it is known to fit the limit."""
    lineno = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):  # at most the limit and one byte more: never a whole huge line
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            n = len(raw)
            while (rest := f.readline(1 << 16)) and not rest.endswith(b"\n"):  # count the rest, 64 kB at a time
                n += len(rest)
            n += len(rest.rstrip(b"\n"))
            raise DataError(f"{path}:{lineno}: line of {n} bytes is longer than the limit of {MAX_LINE_BYTES} bytes")
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not valid UTF-8") from None


def _read_jsonl(path, parse: Callable[[dict, str], object], what: str) -> list:
    path, out = Path(path), []
    try:
        with open(path, "rb") as f:
            for lineno, line in _lines(f, path):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: bad JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                out.append(parse(record, where))
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    if not out:
        raise DataError(f"{path}: empty dataset (no {what} found)")
    return out


def _field(record: dict, key: str, kind, where: str):
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
        raise DataError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, "
                        f"got {type(record[key]).__name__}")
    return record[key]


def _messages(value, where: str, last_role: str) -> list[dict]:
    """The chat format's rules: optional system, then user/assistant alternating from user, ending in last_role."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {j} has role {role!r}; expected 'system', 'user' or 'assistant'")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {j} content must be a string, got {type(content).__name__}")
        msg = {"role": role, "content": content}
        if "weight" in m:  # fine-tuning JSONL convention: an assistant turn with weight 0 is context, not trained
            if role != "assistant" or m["weight"] not in (0, 1):
                raise DataError(f"{where}: message {j}: 'weight' must be 0 or 1 and only on assistant messages")
            msg["weight"] = m["weight"]
        out.append(msg)
    roles = [m["role"] for m in out[1:]] if out[0]["role"] == "system" else [m["role"] for m in out]
    if not roles or any(r != ("user", "assistant")[k % 2] for k, r in enumerate(roles)):
        raise DataError(f"{where}: roles must alternate user/assistant starting with user (after an optional system)")
    if roles[-1] != last_role:
        raise DataError(f"{where}: the last message must have role {last_role!r}")
    return out


def read_dialogs_jsonl(path) -> list[list[dict]]:
    """SFT dialogs: {"messages": [{"role", "content"}, ...]} ending with the assistant reply to train on."""
    return _read_jsonl(path, lambda r, w: _messages(_field(r, "messages", list, w), w, "assistant"), "dialogs")


def write_dialogs_jsonl(path, dialogs: list[list[dict]]) -> None:
    """The format read_dialogs_jsonl reads, one {"messages": [...]} per line: what RS and GAtt hand to sft.py."""
    Path(path).write_text("".join(json.dumps({"messages": m}) + "\n" for m in dialogs))


def _parse_preference(r: dict, where: str) -> Preference:
    prompt = r.get("prompt")
    if isinstance(prompt, str):
        prompt = [user(prompt)]
    elif not isinstance(prompt, list):
        raise DataError(f"{where}: " + ("missing field 'prompt'" if "prompt" not in r else
                                        "field 'prompt' must be a string or a messages list"))
    messages = _messages(prompt, where, "user")
    chosen, rejected = _field(r, "chosen", str, where), _field(r, "rejected", str, where)
    rating = RATING_ALIASES.get(" ".join(str(_field(r, "rating", str, where)).lower().replace("_", " ").split()))
    if rating is None:
        raise DataError(f"{where}: unknown rating {r['rating']!r}; expected one of {RATINGS} or a short alias")
    category = _field(r, "category", str, where)
    if category not in ("helpfulness", "safety"):
        raise DataError(f"{where}: category must be 'helpfulness' or 'safety', got {category!r}")
    sources = r.get("sources")  # optional: written by reward.collect_preferences, read for accuracy by source
    if sources is not None and not (isinstance(sources, list) and len(sources) == 2
                                    and all(isinstance(x, str) for x in sources)):
        raise DataError(f"{where}: field 'sources' must be a list of two strings (chosen's, rejected's)")
    kind = r.get("kind")  # optional, also written by collect_preferences: Table 8 by task kind
    if kind is not None and not isinstance(kind, str):
        raise DataError(f"{where}: field 'kind' must be a string (the prompt's task kind), got {kind!r}")
    return Preference(messages, chosen, rejected, rating, category, r.get("safety_label"),
                      tuple(sources) if sources else None, kind)


def read_preferences_jsonl(path) -> list[Preference]:
    """Preference pairs: {"prompt", "chosen", "rejected", "rating", "category"}; prompt is a string or messages."""
    return _read_jsonl(path, _parse_preference, "preference pairs")


def read_rl_prompts_jsonl(path) -> list[Task]:
    """RL prompts: {"messages" (ending with a user turn), "is_safety"}; returned as Tasks of kind "user"."""
    def parse(r: dict, where: str) -> Task:
        messages = _messages(_field(r, "messages", list, where), where, "user")
        return Task("user", messages, "", _field(r, "is_safety", bool, where), {})
    return _read_jsonl(path, parse, "prompts")


