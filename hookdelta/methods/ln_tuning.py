"""LN tuning (Zhao et al. 2023): train the normalization layers' scale and shift. The delta
holds additive ΔW and Δb (zero at first) and swaps W+ΔW, b+Δb in for each call, so the base
tensors are never written until merge(), which is a plain addition (exact unmerge)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import DeltaConfig
from ..engine import Piece
from ..errors import UnsupportedModuleError
from ..placement import is_parametrized


class NormDelta(Piece):
    """W + ΔW (and b + Δb where the layer has a bias), swapped in for the call."""

    additive = True

    def __init__(self, key: str, module: nn.Module) -> None:
        super().__init__(key)
        own = {n: p for n in ("weight", "bias") if isinstance(p := module._parameters.get(n), torch.Tensor)}
        names = list(own)
        for n, p in own.items():
            self.register_parameter(f"delta_{n}", nn.Parameter(torch.zeros_like(p.detach())))
        self.swaps = tuple(names)

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self._parameters[f"delta_{name}"].to(weight.dtype)

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: self._parameters[f"delta_{n}"].float() for n in self.swaps}

    def describe(self) -> str:
        return "Δ" + "+Δ".join(self.swaps)


@dataclass(frozen=True, kw_only=True)
class LNTuningConfig(DeltaConfig):
    """Tune normalization layers (default: every one, found by type: LayerNorm, RMSNorm, ...)."""

    method = "ln_tuning"
    default_targets = ("norm",)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        for path in sites:
            module = model.get_submodule(path)
            if is_parametrized(module, "weight") or is_parametrized(module, "bias"):
                raise UnsupportedModuleError(
                    f"{path!r} has a parametrized weight (torch.nn.utils.parametrize), which LN tuning cannot swap "
                    "for the call; exclude it, or remove the parametrization"
                )
            if not isinstance(module._parameters.get("weight"), torch.Tensor):
                raise UnsupportedModuleError(
                    f"LN tuning needs a layer with its own weight; {path!r} ({type(module).__name__}) has none"
                )
            pieces.append(NormDelta(path, module))
        return pieces
