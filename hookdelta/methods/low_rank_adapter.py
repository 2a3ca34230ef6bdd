"""Low-rank adapter (Mahabadi et al. 2021, "LRA"): a bottleneck adapter whose down and up
projections are each a rank-`rank` product, W = B·A, so it trains far fewer parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_int
from .adapter import BottleneckConfig


class LowRankLinear(nn.Module):
    """y = x·Aᵀ·Bᵀ + b with A [rank, in] and B [out, rank]; `zero` starts B (and b) at zero."""

    if TYPE_CHECKING:  # (for the type checker only: the tensors and layers it registers, typed as they are used)

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, in_features: int, out_features: int, rank: int, like: torch.Tensor, zero: bool = False) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw).uniform_(-1, 1).mul_(1 / math.sqrt(in_features)))
        self.B = nn.Parameter(
            torch.zeros(out_features, rank, **kw)
            if zero
            else torch.empty(out_features, rank, **kw).uniform_(-1, 1).mul_(1 / math.sqrt(rank))
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"{self.A.shape[1]}->{self.B.shape[0]} rank {self.A.shape[0]}"


@dataclass(frozen=True, kw_only=True)
class LowRankAdapterConfig(BottleneckConfig):
    """Sequential adapter with low-rank projections: width // reduction_factor inside
    (or bottleneck_dim), each projection of rank `rank`. Default position: after the FFN."""

    rank: int = 1

    method = "low_rank_adapter"
    default_targets = ("ffn.out",)

    def validate(self) -> None:
        super().validate()
        check_int(self, "rank")

    def projections(self, source: int, width: int, out: int, like: torch.Tensor) -> tuple[nn.Module, nn.Module]:
        return LowRankLinear(source, width, self.rank, like), LowRankLinear(width, out, self.rank, like, zero=True)
