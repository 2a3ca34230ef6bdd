"""Compacter (Mahabadi et al. 2021): a bottleneck adapter whose projections are PHM layers,
W = Σᵢ Aᵢ ⊗ Bᵢ (parameterized hypercomplex multiplication). The small "rule" matrices
Aᵢ [n×n] are shared by every adapter of the delta (shared_phm_rule) and each Bᵢ is a
rank-`phm_rank` product sᵢ·tᵢ (factorized_phm), so a layer costs about (in+out)/n·rank
parameters instead of in·out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..config import check_bool, check_int
from ..engine import Piece
from ..errors import ConfigError
from .adapter import BottleneckConfig, build_bottlenecks


def _rule(n: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, n, n, device=like.device, dtype=like.dtype) / math.sqrt(n))


class SharedRule(Piece):
    """The rule matrices shared by all PHM layers of one delta. It hooks nothing."""

    mergeable = False
    additive = True  # it changes nothing at its site

    def __init__(self, site_path: str, n: int, like: torch.Tensor) -> None:
        super().__init__(site_path, key="phm_rule")
        self.down, self.up = _rule(n, like), _rule(n, like)

    def describe(self) -> str:
        return f"shared PHM rule n={self.down.shape[0]}"


class PHMLinear(nn.Module):
    """y = x·W + b with W = Σᵢ kron(Aᵢ, Bᵢ), Bᵢ = sᵢ·tᵢ (or a full Bᵢ when not factorized)."""

    if TYPE_CHECKING:  # (for the type checker only: the tensors and layers it registers, typed as they are used)

        def __getattr__(self, name: str) -> Any: ...

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        rank: int,
        factorized: bool,
        rule: tuple[SharedRule, str] | None,
        like: torch.Tensor,
        zero: bool = False,
    ) -> None:
        super().__init__()
        p, q = in_features // n, out_features // n
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        if rule is None:
            self.rule = _rule(n, like)
        else:  # a plain reference: the shared piece owns (and saves) the tensor
            object.__setattr__(self, "_shared", rule)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        if factorized:
            self.s = nn.Parameter(torch.empty(n, p, rank, **kw).uniform_(-1, 1).mul_(1 / math.sqrt(p)))
            self.t = nn.Parameter(
                torch.zeros(n, rank, q, **kw)
                if zero
                else torch.empty(n, rank, q, **kw).uniform_(-1, 1).mul_(1 / math.sqrt(rank))
            )
        else:
            self.W = nn.Parameter(
                torch.zeros(n, p, q, **kw)
                if zero
                else torch.empty(n, p, q, **kw).uniform_(-1, 1).mul_(1 / math.sqrt(p))
            )

    def rule_matrices(self) -> torch.Tensor:
        shared = self.__dict__.get("_shared")
        return getattr(shared[0], shared[1]) if shared is not None else self.rule

    def weight(self) -> torch.Tensor:
        """The full [in, out] matrix Σᵢ kron(Aᵢ, Bᵢ)."""
        A = self.rule_matrices()
        B = self.s @ self.t if "s" in self._parameters else self.W
        n, p, q = B.shape
        # kron(A_i, B_i)[a*p + b, c*q + d] = A_i[a, c] * B_i[b, d]
        return torch.einsum("iac,ibd->abcd", A, B).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias

    def extra_repr(self) -> str:
        return f"PHM {self.bias.shape[0]}"


@dataclass(frozen=True, kw_only=True)
class CompacterConfig(BottleneckConfig):
    """Compacter adapter. phm_dim n must divide the layer width and the bottleneck width;
    shared_phm_rule shares the Aᵢ across layers; factorized_phm makes each Bᵢ rank phm_rank.
    Default position: after the FFN output (Pfeiffer placement)."""

    phm_dim: int = 4
    shared_phm_rule: bool = True
    factorized_phm: bool = True
    phm_rank: int = 1
    non_linearity: str = "gelu"

    method = "compacter"
    default_targets = ("ffn.out",)

    def validate(self) -> None:
        super().validate()
        check_int(self, "phm_dim")
        check_int(self, "phm_rank")
        check_bool(self, "shared_phm_rule")
        check_bool(self, "factorized_phm")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        n = self.phm_dim
        shared: list[SharedRule] = []  # the rule matrices all layers of this delta share

        def projections(source: int, width: int, out: int, like: torch.Tensor) -> tuple[Any, Any]:
            if out % n or width % n:
                raise ConfigError(
                    f"CompacterConfig.phm_dim={n} must divide the layer width ({out}) and the "
                    f"bottleneck width ({width}); pick another phm_dim or bottleneck_dim"
                )
            if self.shared_phm_rule and not shared:
                shared.append(SharedRule(sites[0], n, like))
            rule = shared[0] if shared else None
            return (
                PHMLinear(source, width, n, self.phm_rank, self.factorized_phm, (rule, "down") if rule else None, like),
                PHMLinear(
                    width, out, n, self.phm_rank, self.factorized_phm, (rule, "up") if rule else None, like, zero=True
                ),
            )

        pieces = build_bottlenecks(self, model, sites, projections)
        return shared + pieces
