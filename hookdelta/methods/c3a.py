"""C3A (Chen et al. 2025, circular convolution adaptation): ΔW is block-circulant, each b × b
block a circulant matrix given by one trained vector of b numbers, so a layer trains in·out/b
numbers and the update can have full rank. PEFT's arithmetic and files (C3A): c3a_kernel
[out/b, in/b, b] in float32, ΔW[m·b+p, n·b+q] = kernel[m, n, (q − p) mod b] / in (PEFT divides by
the input width); the kernel starts random (PEFT's default "xavier_uniform") or at zero ("zero",
PEFT's init_weights=True). Built by gathering the kernel, which is exact; PEFT goes through FFTs
and agrees to float32 rounding. On nn.Linear, as PEFT."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import (
    DeltaConfig,
    PeftCodec,
    after_dot_pattern,
    check_choice,
    check_int,
    check_patterns,
    exact,
    pattern_value,
)
from ..engine import Piece
from ..errors import ConfigError
from ..modules import linear_layer
from .dense_delta import DenseDelta

INITS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zero")


@dataclass(frozen=True, kw_only=True)
class C3AConfig(DeltaConfig):
    """C3A: block_size b (dividing the layer's inputs and outputs; block_size_pattern: per layer
    by PEFT's regex rule); init_weights one of "xavier_uniform" (PEFT's default), "kaiming_uniform",
    "gaussian", or "zero" (a fresh delta then changes nothing)."""

    block_size: int = 256
    block_size_pattern: dict[str, int] | None = None
    init_weights: str = "xavier_uniform"

    method = "c3a"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "block_size")
        check_choice(self, "init_weights", INITS)
        check_patterns(self, (("block_size_pattern", True),))

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [Circulant(self, key, linear_layer(model, key, "C3A", "adapts"), model) for key in sites]


class Circulant(DenseDelta):
    def __init__(self, cfg: C3AConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "C3A", ranked=False)
        out, inp = self.shape
        b = self.block = pattern_value(cfg.block_size_pattern, key, cfg.block_size)
        if inp % b or out % b:
            raise ConfigError(f"C3A: block_size {b} must divide {key!r}'s {inp} inputs and {out} outputs")
        kernel = torch.zeros(out // b, inp // b, b, device=self.kw["device"])  # float32, as PEFT keeps it
        if cfg.init_weights == "gaussian":
            nn.init.normal_(kernel)
        elif cfg.init_weights != "zero":  # PEFT's uniform bounds
            bound = math.sqrt(3 / inp) if cfg.init_weights == "kaiming_uniform" else math.sqrt(6 / (inp + out))
            nn.init.uniform_(kernel, -bound, bound)
        self.c3a_kernel = nn.Parameter(kernel)
        i = torch.arange(b, device=self.kw["device"])
        self.register_buffer("shift", (i[None, :] - i[:, None]) % b, persistent=False)

    def delta(self) -> torch.Tensor:
        m, n, b = self.c3a_kernel.shape
        blocks = self.c3a_kernel[:, :, self.shift]  # [m, n, b, b]
        return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)  # float32, as PEFT computes it

    def describe(self) -> str:
        return f"C3A block={self.block}"


class C3ACodec(PeftCodec):
    """PEFT's C3A files: one c3a_kernel per layer; its block size is read off the tensor."""

    peft_type = "C3A"
    understood = frozenset(
        {"block_size", "block_size_pattern", "init_weights", "bias", "layers_to_transform", "modules_to_save"}
    )
    suffixes = {".c3a_kernel": "c3a_kernel"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        size = int(peft_config.get("block_size", 256))
        sizes = {s: int(ts["c3a_kernel"].shape[-1]) for s, ts in named.items() if "c3a_kernel" in ts}
        cfg = C3AConfig(
            targets=[exact(s) for s in named],
            block_size=size,
            init_weights="zero",
            block_size_pattern={re.escape(s): k for s, k in sizes.items() if k != size} or None,
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        cfg: C3AConfig = delta.config
        fields = {
            "peft_type": "C3A",
            "block_size": cfg.block_size,
            "bias": "none",
            "init_weights": True,
            "block_size_pattern": {after_dot_pattern(p.key): p.block for p in pieces if p.block != cfg.block_size},
            **self.tuner_fields(delta, pieces, layout=False),
        }
        return fields, self.piece_tensors(pieces)


C3AConfig.peft_codec = C3ACodec()
