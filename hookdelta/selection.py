"""Turning selectors into module (or parameter) paths: `hd.match` and its helpers.

A selector is a dotted-name suffix ("q_proj", "attention.self.query"), a glob over dotted
paths ("layers.*.mlp.*_proj"), a regex ("re:.*\\.(q|v)_proj"), a module type (nn.Linear),
"all-linear", a semantic layer name ("attn.q", "ffn.out", "norm"; see families.py), a
callable (name, module) -> bool, or a list of these.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Iterable, Sequence

import torch.nn as nn

from .errors import ConfigError, SelectorError, UnsupportedModuleError
from .families import expand, is_semantic

STORE_NAME = "_hookdelta"  # the reserved child that holds a model's deltas


def is_internal(path: str) -> bool:
    """True for paths inside hookdelta's own store; selection never sees those."""
    return STORE_NAME in path.split(".")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden width from its config (hidden_size / d_model / n_embd / dim), if any."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def layer_dims(model: nn.Module, module: nn.Module, path: str) -> tuple[int, int]:
    """(input width, output width) of a layer: from its weight when it is linear, else the
    model's hidden size (a block such as an MLP maps hidden -> hidden)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    width = hidden_size(model)
    if width is None:
        raise UnsupportedModuleError(
            f"cannot tell the width of {path!r} ({type(module).__name__}): it is not a linear layer and "
            "the model has no config.hidden_size; target its linear layers instead"
        )
    return width, width


def block_index(path: str) -> int | None:
    """The index of the repeated block a path lies in: its first integer component."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of the model except the root and hookdelta's own store."""
    return [(n, m) for n, m in model.named_modules() if n and not is_internal(n)]


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head and of linear layers whose weight is tied to an embedding."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # some models raise NotImplementedError here
            head = None
    embedding_weights = {id(m.weight) for _, m in named_modules(model) if isinstance(m, nn.Embedding)}
    for name, module in named_modules(model):
        if module is head or (is_linear_like(module) and id(getattr(module, "weight", None)) in embedding_weights):
            heads.add(name)
    return heads


def _hits(selector: Any, name: str, module: nn.Module | None, heads: set[str]) -> bool:
    if isinstance(selector, str):
        if selector == "all-linear":
            return module is not None and is_linear_like(module) and name not in heads
        if selector.startswith("re:"):
            return re.fullmatch(selector[3:], name) is not None
        if any(c in selector for c in "*?["):
            return fnmatch.fnmatchcase(name, selector) or fnmatch.fnmatchcase(name, "*." + selector)
        return name == selector or name.endswith("." + selector)
    if isinstance(selector, type):
        return module is not None and isinstance(module, selector)
    try:
        return bool(selector(name, module))
    except Exception as exc:
        raise SelectorError(f"the selector callable {selector!r} raised on {name!r}: {exc!r}") from exc


def _as_list(selectors: Any) -> list[Any]:
    if selectors is None:
        return []
    if isinstance(selectors, (list, tuple, set, frozenset)):
        return list(selectors)
    return [selectors]


def _describe(selector: Any) -> str:
    if isinstance(selector, type) or callable(selector):
        return getattr(selector, "__name__", repr(selector))
    return repr(selector)


def _suggest(selector: Any, names: Sequence[str]) -> str:
    if not isinstance(selector, str):
        return ""
    key = selector[3:] if selector.startswith("re:") else selector
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    close += [c for c in difflib.get_close_matches(key, names, n=3, cutoff=0.5) if c not in close]
    if not close:
        close = leaves[:8]
    return " Closest module names: " + ", ".join(close) + "."


def _select(entries: list[tuple[str, nn.Module | None]], targets: Any, exclude: Any,
            layers: Iterable[int] | None, heads: set[str], what: str, model: nn.Module) -> list[str]:
    names = [n for n, _ in entries]
    selectors = _as_list(targets)
    if not selectors:
        raise ConfigError(f"no targets given: name the {what}s to adapt (e.g. targets=['q_proj', 'v_proj'])")
    chosen: dict[str, None] = {}
    for sel in selectors:
        alternatives = expand(model, sel) if is_semantic(sel) else [sel]
        hit = [n for n, m in entries if any(_hits(s, n, m, heads) for s in alternatives)]
        if not hit:
            meaning = f" (on this model: {[_describe(s) for s in alternatives]})" if is_semantic(sel) else ""
            raise SelectorError(
                f"target selector {_describe(sel)}{meaning} matched no {what} of {type(model).__name__}."
                + _suggest(sel, names)
                + " Use hd.match(model, targets) to try selectors without attaching."
            )
        chosen.update(dict.fromkeys(hit))
    excluded = [s for e in _as_list(exclude) for s in (expand(model, e) if is_semantic(e) else [e])]
    if excluded:
        by_name = dict(entries)
        chosen = {n: None for n in chosen if not any(_hits(s, n, by_name[n], heads) for s in excluded)}
    if layers is not None:
        wanted = set(layers)
        chosen = {n: None for n in chosen if block_index(n) in wanted}
    order = {n: i for i, n in enumerate(names)}
    chosen = dict.fromkeys(sorted(chosen, key=order.__getitem__))  # model order, not selector order
    if not chosen:
        raise SelectorError(
            f"targets {_describe(targets)} matched {what}s, but exclude={_describe(exclude)} and "
            f"layers={list(layers) if layers is not None else None} removed them all; loosen one of them"
        )
    return list(chosen)


def match(model: nn.Module, targets: Any, exclude: Any = None,
          layers: Iterable[int] | None = None) -> list[str]:
    """Dry run: the module paths that `targets` selects (minus `exclude`, within `layers`).

    Raises SelectorError naming the selector and the closest module names when one matches nothing.
    """
    entries: list[tuple[str, nn.Module | None]] = list(named_modules(model))
    layers = list(layers) if layers is not None else None
    return _select(entries, targets, exclude, layers, output_head_paths(model), "module", model)


def match_parameters(model: nn.Module, targets: Any, exclude: Any = None,
                     layers: Iterable[int] | None = None) -> list[str]:
    """Like `match`, over parameter paths ("mlp.experts.gate_up_proj"); tied copies appear once."""
    entries: list[tuple[str, nn.Module | None]] = [
        (n, None) for n, _ in model.named_parameters() if not is_internal(n)
    ]
    layers = list(layers) if layers is not None else None
    return _select(entries, targets, exclude, layers, set(), "parameter", model)
