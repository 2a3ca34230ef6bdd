"""Parallel adapter (He et al. 2022): a bottleneck branch fed by the layer's input and added
to its output, h = layer(x) + s·up(f(down(x))). On a whole feed-forward block (the default
where the family has one module for it) this is the paper's best variant; elsewhere it runs
in parallel with the hooked linear layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import SelectorError
from ..selection import match
from .adapter import BottleneckConfig


@dataclass(frozen=True, kw_only=True)
class ParallelAdapterConfig(BottleneckConfig):
    """Parallel bottleneck adapter: a branch fed by the layer's input, bottleneck_dim wide (default:
    width // reduction_factor), scaled by `scaling` (He et al. use 4.0). Default position: the
    FFN block ("ffn"), or the FFN output projection ("ffn.out") on models without one FFN module."""

    scaling: float = 4.0

    method = "parallel_adapter"
    default_targets = ("ffn",)
    parallel = True

    def select(self, model: nn.Module) -> list[str]:
        if self.targets is not None:
            return super().select(model)
        try:
            return match(model, ("ffn",), self.exclude, self.layers)
        except SelectorError:
            return match(model, ("ffn.out",), self.exclude, self.layers)
