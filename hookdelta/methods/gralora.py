"""GraLoRA (Jung et al. 2025, granular LoRA): the weight is cut into k × k blocks and each block
gets its own rank-(r/k) LoRA, so the update's rank reaches r·k at LoRA's parameter count; an
optional plain LoRA of rank hybrid_r is added. PEFT's arithmetic and files (GRALORA):
gralora_A [k, in/k, r] (input block n's down-projection, its r columns split in k groups, one
per output block), gralora_B [k, r, out/k] (output block c's up-projection, its r rows split in k
groups, one per input block), scale alpha / (r + hybrid_r); B starts at zero. On linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import MAX_ALPHA, DeltaConfig, PeftCodec, check_bool, check_float, check_int, exact
from ..engine import Piece
from ..errors import ConfigError
from ..modules import linear_layer
from .dense_delta import DenseDelta, kaiming_


@dataclass(frozen=True, kw_only=True)
class GraLoRAConfig(DeltaConfig):
    """GraLoRA: r, the rank of each block row (divisible by gralora_k); gralora_k, the blocks per
    side; alpha, the scale numerator (scale = alpha / (r + hybrid_r)); hybrid_r, the rank of an
    extra plain LoRA (0: none); init_weights=True starts the B factors at zero."""

    r: int = 32
    gralora_k: int = 2
    alpha: float = 64.0
    hybrid_r: int = 0
    init_weights: bool = True

    method = "gralora"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_int(self, "gralora_k")
        check_float(self, "alpha", low=0.0, low_open=True, high=MAX_ALPHA, high_open=False)
        check_int(self, "hybrid_r", minimum=0)
        check_bool(self, "init_weights")
        if self.r % self.gralora_k:
            raise ConfigError(f"GraLoRAConfig.r ({self.r}) must be divisible by gralora_k ({self.gralora_k})")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [BlockLowRank(self, key, linear_layer(model, key, "GraLoRA", "adapts"), model) for key in sites]


class BlockLowRank(DenseDelta):
    def __init__(self, cfg: GraLoRAConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "GraLoRA", ranked=False)
        out, inp = self.shape
        k, r, kw = cfg.gralora_k, cfg.r, self.kw
        if inp % k or out % k:
            raise ConfigError(f"GraLoRA: gralora_k={k} must divide {key!r}'s {inp} inputs and {out} outputs")
        self.k, self.r, self.hybrid = k, r, cfg.hybrid_r
        self.scale = cfg.alpha / (r + cfg.hybrid_r)
        # (PEFT draws A and B as [r, in/k] / [out/k, r] per block, then stacks and transposes)
        a = torch.stack([kaiming_(torch.empty(r, inp // k, **kw)) for _ in range(k)]).transpose(1, 2)
        b = [
            torch.zeros(out // k, r, **kw) if cfg.init_weights else kaiming_(torch.empty(out // k, r, **kw))
            for _ in range(k)
        ]
        self.gralora_A = nn.Parameter(a.contiguous())
        self.gralora_B = nn.Parameter(torch.stack(b).transpose(1, 2).contiguous())
        if self.hybrid:
            self.gralora_A_general = nn.Parameter(kaiming_(torch.empty(self.hybrid, inp, **kw)))
            gb = torch.empty(out, self.hybrid, **kw)
            self.gralora_B_general = nn.Parameter(gb.zero_() if cfg.init_weights else kaiming_(gb))

    def delta(self) -> torch.Tensor:
        k, s = self.k, self.r // self.k
        (_, ins, _), (_, _, outs) = self.gralora_A.shape, self.gralora_B.shape
        # block (input n, output c) is A[n][:, c-th group] @ B[c][n-th group, :]
        a = self.gralora_A.reshape(k, ins, k, s)  # [n, i, c, t]
        b = self.gralora_B.reshape(k, k, s, outs)  # [c, n, t, o]
        dw = torch.einsum("nict,cnto->coni", a, b).reshape(k * outs, k * ins)
        if self.hybrid:
            dw = dw + self.gralora_B_general @ self.gralora_A_general
        return dw * self.scale

    def describe(self) -> str:
        return f"GraLoRA r={self.r} k={self.k}" + (f" hybrid_r={self.hybrid}" if self.hybrid else "")


class GraLoRACodec(PeftCodec):
    """PEFT's GRALORA files; gralora_dropout only acts while PEFT trains: read, not applied."""

    peft_type = "GRALORA"
    understood = frozenset(
        {
            "r",
            "hybrid_r",
            "alpha",
            "gralora_dropout",
            "gralora_k",
            "fan_in_fan_out",
            "bias",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
        }
    )
    suffixes = {
        ".gralora_A": "gralora_A",
        ".gralora_B": "gralora_B",
        ".gralora_A_general.weight": "gralora_A_general",
        ".gralora_B_general.weight": "gralora_B_general",
    }

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        cfg = GraLoRAConfig(
            targets=[exact(s) for s in named],
            r=int(peft_config.get("r", 32)),
            gralora_k=int(peft_config.get("gralora_k", 2)),
            alpha=float(peft_config.get("alpha", 64)),
            hybrid_r=int(peft_config.get("hybrid_r", 0)),
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: GraLoRAConfig = delta.config
        fields = {
            "peft_type": "GRALORA",
            "r": cfg.r,
            "hybrid_r": cfg.hybrid_r,
            "alpha": cfg.alpha,
            "gralora_k": cfg.gralora_k,
            "gralora_dropout": 0.0,
            "bias": "none",
            "init_weights": True,
            **self.tuner_fields(delta, pieces),
        }
        tensors = {
            f"{p.key}.{n}" + (".weight" if n.endswith("general") else ""): t.detach().contiguous()
            for p in pieces
            for n, t in p.state_dict().items()
        }
        return fields, tensors


GraLoRAConfig.peft_codec = GraLoRACodec()
