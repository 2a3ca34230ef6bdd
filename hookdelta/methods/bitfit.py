"""BitFit (Ben Zaken et al. 2022): train only bias terms. Here a learned bias delta is added
to each targeted layer's output, also on layers that have no bias of their own (Llama's
projections), so the base biases are never written. Merging adds it to the layer's bias
(exact to rounding; a layer without a bias has nowhere to put it and refuses)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, check_bool
from ..engine import Piece, map_output
from ..errors import MergeError, UnsupportedModuleError
from ..modules import Layer, is_linear_like, layer_dims
from ..roles import is_norm
from .adapter import reference_tensor


class BiasDelta(Piece):
    """output + b, with b broadcast over the channel dim (last, or dim 1 for convolutions)."""

    hooks = frozenset({"post"})
    additive = True

    def __init__(self, key: str, width: int, like: torch.Tensor, channel_dim: int) -> None:
        super().__init__(key)
        self.bias = nn.Parameter(torch.zeros(width, device=like.device, dtype=like.dtype))
        self.channel_dim = channel_dim

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        def add(h: torch.Tensor) -> torch.Tensor:
            b = self.bias.to(h.dtype)
            if self.channel_dim == 1:
                b = b.reshape(-1, *([1] * (h.dim() - 2)))
            return h + b

        return map_output(output, add)

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if module._parameters.get("bias") is None:
            raise MergeError(
                f"{self.key!r} has no bias of its own, so its BitFit delta cannot be merged without adding "
                "a parameter (which would change the model's state-dict keys); keep this delta unmerged"
            )
        return {"bias": self.bias.float()}

    def describe(self) -> str:
        return f"bias Δ[{self.bias.shape[0]}]"


@dataclass(frozen=True, kw_only=True)
class BitFitConfig(DeltaConfig):
    """Bias-only tuning. Default targets: every linear layer but the output head, plus the
    normalization layers when norm_biases (their biases are part of BitFit's original recipe)."""

    norm_biases: bool = True

    method = "bitfit"

    def validate(self) -> None:
        check_bool(self, "norm_biases")

    def target_selectors(self, model: nn.Module | None = None) -> Any:
        if self.targets is not None:
            return self.targets
        return ("all-linear", "norm") if self.norm_biases else ("all-linear",)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        for path in sites:
            module: Layer = model.get_submodule(path)
            like = reference_tensor(model, module, path)
            if is_linear_like(module):
                pieces.append(BiasDelta(path, layer_dims(model, module, path)[1], like, -1))
            elif is_norm(path, module):  # GroupNorm / BatchNorm / InstanceNorm: channels are dim 1
                channel = 1 if isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase)) else -1
                pieces.append(BiasDelta(path, module.weight.shape[0], like, channel))
            elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(
                module, nn.modules.conv._ConvTransposeNd
            ):
                pieces.append(BiasDelta(path, module.out_channels, like, 1))
            elif isinstance(module, nn.Embedding):
                pieces.append(BiasDelta(path, module.embedding_dim, like, -1))
            else:
                raise UnsupportedModuleError(
                    f"BitFit cannot add a bias to {path!r} ({type(module).__name__}); it supports linear, "
                    "convolution, embedding and normalization layers. Narrow the targets."
                )
        return pieces
