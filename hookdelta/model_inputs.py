"""Reading and rewriting a transformers model's forward inputs, for the methods that change
them (soft prompts, prefixes): which argument holds the key/value cache, how long it is,
how wide the attention is, where the input embeddings live.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
import torch.nn as nn

from .errors import UnsupportedModuleError


@cache
def _positional(cls: type[nn.Module]) -> tuple[tuple[str, ...], frozenset[str]]:
    params = inspect.signature(cls.forward).parameters.values()
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[1:]
    return positional, frozenset(p.name for p in params)


def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All of a call's inputs by name (positional ones named after forward's signature)."""
    if not args:
        return dict(kwargs)
    names, _ = _positional(type(module))  # type: ignore[arg-type]  # (mypy: a class is not Hashable)
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional inputs")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def accepts(module: nn.Module, name: str) -> bool:
    return name in _positional(type(module))[1]  # type: ignore[arg-type]  # (mypy: a class is not Hashable)


def cache_argument(module: nn.Module) -> str:
    """The name forward uses for the key/value cache: `cache` (transformers >= 5.x) or `past_key_values`."""
    for name in ("cache", "past_key_values"):
        if accepts(module, name):
            return name
    raise UnsupportedModuleError(
        f"{type(module).__name__}.forward takes no key/value cache argument, so a prefix cannot be passed in"
    )


def cache_length(cache: Any) -> int:
    """Tokens already held by a cache (a Cache object or the legacy tuple of (k, v) pairs)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def check_growable(cache: Any, what: str, tokens: int) -> None:
    """Refuse a preallocated cache (generate(cache_implementation="static"), sliding-window or
    hybrid caches): it is sized for the real tokens only and has no room for virtual ones."""
    if cache is not None and getattr(cache, "is_compileable", False):
        raise UnsupportedModuleError(
            f"{what} adds {tokens} virtual tokens in front of the input, but the model was given a preallocated "
            f"{type(cache).__name__} (e.g. generate(cache_implementation='static')), sized for the real tokens only. "
            "Use the default dynamic cache (drop cache_implementation), or a LoRA-style delta, which works with "
            "any cache"
        )


def path_of(model: nn.Module, target: nn.Module) -> str:
    """The dotted path of a submodule (found by identity)."""
    return next(p for p, m in model.named_modules() if m is target)


def input_embeddings_path(model: nn.Module) -> str:
    """The path of the model's token embedding layer."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Embedding):
        return path_of(model, embedding)
    raise UnsupportedModuleError(
        f"{type(model).__name__} has no token embedding layer (get_input_embeddings() gives "
        f"{type(embedding).__name__}); prompt and prefix methods need a text model's nn.Embedding"
    )


def cache_taker(model: nn.Module) -> tuple[str, nn.Module]:
    """The path and module of the outermost model (the model itself or its transformers
    `base_model`) whose forward takes a key/value cache argument."""
    for module in (model, getattr(model, "base_model", None)):
        if module is not None and any(accepts(module, n) for n in ("cache", "past_key_values")):
            return path_of(model, module), module
    raise UnsupportedModuleError(
        f"{type(model).__name__}.forward takes no key/value cache argument, so a prefix cannot be passed in"
    )


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from the model's config."""
    config: Any = getattr(model, "config", None)  # (None: the AttributeError below)
    try:
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError:
        raise UnsupportedModuleError(
            f"cannot read layers/heads/head size from {type(model).__name__}'s config; prefix tuning needs a "
            "transformers model"
        ) from None
    return int(layers), int(kv_heads), int(head_dim)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def prepend(tensor: torch.Tensor | None, count: int, fill: float) -> torch.Tensor | None:
    """`count` columns of `fill` in front of a [batch, seq] tensor (None stays None)."""
    if tensor is None or tensor.dim() != 2:
        return tensor
    pad = torch.full((tensor.shape[0], count), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def main_input(kw: dict[str, Any]) -> torch.Tensor:
    """The call's token input, [batch, seq(, hidden)]: input_ids, else inputs_embeds."""
    source = kw.get("input_ids")
    if source is None:
        source = kw.get("inputs_embeds")
    if source is None:
        raise ValueError("virtual tokens need the call's input_ids or inputs_embeds")
    return source


def widen_mask(kw: dict[str, Any], count: int, unwidened: int) -> None:
    """Put `count` ones in front of kw's 2-D attention_mask if it still has its `unwidened`
    length (a mask another hook, or the caller, already widened is left alone)."""
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[-1] == unwidened:
        kw["attention_mask"] = prepend(mask, count, 1)
