"""The Llama 2 tokenizer and chat format: text <-> token ids, and a dialog -> (tokens, loss_mask).

What it does:
- `Tokenizer` wraps a SentencePiece model. It loads Meta's own Llama 2 tokenizer.model unchanged and gives exactly the
  ids sentencepiece gives, so real Llama 2 checkpoints can be used with it.
- `train_tokenizer` trains a new SentencePiece BPE model on our own corpus with Meta's trainer settings (§2.2), only
  with a much smaller vocabulary (a few hundred to a few thousand pieces instead of 32k).
- `Tokenizer.encode_dialog` renders a chat in the Llama 2-Chat format of Meta's generation.py (chat_completion), token
  for token, together with the loss mask that SFT, rejection sampling and GAtt train on (§3.1: loss on answers only).

Paper: §2.2 "Tokenizer": the tokenizer of Llama 1, BPE as implemented by SentencePiece, every number split into single
digits, unknown UTF-8 characters decomposed into bytes (byte fallback), a 32k vocabulary. The chat format is not in
the paper; it comes from Meta's reference code (llama/generation.py).

Run it (a teaching aid: look at what the model actually sees):
    python tokenizer.py --model ../shared/llama2/tokenizer.model --text "In 2023, Llama 2 👋"
    echo '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]' | \
        python tokenizer.py --model ../shared/llama2/tokenizer.model --chat

Choices where the paper is silent:
1. Training input is split into lines; each non-empty line is one SentencePiece "sentence", as sentencepiece reads
   Meta's text files. So "\n" is never merged into a piece and becomes the byte piece <0x0A>, as in Meta's model.
   Lines longer than max_sentence_length (sentencepiece's default, which Meta kept) are skipped by sentencepiece.
2. A corpus too small for the requested vocabulary: sentencepiece refuses and says the largest size it can build;
   we retrain at that size and print the reduction to stderr, rather than fail a miniature run.
3. Determinism: at most `max_sentences` lines are used, sampled by us with a seeded RNG (sentencepiece's own sampler
   cannot be reseeded within a process); the BPE merges are deterministic. Same corpus + seed -> the same model file,
   byte for byte.
4. Loss mask: 1 on every token of an assistant answer, on the space token that separates "[/INST]" from the answer
   (the generation prompt ends at "[/INST]", so the model must produce that space itself), on the trailing space Meta
   appends, and on the pair's EOS (the model must learn to stop). 0 on BOS, tags, system prompt and user text.
5. A dialog may end with an assistant message (a complete training example) or with a user message (a prompt for
   generation, as in Meta's chat_completion). Special tags are not rejected here: see has_special_tags.
6. No pad piece (pad_id -1, as Meta's): batching code pads with an id of its choice and masks it out.
"""
import argparse
import io
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm

# -----------------------------------------------------------------------------
# The chat format (Meta's llama/generation.py). These are plain text, not special tokens: "[INST]" is several pieces.

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

N_SPECIAL = 3  # <unk>=0, <s>=1 (BOS), </s>=2 (EOS); then the 256 byte pieces <0x00>..<0xFF> are ids 3..258


def has_special_tags(messages: list[dict]) -> bool:
    """True if any message of any role contains a chat tag. Meta's chat_completion still generates for such a dialog
    but replaces the reply with UNSAFE_ERROR: a user must not be able to forge a system prompt or a model turn."""
    return any(tag in msg["content"] for msg in messages for tag in SPECIAL_TAGS)


