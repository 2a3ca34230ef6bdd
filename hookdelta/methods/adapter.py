"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): h -> h + s·up(f(down(h)))
on a layer's output, with `up` zero-initialized so a fresh adapter changes nothing.

`Bottleneck` is the piece every adapter-style method shares: the sequential adapter here,
the parallel adapter (branch fed by the layer's input), the low-rank adapter and
Compacter (other parametrizations of `down` and `up`). Adapters are non-linear, so they
cannot be merged into the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MAX_ALPHA, DeltaConfig, check_choice, check_float, check_int
from ..engine import Piece, first_input, map_output
from ..modules import Layer, layer_dims
from ..placement import layer_like

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


@dataclass(frozen=True, kw_only=True)
class BottleneckConfig(DeltaConfig):
    """What every bottleneck adapter shares (sequential, parallel, low-rank, Compacter): the
    inner width (bottleneck_dim, else layer width // reduction_factor), the non-linearity
    (relu | gelu | silu | swish | tanh | identity) and the output scale. A method says how its
    two projections are built (`projections`) and whether the branch reads the layer's input
    (`parallel`) instead of its output."""

    bottleneck_dim: int | None = None
    reduction_factor: int = 16
    non_linearity: str = "relu"
    scaling: float = 1.0

    parallel: ClassVar[bool] = False
    expert_sites = "block"  # an adapter after ffn.out on a mixture-of-experts layer: after the mixture block

    def validate(self) -> None:
        if self.bottleneck_dim is not None:
            check_int(self, "bottleneck_dim")
        check_int(self, "reduction_factor")
        check_choice(self, "non_linearity", sorted(ACTIVATIONS))
        check_float(self, "scaling", low=0.0, low_open=True, high=MAX_ALPHA, high_open=False)

    def width(self, source: int) -> int:
        """The inner width for a branch reading `source` features."""
        return self.bottleneck_dim if self.bottleneck_dim is not None else max(1, source // self.reduction_factor)

    def projections(self, source: int, width: int, out: int, like: torch.Tensor) -> tuple[nn.Module, nn.Module]:
        """(down, up): source -> width -> out; up starts at zero so a fresh adapter changes nothing."""
        down = nn.Linear(source, width, device=like.device, dtype=like.dtype)
        return down, zero_linear(width, out, like)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return build_bottlenecks(self, model, sites, self.projections)


def reference_tensor(model: nn.Module, module: Layer, path: str) -> torch.Tensor:
    """A tensor whose device and dtype the delta's own tensors should take (where the layer
    computes, also when accelerate offloads it or it is quantized)."""
    return layer_like(model, path, module)


class Bottleneck(Piece):
    """down -> non-linearity -> up, times `scale`, added to the layer's main output.

    Sequential (default): the branch reads the output h. Parallel: it reads the layer's input."""

    hooks = frozenset({"post"})
    mergeable = False

    def __init__(
        self,
        key: str,
        down: Layer,
        up: Layer,  # (nn.Linear, or compacter's PHM layer: each has a bias)
        non_linearity: str,
        scale: float,
        parallel: bool = False,
        widths: str = "",
    ) -> None:
        super().__init__(key)
        self.down, self.up = down, up
        self.non_linearity, self.scale, self.parallel, self.widths = non_linearity, scale, parallel, widths

    def branch(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        x = x.to(self.up.bias.dtype)  # every up-projection here has a bias; cheaper than parameters()
        return (self.up(ACTIVATIONS[self.non_linearity](self.down(x))) * self.scale).to(like.dtype)

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.parallel:
            x = first_input(args, kwargs)
            return map_output(output, lambda h: h + self.branch(x, h))
        return map_output(output, lambda h: h + self.branch(h, h))

    def describe(self) -> str:
        kind = "parallel" if self.parallel else "adapter"
        return f"{kind} {self.widths} {self.non_linearity} ×{self.scale:g}"


def zero_linear(in_features: int, out_features: int, like: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, device=like.device, dtype=like.dtype)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def build_bottlenecks(
    cfg: BottleneckConfig,
    model: nn.Module,
    sites: Sequence[str],
    projections: Callable[[int, int, int, torch.Tensor], tuple[nn.Module, nn.Module]],
) -> list[Piece]:
    """One Bottleneck per site; `projections(source, width, out, like)` builds its (down, up)."""
    pieces: list[Piece] = []
    for path in sites:
        module = model.get_submodule(path)
        width_in, width_out = layer_dims(model, module, path)
        source = width_in if cfg.parallel else width_out
        width = cfg.width(source)
        down, up = projections(source, width, width_out, reference_tensor(model, module, path))
        pieces.append(
            Bottleneck(path, down, up, cfg.non_linearity, cfg.scaling, cfg.parallel, f"{source}→{width}→{width_out}")
        )
    return pieces


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(BottleneckConfig):
    """Sequential bottleneck adapter: h + s·up(f(down(h))) on a layer's output. placement:
    "houlsby" (after the attention output and the FFN output) or "pfeiffer" (after the FFN
    output only), used when targets is None."""

    placement: str = "houlsby"

    method = "adapter"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "placement", ["houlsby", "pfeiffer"])

    def target_selectors(self, model: nn.Module | None = None) -> Any:
        if self.targets is not None:
            return self.targets
        return ("attn.o", "ffn.out") if self.placement == "houlsby" else ("ffn.out",)
