"""The shared part of methods whose update is a whole ΔW built from small factors (LoHa, LoKr):
the forward hook adds the host layer's own operation applied with ΔW to its input (F.linear,
or the host conv's `_conv_forward` with its stride, padding and groups), and merge adds ΔW.
This is how PEFT and LyCORIS compute them; a method only says how its factors make ΔW."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import (
    MAX_ALPHA,
    DeltaConfig,
    check_bool,
    check_float,
    check_int,
    check_patterns,
    file_rank,
    pattern_value,
)
from ..engine import Piece, first_input
from ..errors import UnsupportedModuleError
from ..modules import Layer, is_conv1d, is_linear_like, layer_dims
from ..placement import layer_like

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d"


@dataclass(frozen=True, kw_only=True)
class DenseDeltaConfig(DeltaConfig):
    """The fields LoHa and LoKr share: r, the rank of the factors; alpha, the scale numerator
    (scale = alpha / r); use_effective_conv2d, a CP core over a convolution's kernel dims;
    rank_pattern / alpha_pattern, per-site r / alpha by PEFT's regex rules. A method adds its
    own fields and names its piece class; the default targets are the attention q and v."""

    r: int = 8
    alpha: float = 8.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    default_targets = ("attn.q", "attn.v")
    piece_class: ClassVar[type]

    def validate(self) -> None:
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True, high=MAX_ALPHA, high_open=False)
        check_bool(self, "use_effective_conv2d")
        check_patterns(self)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [self.piece_class(self, key, model.get_submodule(key), model) for key in sites]


def weight_shape(model: nn.Module, key: str, module: Layer, method: str) -> tuple[int, ...]:
    """The logical shape of the host's weight: [out, in] for linear layers (quantized ones
    too), [out, in/groups, *kernel] for convolutions; any other module is refused."""
    if is_linear_like(module):
        in_f, out_f = layer_dims(model, module, key)
        return (out_f, in_f)
    if type(module) in (nn.Conv1d, nn.Conv2d):
        return tuple(module.weight.shape)
    raise UnsupportedModuleError(
        f"{method} adapts {SUPPORTED}; {key!r} is a {type(module).__name__}. Narrow the targets."
    )


def rank_and_scale(cfg: Any, key: str) -> tuple[int, float]:
    """(r, alpha / r) at a site, with PEFT's rank_pattern / alpha_pattern."""
    r = pattern_value(cfg.rank_pattern, key, cfg.r)
    return r, pattern_value(cfg.alpha_pattern, key, cfg.alpha) / r


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)), what PEFT and nn.Linear use."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class DenseDelta(Piece):
    """A piece whose effect is the host's operation with ΔW = `delta()` on the same input."""

    hooks = frozenset({"post"})
    additive = True

    def __init__(
        self, cfg: DeltaConfig, key: str, module: Layer, model: nn.Module, method: str, ranked: bool = True
    ) -> None:
        super().__init__(key)
        self.shape = weight_shape(model, key, module, method)  # the host weight's logical shape
        self.conv1d = is_conv1d(module)
        self.linear = len(self.shape) == 2
        like = layer_like(model, key, module)  # where and in what dtype the layer computes
        self.kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        if ranked:  # (r and alpha / r: LoHa, LoKr; methods without a rank set their own scale)
            self.r, self.scale = rank_and_scale(cfg, key)

    def delta(self) -> torch.Tensor:
        """ΔW in `shape`, scaled, differentiable in the piece's tensors."""
        raise NotImplementedError

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        dw = self.delta()
        x = first_input(args, kwargs)
        x = x if x.dtype == dw.dtype else x.to(dw.dtype)
        y = F.linear(x, dw) if self.linear else module._conv_forward(x, dw, None)
        return output + (y if y.dtype == output.dtype else y.to(output.dtype))

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        dw = self.delta().float()
        return {"weight": dw.T if self.conv1d else dw}


class LowRankDelta(Piece):
    """A piece whose effect is s·up·(down·x) with factors its `factors()` builds from its tensors
    (AdaLoRA's B·diag(E)·A, VB-LoRA's bank mixes, RandLoRA's scaled bases): added after the layer,
    with dropout on the input while training; merge adds s·up·down. Subclasses set scale, p, conv1d."""

    hooks = frozenset({"post"})
    additive = True
    scale: float = 1.0
    p: float = 0.0
    conv1d: bool = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [k, in], up [out, k]), differentiable in the piece's tensors."""
        raise NotImplementedError

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        down, up = self.factors()
        x = first_input(args, kwargs)
        x = x if x.dtype == down.dtype else x.to(down.dtype)
        if self.p and module.training:
            x = F.dropout(x, self.p, training=True)
        y = F.linear(F.linear(x, down), up) * self.scale
        return output + (y if y.dtype == output.dtype else y.to(output.dtype))

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        down, up = self.factors()
        dw = up.float() @ down.float() * self.scale
        return {"weight": dw.T if self.conv1d else dw}


def peft_rank_fields(peft_config: dict[str, Any], named: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """r, alpha and exact-path rank_pattern / alpha_pattern from a PEFT config; `ranks` holds the
    ranks read off the tensors (as PEFT's loader does), other sites follow the config's patterns."""
    r, alpha = file_rank(peft_config, ranks, 8), float(peft_config.get("alpha", 8))
    ranks = {s: ranks.get(s, pattern_value(peft_config.get("rank_pattern"), s, r)) for s in named}
    alphas = {
        re.escape(s): float(v)
        for s in named
        if (v := pattern_value(peft_config.get("alpha_pattern"), s, None)) is not None
    }
    return {
        "r": r,
        "alpha": alpha,
        "rank_pattern": {re.escape(s): k for s, k in ranks.items() if k != r} or None,
        "alpha_pattern": alphas or None,
    }


def pattern_fields(pieces: list[Any], cfg: Any) -> dict[str, Any]:
    """PEFT's rank_pattern / alpha_pattern for the sites whose r or alpha differ from the config's."""
    ranks = {re.escape(p.key): p.r for p in pieces if p.r != cfg.r}
    alphas = {re.escape(p.key): p.scale * p.r for p in pieces if abs(p.scale * p.r - cfg.alpha) > 1e-9 * cfg.alpha}
    return {"rank_pattern": ranks, "alpha_pattern": alphas}


def peft_fields(peft_type: str, delta: Any, pieces: list[Any], **own: Any) -> dict[str, Any]:
    """The PEFT config of a LoHa / LoKr delta: the shared fields, the per-site patterns, `own`."""
    cfg = delta.config
    return {
        "peft_type": peft_type,
        "r": cfg.r,
        "alpha": cfg.alpha,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        **own,
        **pattern_fields(pieces, cfg),
        "target_modules": [p.key for p in pieces],
    }
