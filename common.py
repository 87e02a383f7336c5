"""Plumbing shared by every script, as plain functions (no Trainer class): each stage keeps its own loop in main(cfg).

This part: dataclass -> command-line flags, device / dtype / autocast choice, small printing helpers.
The training plumbing (torchrun, optimizer, schedule, checkpoints, progress) joins it as the stages need it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import re
import sys
import typing
from typing import Optional

import torch


# ---- configuration: one @dataclass per script, its fields are the flags -------------------------------------------
def _field_comments(cls) -> dict[str, str]:
    """The comment after each field in the dataclass source becomes its --help text (nanoGPT's readable config block,
    without exec): `lr: float = 2e-5  # §3.1: initial lr` -> help "§3.1: initial lr"."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def _parse_optional(inner):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else inner(s)
    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def build_parser(cls, description: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{helps.get(f.name, '')} (default: {default})".strip()
        args = typing.get_args(typ)
        if typing.get_origin(typ) is typing.Union and type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            p.add_argument(flag, type=_parse_optional(inner), default=default, help=help_text, metavar=inner.__name__.upper())
        elif typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(typ) is list:
            p.add_argument(flag, type=args[0], nargs="*", default=default, help=help_text)
        else:
            p.add_argument(flag, type=typ, default=default, help=help_text, metavar=typ.__name__.upper())
    return p


def parse_config(cls, argv=None, description: Optional[str] = None):
    """Build the dataclass `cls` from command-line flags (`python X.py --help` lists every field with its default)."""
    ns = build_parser(cls, description).parse_args(argv)
    return cls(**vars(ns))


# ---- device and precision ----------------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available on this machine")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast. auto: bf16 on GPUs that have it, else fp16 (with a GradScaler); fp32 on CPU
    (CPU bf16 matmuls are slower than fp32 on most laptops and the miniature models are tiny)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise SystemExit(f"error: --dtype {name}: choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in dtype, weights and optimizer state stay fp32. A no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def die(msg: str, code: int = 2):
    """One clear line on stderr and a non-zero exit, instead of a traceback, for errors the user can fix."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)
