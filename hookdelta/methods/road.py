"""RoAd (Liao et al. 2024, 2D rotary adaptation): the layer's output is rotated and scaled in
pairs: within each group of `group_size` output features, feature i and feature i + group/2
form a plane, turned by an angle θ and scaled by α. PEFT's arithmetic and files (ROAD):
road_theta / road_alpha, with its three variants: road_1 (one θ, α per pair, shared by both
halves: out/2 numbers each), road_2 (per feature: out), road_4 (separate cos and sin angles and
scales: 2·out). θ starts at 0 and α at 1: a fresh RoAd changes nothing. The rotation acts on the
output, bias included, so merge turns W and b (W' = R·W, b' = R·b) and keeps the originals
(unmerge is exact). On linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, check_choice, check_int, exact
from ..engine import Piece, current, map_output
from ..errors import ConfigError, DeltaFileError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like

SIZES = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # numbers per output feature


@dataclass(frozen=True, kw_only=True)
class RoAdConfig(DeltaConfig):
    """RoAd: variant "road_1", "road_2" or "road_4"; group_size, an even divisor of the layer's
    outputs; init_weights=True starts at the identity, False at PEFT's random draw."""

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    method = "road"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_choice(self, "variant", tuple(SIZES))
        check_int(self, "group_size", minimum=2)
        check_bool(self, "init_weights")
        if self.group_size % 2:
            raise ConfigError(f"RoAdConfig.group_size must be even (features turn in pairs), got {self.group_size}")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        for key in sites:
            module = linear_layer(model, key, "RoAd", "rotates the output of")
            out_f = layer_dims(model, module, key)[1]
            if out_f % self.group_size:
                raise ConfigError(f"RoAd: group_size {self.group_size} does not divide {key!r}'s {out_f} outputs")
            pieces.append(PlaneRotation(self, key, module, out_f, layer_like(model, key, module)))
        return pieces


class PlaneRotation(Piece):
    hooks = frozenset({"post"})
    merges_by = "value"  # R·W and R·b: only the kept originals undo it

    def __init__(self, cfg: RoAdConfig, key: str, module: nn.Module, out_f: int, like: torch.Tensor) -> None:
        super().__init__(key)
        size = int(out_f * SIZES[cfg.variant])
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        if cfg.init_weights:
            theta, alpha = torch.zeros(size, **kw), torch.ones(size, **kw)
        else:
            theta, alpha = torch.randn(size, **kw) * 0.5, 1 + torch.randn(size, **kw) * 0.5
        self.road_theta, self.road_alpha = nn.Parameter(theta), nn.Parameter(alpha)
        self.variant, self.group = cfg.variant, cfg.group_size
        self.conv1d = is_conv1d(module)

    def _cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output feature: (α·cos θ, α·sin θ), PEFT's _prepare_cols."""
        theta: torch.Tensor = self.road_theta
        alpha: torch.Tensor = self.road_alpha
        g = self.group
        if self.variant == "road_1":  # one angle per pair, used by both of its features
            theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
            alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        if self.variant == "road_4":
            theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
            return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[
                :, 1
            ].sin().flatten()
        return alpha * theta.cos(), alpha * theta.sin()

    def _turn(self, y: torch.Tensor) -> torch.Tensor:
        """Rows y (output features last) turned pairwise within each group."""
        first, second = self._cols()
        pairs = y.reshape(-1, 2, self.group // 2)
        swapped = torch.stack((-pairs[:, 1], pairs[:, 0]), dim=1).reshape(y.shape)
        return y * first + swapped * second

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        dtype = self.road_theta.dtype
        return map_output(output, lambda y: self._turn(y.to(dtype)).to(y.dtype))

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = current(module, "weight").float()
        rows = w if self.conv1d else w.T  # [in, out]: each row a vector in output space
        turned = self._turn(rows.to(self.road_theta.dtype)).float()
        out = {"weight": turned if self.conv1d else turned.T}
        if getattr(module, "bias", None) is not None:
            out["bias"] = self._turn(current(module, "bias").to(self.road_theta.dtype)).float()
        return out

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return f"RoAd {self.variant} group={self.group}"


class RoAdCodec(PeftCodec):
    """PEFT's ROAD files: road_theta and road_alpha per layer."""

    peft_type = "ROAD"
    understood = frozenset({"variant", "group_size", "init_weights", "layers_to_transform", "modules_to_save"})
    suffixes = {".road_theta": "road_theta", ".road_alpha": "road_alpha"}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        variant = peft_config.get("variant", "road_1")
        if variant not in SIZES:
            raise DeltaFileError(f"the RoAd file's variant {variant!r} is none of {list(SIZES)}")
        cfg = RoAdConfig(
            targets=[exact(s) for s in named],
            variant=variant,
            group_size=int(peft_config.get("group_size", 64)),
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        cfg: RoAdConfig = delta.config
        fields = {
            "peft_type": "ROAD",
            "variant": cfg.variant,
            "group_size": cfg.group_size,
            "init_weights": True,
            **self.tuner_fields(delta, pieces, layout=False),
        }
        return fields, self.piece_tensors(pieces)


RoAdConfig.peft_codec = RoAdCodec()
