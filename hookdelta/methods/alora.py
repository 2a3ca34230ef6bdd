"""Activated LoRA (aLoRA, Greenewald et al. 2025; PEFT's alora_invocation_tokens): the LoRA acts
only from the last occurrence of an invocation token sequence on, so everything before it is
computed by the base model alone and one key/value cache serves base and adapter. A pre-hook
on the model finds, per row, where the invocation starts; the LoRA pieces read that mask. In a
call that continues a cached sequence (generate's decode steps) the adapter acts on every new
token of the rows whose prompt held the invocation, and on none of the others, as PEFT does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..engine import Piece
from ..errors import DeltaStateError, UnsupportedModuleError
from ..model_inputs import bind, cache_length


class Activation:
    """Where the adapter acts in the current call: `mask` [batch, seq] (True from the invocation
    on); `rows` [batch], whether a row's prompt held the invocation (kept for decode steps)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tuple(tokens)
        self.mask: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None


def invocation_starts(ids: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Per row, where the last occurrence of `tokens` starts, or -1 (PEFT's search)."""
    n, t = len(tokens), ids.shape[1]
    starts = torch.full((ids.shape[0],), -1, dtype=torch.long, device=ids.device)
    if n > t:
        return starts
    windows = ids.unfold(1, n, 1)  # [batch, t - n + 1, n]
    hits = (windows == torch.tensor(tokens, device=ids.device)).all(-1)
    found = hits.any(-1)
    last = hits.shape[1] - 1 - hits.flip(-1).int().argmax(-1)
    return torch.where(found, last, starts)


class InvocationScanner(Piece):
    """On the model: finds the invocation in each row before anything runs."""

    hooks = frozenset({"pre"})
    mergeable = False
    routable = False
    unroutable = "finds each row's invocation tokens over the whole batch before any layer runs"

    def __init__(self, activation: Activation, key: str) -> None:
        super().__init__("", key=key)
        self.activation = activation

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        cache = kw.get("cache", kw.get("past_key_values"))
        act = self.activation
        if cache_length(cache) > 0:  # continuing a sequence: every new token of the activated rows
            x = ids if ids is not None else embeds
            if x is None or act.rows is None or act.rows.shape[0] != x.shape[0]:
                raise DeltaStateError(
                    "this aLoRA delta was called to continue a cached sequence whose prompt it did "
                    "not see; run the prompt (or generate()) with the delta enabled first"
                )
            act.mask = act.rows[:, None].expand(x.shape[0], x.shape[1])
            return args, kwargs
        if ids is None:
            raise UnsupportedModuleError(
                "aLoRA looks for its invocation tokens in input_ids; this call gave none "
                "(inputs_embeds only). Pass input_ids."
            )
        starts = invocation_starts(ids, act.tokens)
        act.rows = starts >= 0
        act.mask = act.rows[:, None] & (torch.arange(ids.shape[1], device=ids.device)[None, :] >= starts[:, None])
        return args, kwargs

    def describe(self) -> str:
        return f"aLoRA invocation {list(self.activation.tokens)}"


def activated(piece: Any, output: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """output + delta where the adapter is active, output (bit for bit) elsewhere."""
    mask = piece.activation.mask
    if mask is None or output.dim() != 3 or tuple(output.shape[:2]) != tuple(mask.shape):
        raise UnsupportedModuleError(
            f"aLoRA at {piece.key!r} needs [batch, seq, features] outputs matching the input "
            f"ids; got {tuple(output.shape)} for ids of shape "
            f"{None if mask is None else tuple(mask.shape)}"
        )
    return torch.where(mask[..., None], output + delta.to(output.dtype), output)
