"""Parallel adapter (He et al. 2022): a bottleneck branch fed by the layer's input and added
to its output, h = layer(x) + s·up(f(down(x))). On a whole feed-forward block (the default
where the family has one module for it) this is the paper's best variant; elsewhere it runs
in parallel with the hooked linear layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..config import DeltaConfig
from ..engine import Piece
from ..errors import SelectorError
from ..selection import match
from .adapter import bottleneck_width, build_bottlenecks, check_bottleneck, zero_linear


@dataclass(frozen=True, kw_only=True)
class ParallelAdapterConfig(DeltaConfig):
    """Parallel bottleneck adapter. bottleneck_dim (default: width // reduction_factor),
    non_linearity, scaling (He et al. use 4.0). Default position: the FFN block ("ffn"), or
    the FFN output projection ("ffn.out") on families without one FFN module."""

    bottleneck_dim: int | None = None
    reduction_factor: int = 16
    non_linearity: str = "relu"
    scaling: float = 4.0

    method = "parallel_adapter"
    default_targets = ("ffn",)

    def validate(self) -> None:
        check_bottleneck(self)

    def select(self, model: nn.Module) -> list[str]:
        if self.targets is not None:
            return super().select(model)
        try:
            return match(model, ("ffn",), self.exclude, self.layers)
        except SelectorError:
            return match(model, ("ffn.out",), self.exclude, self.layers)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        def make(width_in: int, width_out: int, like: torch.Tensor) -> tuple[nn.Module, nn.Module]:
            width = bottleneck_width(self, width_in)
            down = nn.Linear(width_in, width, device=like.device, dtype=like.dtype)
            return down, zero_linear(width, width_out, like)

        return build_bottlenecks(self, model, sites, make, parallel=True)