class Tokenizer:
    """A SentencePiece model: Meta's Llama 2 tokenizer.model or one made by train_tokenizer."""

    def __init__(self, model_path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.Load(str(path))
        except Exception as e:  # sentencepiece raises RuntimeError or OSError depending on its version
            raise ValueError(f"not a valid SentencePiece model: {path} ({e})") from e
        self.model_path = str(path)
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 in Meta's model: there is no pad piece

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        ids = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Exactly sentencepiece's decode (BOS/EOS decode to ""; out-of-range ids, pad -1 included, raise IndexError).
        Takes a list of ints or a 1-D torch/numpy array."""
        if hasattr(ids, "tolist"):  # torch.Tensor or numpy array -> python ints
            ids = ids.tolist()
        return self.sp_model.decode([int(i) for i in ids])

    def _encode_with_spans(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids of s (no BOS/EOS) and, for each, the (begin, end) character offsets in s of the text it covers.
        A piece with a leading "▁" begins at the space it stands for (the dummy prefix of the first piece is not in s,
        so that piece begins at 0). The byte pieces of one character begin where the character does."""
        if hasattr(self.sp_model, "EncodeAsOffsetMapping"):  # sentencepiece >= 0.2.1
            om = self.sp_model.encode(s, out_type="offset_mapping")
            return list(om["ids"]), [tuple(span) for span in om["offsets"]]
        proto = self.sp_model.encode(s, out_type="immutable_proto")  # older versions; str in -> character offsets
        return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]

    def _encode_pair(self, user: str, answer: str) -> tuple[list[int], list[int]]:
        """One finished turn, as Meta encodes it: a single string, BOS + ... + EOS. The mask is found from the pieces'
        offsets in that string, not by encoding the prompt alone: BPE need not split a prefix the same way on its own."""
        prompt = f"{B_INST} {user.strip()} {E_INST}"
        text = f"{prompt} {answer.strip()} "
        ids, spans = self._encode_with_spans(text)
        cut = len(prompt)  # offset of the space before the answer: the first piece we train on begins there
        if spans[-1][1] != len(text) or any(b < cut < e for b, e in spans):  # impossible with split_by_whitespace
            raise RuntimeError(f"cannot split the pieces of {text!r} exactly at the prompt/answer boundary")
        mask = [int(b >= cut) for b, _ in spans]
        return [self.bos_id] + ids + [self.eos_id], [0] + mask + [1]  # BOS untrained; EOS trained (learn to stop)

    def encode_dialog(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A chat in the Llama 2-Chat format -> (tokens, loss_mask), equal lengths, loss_mask 1 = trained on.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], an optional system message first,
        then user/assistant alternating, starting with user. Layout (Meta's chat_completion), per finished pair:
            <s>[INST] {B_SYS}{system}{E_SYS}{user} [/INST] {answer} </s>   (system in the first pair only)
        and, if the dialog ends with a user message, the open turn <s>[INST] {user} [/INST] (no EOS, mask all 0).
        An assistant message with "weight": 0 (the convention of common fine-tuning JSONL) is context only: its loss
        mask is 0. Ghost Attention (§3.3) uses it to train on the last turn of a dialog alone."""
        turns = _check_dialog(messages)
        answers = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        tokens, loss_mask = [], []
        for i in range(0, len(turns) - 1, 2):
            ids, mask = self._encode_pair(turns[i], turns[i + 1])
            if answers[i // 2].get("weight", 1) == 0:
                mask = [0] * len(mask)
            tokens += ids
            loss_mask += mask
        if len(turns) % 2 == 1:  # ends with a user message: the prompt the model answers
            ids = self.encode(f"{B_INST} {turns[-1].strip()} {E_INST}", bos=True, eos=False)
            tokens += ids
            loss_mask += [0] * len(ids)
        return tokens, loss_mask


def _check_dialog(messages: list[dict]) -> list[str]:
    """Validate roles/contents and merge a leading system message into the first user message (before .strip(),
    as Meta does). Returns the contents of the user/assistant turns in order."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a dialog must be a non-empty list of {'role', 'content'} messages")
    offset = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} ({role}): content must be a str, got {type(msg.get('content')).__name__}")
        if "weight" in msg and (role != "assistant" or msg["weight"] not in (0, 1)):
            raise ValueError(f"message {i} ({role}): weight must be 0 or 1, and only on assistant messages")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} (system): a system message is only allowed first")
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise ValueError(f"message {i} ({role}): expected {expected}; roles must alternate user/assistant, "
                             f"starting with user (after an optional system message)")
    if len(messages) == offset:
        raise ValueError("message 0 (system): a system message must be followed by a user message")
    turns = [m["content"] for m in messages[offset:]]
    if offset:
        turns[0] = B_SYS + messages[0]["content"] + E_SYS + turns[0]
    return turns


# -----------------------------------------------------------------------------
# Training a tokenizer with Llama 2's settings (§2.2)

def _llama2_trainer_settings(vocab_size: int) -> dict:
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,  # §2.2: "we split all numbers into individual digits"
        byte_fallback=True,  # §2.2: unknown UTF-8 characters -> byte pieces <0x00>..<0xFF>, never <unk>
        allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become pieces like "▁▁▁▁"
        normalization_rule_name="identity",  # no NFKC: the text is tokenized as written
        add_dummy_prefix=True,  # "Hello" and " Hello" both start with the piece "▁Hello"
        remove_extra_whitespaces=False,  # keep every space: decode(encode(s)) == s
        max_sentencepiece_length=16,
        character_coverage=0.99995,  # characters rarer than this share go through byte fallback
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # so the byte pieces are ids 3..258
        input_sentence_size=0,  # use every sentence we pass: we sample them ourselves, see _sample_lines
        num_threads=4,  # the merges do not depend on it; a few threads only speed up counting
        minloglevel=2,  # quiet: sentencepiece logs every merge step at INFO
    )


