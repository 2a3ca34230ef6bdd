"""Files are untrusted: what every loader checks before it allocates or believes anything.

- JSON: its size before reading it, its nesting after parsing, and every string in it that could
  run as a regular expression (selectors, rank and alpha patterns, PEFT's target_modules):
  patterns whose matching time can grow exponentially (an unbounded repeat of a group that
  itself repeats or alternates, `(a+)+`, `(a|aa)*`) are refused, so a crafted file cannot hang
  the loader.
- The delta a file describes is first built on a meta copy of the model (`plan`: shapes and
  dtypes, no memory), and compared with the tensors the file holds (`check_plan`): a config
  that disagrees with its tensors (a rank edited by hand) is refused naming the tensor, both
  shapes and the config's fields behind them, before the real delta is built. The real build then
  allocates exactly what the file's own tensors imply (and what the method regenerates from them,
  such as VeRA's seeded bases), or less than an explicit `max_bytes`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import DeltaFileError, HookdeltaError
from .modules import is_internal
from .sharding import shape

MAX_JSON_BYTES = 16 * 2**20  # a delta.json or adapter_config.json is a few KB; rank patterns a few hundred
MAX_DEPTH = 32  # configs nest three or four levels
MAX_PATTERN = 4096  # characters in one pattern


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file from an untrusted source: bounded in size and nesting, its patterns screened."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DeltaFileError(
            f"{path} is {size:,} bytes; a {what} is a few KB (the limit is {MAX_JSON_BYTES:,}). "
            "It is not a delta description, or it was damaged"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        data = None
        deep = True
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeltaFileError(f"{path} is not valid JSON ({exc}); the {what} is corrupt or truncated") from None
    else:
        deep = depth(data) > MAX_DEPTH
    if deep:
        raise DeltaFileError(
            f"{path} nests deeper than {MAX_DEPTH} levels; a {what} never does. It was damaged or crafted"
        )
    screen(data, str(path))
    return data


def depth(data: Any) -> int:
    """How deeply lists and objects nest (iteratively: a crafted file cannot exhaust the stack)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack += [(v, level + 1) for v in item]
    return deepest


