"""DeLoRA (Bini et al. 2025, decoupled low-rank adaptation): a LoRA whose strength is bounded
and learned apart from its direction, ΔW = (λ / r) · B · diag(1 / (‖Aᵢ‖·‖Bᵢ‖)) · A · diag(‖W‖₀),
where ‖W‖₀ are the base weight's column norms taken at attach time (saved with the delta, as
PEFT saves them). PEFT's arithmetic and files (DELORA): delora_A [r, in], delora_B [out, r],
delora_lambda [1], delora_w_norm [in]; norms clamp at 1e-4 as PEFT's; B starts at zero, so a
fresh DeLoRA changes nothing. On linear layers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import (
    DeltaConfig,
    PeftCodec,
    check_bool,
    check_float,
    check_int,
    check_patterns,
    exact,
    file_rank,
    pattern_value,
)
from ..engine import Piece, first_input
from ..modules import linear_layer
from ..placement import live_weight
from .dense_delta import DenseDelta, kaiming_


@dataclass(frozen=True, kw_only=True)
class DeLoRAConfig(DeltaConfig):
    """DeLoRA: rank r factors with a trained bound λ (starting at delora_lambda); rank_pattern /
    lambda_pattern set r and λ per layer by PEFT's regex rule; init_weights=True starts B at zero."""

    r: int = 8
    delora_lambda: float = 15.0
    rank_pattern: dict[str, int] | None = None
    lambda_pattern: dict[str, float] | None = None
    init_weights: bool = True

    method = "delora"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_float(self, "delora_lambda", low=0.0)
        check_bool(self, "init_weights")
        check_patterns(self, (("rank_pattern", True), ("lambda_pattern", False)))

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [BoundedLowRank(self, key, linear_layer(model, key, "DeLoRA", "adapts"), model) for key in sites]


class BoundedLowRank(DenseDelta):
    def __init__(self, cfg: DeLoRAConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "DeLoRA", ranked=False)
        self.r = r = pattern_value(cfg.rank_pattern, key, cfg.r)
        out, inp = self.shape
        self.delora_A = nn.Parameter(kaiming_(torch.empty(r, inp, **self.kw)))
        b = torch.zeros(out, r, **self.kw) if cfg.init_weights else kaiming_(torch.empty(out, r, **self.kw))
        self.delora_B = nn.Parameter(b)
        lam = float(pattern_value(cfg.lambda_pattern, key, cfg.delora_lambda))
        self.delora_lambda = nn.Parameter(torch.full((1,), lam, **self.kw))
        w = live_weight(module).detach()
        norm = (w.T if self.conv1d else w).float().norm(dim=0)  # the [out, in] weight's column norms
        self.register_buffer("delora_w_norm", norm.to(**self.kw))

    def _gains(self) -> torch.Tensor:
        a = self.delora_A.norm(dim=1).clamp(min=1e-4)
        b = self.delora_B.norm(dim=0).clamp(min=1e-4)
        return self.delora_lambda / self.r / (a * b)

    def delta(self) -> torch.Tensor:
        return (self.delora_B * self._gains()) @ self.delora_A * self.delora_w_norm

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_input(args, kwargs)  # PEFT's order: scale the input, A, gains, B (no ΔW built)
        h = F.linear(x.to(self.delora_A.dtype) * self.delora_w_norm, self.delora_A) * self._gains()
        return output + F.linear(h, self.delora_B).to(output.dtype)

    def describe(self) -> str:
        return f"DeLoRA r={self.r}"


class DeLoRACodec(PeftCodec):
    """PEFT's DELORA files; module_dropout only acts while PEFT trains: read, not applied."""

    peft_type = "DELORA"
    understood = frozenset(
        {
            "r",
            "delora_lambda",
            "rank_pattern",
            "lambda_pattern",
            "module_dropout",
            "bias",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
        }
    )
    suffixes = {
        ".delora_A": "delora_A",
        ".delora_B": "delora_B",
        ".delora_lambda": "delora_lambda",
        ".delora_w_norm": "delora_w_norm",
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
        ranks = {s: int(ts["delora_A"].shape[0]) for s, ts in named.items() if "delora_A" in ts}
        r = file_rank(peft_config, ranks, 8)
        cfg = DeLoRAConfig(
            targets=[exact(s) for s in named],
            r=r,
            delora_lambda=float(peft_config.get("delora_lambda", 15)),
            rank_pattern={re.escape(s): k for s, k in ranks.items() if k != r} or None,
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        cfg: DeLoRAConfig = delta.config
        fields = {
            "peft_type": "DELORA",
            "r": cfg.r,
            "delora_lambda": cfg.delora_lambda,
            "module_dropout": 0.0,
            "bias": "none",
            "init_weights": True,
            "rank_pattern": {re.escape(p.key): p.r for p in pieces if p.r != cfg.r},
            **self.tuner_fields(delta, pieces, layout=False),
        }
        return fields, self.piece_tensors(pieces)


DeLoRAConfig.peft_codec = DeLoRACodec()