def _sample_lines(path: Path, n_lines: int, k: int, seed: int):
    """Yield k of the n_lines lines of path, each k-subset equally likely, in file order, in one pass (Knuth's
    selection sampling). Ours rather than sentencepiece's input_sentence_size: its RNG is seeded once per process, so
    set_random_generator_seed has no effect after the first training in a process."""
    rng, need = random.Random(seed), min(k, n_lines)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if rng.random() * (n_lines - i) < need:  # P(take) = still needed / still left
                need -= 1
                yield line.rstrip("\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path, *, max_sentences: int = 2_000_000,
                    seed: int = 0) -> Tokenizer:
    """Train a SentencePiece BPE model on texts (an iterable of strings, e.g. documents) with Llama 2's settings and
    write it atomically to out_path. At most max_sentences lines are used (a seeded sample; Meta used 200M).
    If the corpus cannot fill vocab_size pieces, the vocabulary is reduced to the largest size sentencepiece accepts
    and the reduction is printed to stderr."""
    if vocab_size <= N_SPECIAL + 256:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback alone needs {N_SPECIAL} special + 256 byte "
                         f"pieces, plus one piece per character of the corpus; use at least a few hundred")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        # The corpus goes to a temporary file, one sentence per line, so that it can be sampled and re-read on retry
        # without holding it in memory.
        corpus, n_lines = Path(tmp) / "corpus.txt", 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in [texts] if isinstance(texts, str) else texts:  # one string is one text, not its characters
                for line in text.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
                        n_lines += 1
        if n_lines == 0:
            raise ValueError("train_tokenizer: texts hold no non-empty line to train on")
        size = vocab_size
        for _ in range(3):  # the size sentencepiece proposes normally works at once; bounded in case it does not
            writer = io.BytesIO()
            try:  # sentence_iterator, not input=path, which the model file would record
                spm.SentencePieceTrainer.train(sentence_iterator=_sample_lines(corpus, n_lines, max_sentences, seed),
                                               model_writer=writer, **_llama2_trainer_settings(size))
                break
            except RuntimeError as e:
                msg = str(e)
                too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
                if too_small:
                    raise ValueError(f"vocab_size {size} is smaller than the {too_small.group(2)} pieces this corpus "
                                     f"needs ({N_SPECIAL} special + 256 bytes + its characters)") from e
                too_high = re.search(r"Vocabulary size too high.*<= (\d+)", msg)
                if not too_high or int(too_high.group(1)) <= N_SPECIAL + 256:
                    raise RuntimeError(f"sentencepiece could not train a {size}-piece tokenizer on this corpus: {msg}")
                print(f"train_tokenizer: corpus too small for vocab_size {size}; reducing to {too_high.group(1)}",
                      file=sys.stderr)
                size = int(too_high.group(1))
        else:
            raise RuntimeError(f"sentencepiece kept refusing the vocabulary size (last tried {size})")
        # Atomic write: a crash leaves either the old file or the new one, never half a model.
        part = Path(tmp) / "tokenizer.model"
        part.write_bytes(writer.getvalue())
        os.replace(part, out_path)
    return Tokenizer(out_path)


# -----------------------------------------------------------------------------
# CLI: look at the pieces

def _main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Show how a SentencePiece model tokenizes text or a Llama 2 chat.")
    p.add_argument("--model", required=True, help="path to tokenizer.model")
    p.add_argument("--text", help="text to encode (with BOS): prints id and piece per token")
    p.add_argument("--chat", action="store_true", help="encode a JSON dialog (stdin or --dialog) and show its mask")
    p.add_argument("--dialog", help="JSON file with a list of {role, content} messages (implies --chat)")
    args = p.parse_args(argv)
    if args.text is None and not (args.chat or args.dialog):
        p.error("give --text or --chat/--dialog")
    try:
        tok = Tokenizer(args.model)
        if args.text is not None:
            ids, mask = tok.encode(args.text, bos=True, eos=False), None
        else:
            raw = Path(args.dialog).read_text(encoding="utf-8") if args.dialog else sys.stdin.read()
            ids, mask = tok.encode_dialog(json.loads(raw))
    except (OSError, ValueError) as e:  # missing/invalid model, bad JSON, bad dialog: one line, no traceback
        p.error(str(e))
    print(f"{len(ids)} tokens, vocabulary {tok.n_words}" + ("; '*' = trained on (loss_mask 1)" if mask else ""))
    for k, i in enumerate(ids):
        mark = ("*" if mask[k] else " ") if mask else ""
        print(f"{mark}{i:>7}  {tok.sp_model.id_to_piece(i)!r}")
    if mask:
        print("trained text:", repr(tok.decode([i for i, m in zip(ids, mask) if m and i != tok.eos_id])))


if __name__ == "__main__":
    _main()
