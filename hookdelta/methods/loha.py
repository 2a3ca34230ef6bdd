"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): ΔW = s · (W1a·W1b) ⊙ (W2a·W2b), a Hadamard
product of two rank-r products, so the update's rank can reach r². On Linear and Conv1d/2d
(whose ΔW is [out, in·k] reshaped to the kernel; with use_effective_conv2d the kernel dims get
their own CP core t1/t2, as LyCORIS). Layouts and initialisation are PEFT's, so its LOHA files
map one-to-one:  w1_a / w2_a [out, r], w1_b / w2_b [r, in·k]   (effective conv: w*_a [r, out],
w*_b [r, in], t1 / t2 [r, r, *k]).  W2b starts at zero: a fresh LoHa changes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, exact
from ..engine import Piece
from .dense_delta import DenseDelta, DenseDeltaConfig, kaiming_, peft_fields, peft_rank_fields

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(frozen=True, kw_only=True)
class LoHaConfig(DenseDeltaConfig):
    """LoHa: ΔW = (W1a·W1b) ⊙ (W2a·W2b), each product of rank r (fields: DenseDeltaConfig's;
    use_effective_conv2d is not for 1×1 kernels)."""

    method = "loha"


class Hadamard(DenseDelta):
    def __init__(self, cfg: LoHaConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "LoHa")
        shape, kw = self.shape, self.kw
        out, rest = shape[0], math.prod(shape[1:])
        self.cp = cfg.use_effective_conv2d and len(shape) > 2 and math.prod(shape[2:]) > 1
        r = self.r
        if self.cp:  # the kernel dims in a core; a, b project the channels
            kernel = tuple(shape[2:]) + ((1,) if len(shape) == 3 else ())  # PEFT keeps Conv1d's core 4-D
            self.hada_t1 = nn.Parameter(kaiming_(torch.empty(r, r, *kernel, **kw)))
            self.hada_t2 = nn.Parameter(kaiming_(torch.empty(r, r, *kernel, **kw)))
            a_shape, b_shape = (r, out), (r, shape[1])
        else:
            a_shape, b_shape = (out, r), (r, rest)
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(*a_shape, **kw)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(*b_shape, **kw)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(*a_shape, **kw)))
        self.hada_w2_b = nn.Parameter(torch.zeros(*b_shape, **kw))

    def delta(self) -> torch.Tensor:
        if self.cp:
            one = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            two = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2, self.hada_w2_b, self.hada_w2_a)
        else:
            one, two = self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b
        return (one * two * self.scale).reshape(self.shape)

    def describe(self) -> str:
        return f"LoHa r={self.r} scale={self.scale:g}" + (" cp" if self.cp else "")


class LoHaCodec(PeftCodec):
    """PEFT's LOHA files. rank_dropout and module_dropout only act while PEFT trains: read, not
    applied (hookdelta's LoHa has no dropout)."""

    peft_type = "LOHA"
    understood = frozenset(
        {
            "r",
            "alpha",
            "rank_pattern",
            "alpha_pattern",
            "use_effective_conv2d",
            "rank_dropout",
            "module_dropout",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
        }
    )
    suffixes = {"." + f: f for f in FACTORS}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        ranks = {s: int(ts["hada_w1_b"].shape[0]) for s, ts in named.items() if "hada_w1_b" in ts}
        cfg = LoHaConfig(
            targets=[exact(s) for s in named],
            **peft_rank_fields(peft_config, named, ranks),
            use_effective_conv2d=bool(peft_config.get("use_effective_conv2d")),
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        return peft_fields("LOHA", delta, pieces, init_weights=True), self.piece_tensors(pieces)


LoHaConfig.peft_codec = LoHaCodec()


LoHaConfig.piece_class = Hadamard