def screen(data: Any, where: str) -> None:
    """Refuse strings (keys or values) that are patterns whose matching can take exponential time."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            why = risky_pattern(item[3:] if item.startswith("re:") else item)
            if why:
                raise DeltaFileError(
                    f"{where} holds the pattern {item[:80]!r}, which {why}: matching it could take "
                    "exponential time, so the file is not read. Write it without the nested repeat"
                )


_UNBOUNDED = re.compile(r"[*+]|\{\d*,\d*\}")


def risky_pattern(text: str) -> str | None:
    """Why `text`, as a regular expression, could backtrack exponentially (None: it cannot by
    this test): too long, or an unbounded repeat (`*`, `+`, `{n,}`) of a group that holds a
    repeat or an alternation. Conservative: a few harmless patterns are refused too."""
    if len(text) > MAX_PATTERN:
        return f"is longer than {MAX_PATTERN} characters"
    if not any(c in text for c in "*+{"):
        return None
    groups: list[list[bool]] = []  # per open group: [holds a repeat or an alternation]
    i = 0
    closed: bool | None = None  # what the group that just closed held
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            closed = None
            continue
        if c == "[":  # a character class: its characters are literal
            j = i + 1
            if j < len(text) and text[j] == "^":
                j += 1
            if j < len(text) and text[j] == "]":
                j += 1
            while j < len(text) and text[j] != "]":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            closed = None
            continue
        if c == "(":
            groups.append([False])
            closed = None
        elif c == ")":
            held = groups.pop()[0] if groups else False
            closed = held
            if groups and held:
                groups[-1][0] = True
            i += 1
            continue
        elif c == "|":
            if groups:
                groups[-1][0] = True
            closed = None
        else:
            repeat = _UNBOUNDED.match(text, i)
            if repeat:
                if closed:
                    return "repeats a group that itself repeats or alternates"
                if groups:
                    groups[-1][0] = True
                i = repeat.end()
                closed = None
                continue
            closed = None
        i += 1
    return None


# -- the delta a file describes, before it is built --------------------------------------------------


def meta_copy(model: nn.Module) -> nn.Module:
    """The module tree of `model` with every parameter and buffer on the meta device (shared
    tensors stay shared): the model as a delta's build sees it, without its memory."""
    tensors: dict[int, Any] = {}
    modules: dict[int, nn.Module] = {}

    def meta(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in tensors:
            empty = torch.empty(shape(t), dtype=t.dtype, device="meta")  # (a sharded tensor's whole shape)
            tensors[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
        return tensors[id(t)]

    def clone(m: nn.Module) -> nn.Module:
        if id(m) not in modules:
            # a bare instance with its own copies of the dicts below (copy.copy would share them, and
            # parametrized modules refuse to be copied at all)
            c = object.__new__(type(m))  # (not type(m).__new__: FSDP2's classes run __init__ in theirs)
            c.__dict__ = dict(m.__dict__)
            modules[id(m)] = c
            c._parameters = {k: meta(v) for k, v in m._parameters.items()}
            c._buffers = {k: meta(v) for k, v in m._buffers.items()}
            # the deltas already attached (hookdelta's own child) stay as they are: a block that
            # combines them (hd.average, ...) reads them; nothing is built into them
            c._modules = {k: v if v is None or is_internal(k) else clone(v) for k, v in m._modules.items()}
        return modules[id(m)]

    return clone(model)


class Plan:
    """The tensors a delta will hold, from a build on a meta copy of the model (nothing allocated):
    `saved` (its state, what a file holds: key -> shape), `bytes` (everything it allocates, its
    regenerated buffers included) and `trainable` (the numbers an optimizer will update)."""

    def __init__(self, model: nn.Module, config: Any, sites: list[str], train: list[str]) -> None:
        from . import inits
        from .also_train import build_copies
        from .placement import dry_run

        shadow = meta_copy(model)
        try:
            with torch.device("meta"), dry_run(), inits.loading(), torch.no_grad():
                pieces = config.build(shadow, sites) + build_copies(shadow, train, tie=config.tie_also_train)
        except HookdeltaError:
            raise
        except Exception as exc:  # noqa: BLE001 (a method's build on layers it was not written for: refuse, by name)
            raise DeltaFileError(
                f"the {config.method} delta described cannot be built on this model: {type(exc).__name__}: {exc}"
            ) from exc
        self.config = config
        self.saved: dict[str, tuple[int, ...]] = {}
        every: dict[int, torch.Tensor] = {}
        for piece in pieces:
            for name, t in piece.state_dict(keep_vars=True).items():
                self.saved[f"{piece.key}.{name}"] = tuple(t.shape)
            every.update({id(t): t for t in list(piece.parameters()) + list(piece.buffers())})
        self.bytes = sum(t.numel() * t.element_size() for t in every.values())
        self.trainable = sum(t.numel() for t in every.values() if isinstance(t, nn.Parameter) and t.requires_grad)

    def check(self, found: Mapping[str, Sequence[int]], where: Any, max_bytes: int | None = None) -> None:
        """The file's tensors (key -> shape) are exactly the saved state the config builds, and
        the delta fits `max_bytes`; else a DeltaFileError naming the tensor, both shapes and the
        config fields behind the shape. Called before the real build allocates anything."""
        missing, extra = sorted(set(self.saved) - set(found)), sorted(set(found) - set(self.saved))
        if missing or extra:
            raise DeltaFileError(
                f"{where}: the file's tensors are not the ones its config describes (missing "
                f"{missing[:3]}, extra {extra[:3]}); the config or the tensors were edited or "
                "damaged. Nothing was built"
            )
        bad = [k for k in self.saved if tuple(self.saved[k]) != tuple(found[k])]
        if bad:
            want, got = self.saved[bad[0]], tuple(found[bad[0]])
            raise DeltaFileError(
                f"{where}: on this model the config makes {bad[0]!r} of shape {list(want)}"
                f"{_because(self.config, want, got)}, but the file holds {list(got)} ({len(bad)} "
                "tensors differ): the file was saved for a model of another size, or its config and "
                "tensors were edited apart. Nothing was built"
            )
        if max_bytes is not None and self.bytes > max_bytes:
            raise DeltaFileError(
                f"{where}: the delta would take {self.bytes:,} bytes, more than max_bytes="
                f"{max_bytes:,}. Nothing was built"
            )


def _because(config: Any, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    """' (from r=2000000)': the config's whole-number fields whose value is a dimension that
    differs, the likely reason for the shape."""
    odd = {w for w, g in zip(want, got, strict=False) if w != g} | (set(want) - set(got))
    named = [
        f"{name}={value}"
        for name, value in sorted(vars(config).items())
        if isinstance(value, int) and not isinstance(value, bool) and value in odd
    ]
    return f" (from {', '.join(named)})" if named else ""


def is_int(v: Any) -> bool:
    """A whole number as JSON has it (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite number as JSON has it (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def header(path: str | os.PathLike) -> dict[str, list[int]]:
    """A safetensors file's tensor names and shapes from its header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own types for bad headers)
        raise DeltaFileError(f"{path} is corrupt or truncated ({exc}); re-save the delta") from None
