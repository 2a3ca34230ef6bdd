"""HiRA (Huang et al. 2025, high-rank adaptation): the update is the base weight itself,
modulated elementwise by a low-rank matrix, ΔW = W ⊙ (B·A), so its rank is not bounded by r.
PEFT's arithmetic and files (HIRA): hira_A [r, in], hira_B [out, r], no scale; B starts at
zero, so a fresh HiRA changes nothing. ΔW reads the layer's current weight, so merge writes
W ⊙ (1 + B·A) and keeps the original (unmerge is exact). On linear layers, as PEFT (its conv and
embedding forms are not built here)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, PeftCodec, check_bool, check_int, check_patterns, exact, file_rank, pattern_value
from ..engine import Piece, current, first_input
from ..modules import linear_layer
from ..placement import live_weight
from .dense_delta import DenseDelta, kaiming_


@dataclass(frozen=True, kw_only=True)
class HiRAConfig(DeltaConfig):
    """HiRA: ΔW = W ⊙ (B·A) with A [r, in], B [out, r] (rank_pattern: per-layer r, PEFT's regex
    rule); init_weights=True starts B at zero (no change), False draws both factors."""

    r: int = 32
    rank_pattern: dict[str, int] | None = None
    init_weights: bool = True

    method = "hira"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_bool(self, "init_weights")
        check_patterns(self, (("rank_pattern", True),))

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [
            Modulation(self, key, linear_layer(model, key, "HiRA", "modulates the weight of"), model) for key in sites
        ]


class Modulation(DenseDelta):
    additive = False  # the term reads the layer's weight, not only its input
    reads_weight = True
    merges_by = "value"  # W ⊙ (1 + BA): only the kept original undoes it

    def __init__(self, cfg: HiRAConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "HiRA", ranked=False)
        self.r = r = pattern_value(cfg.rank_pattern, key, cfg.r)
        out, inp = self.shape
        self.hira_A = nn.Parameter(kaiming_(torch.empty(r, inp, **self.kw)))
        b = torch.zeros(out, r, **self.kw) if cfg.init_weights else kaiming_(torch.empty(out, r, **self.kw))
        self.hira_B = nn.Parameter(b)

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.conv1d else weight  # [out, in]

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        mod = self.hira_B @ self.hira_A
        x = first_input(args, kwargs)
        y = F.linear(x.to(mod.dtype), self._rows(live_weight(module)).to(mod.dtype) * mod)
        return output + y.to(output.dtype)

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = current(module, "weight").float()
        mod = self.hira_B.float() @ self.hira_A.float()
        return {"weight": w * (1 + (mod.T if self.conv1d else mod))}

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return f"HiRA r={self.r}"


class HiRACodec(PeftCodec):
    """PEFT's HIRA files; hira_dropout only acts while PEFT trains: read, not applied."""

    peft_type = "HIRA"
    understood = frozenset(
        {
            "r",
            "rank_pattern",
            "hira_dropout",
            "fan_in_fan_out",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
        }
    )
    suffixes = {".hira_A": "hira_A", ".hira_B": "hira_B"}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        ranks = {s: int(ts["hira_A"].shape[0]) for s, ts in named.items() if "hira_A" in ts}
        # PEFT's HiRA layers (0.18 to 0.21) are built at r whatever rank_pattern says, and read back the
        # same way: a layer at r is right too (HiRA has no alpha, so no scale hangs on the rank)
        plain = {s: k for s, k in ranks.items() if k != peft_config.get("r", 32)}
        r = file_rank(peft_config, plain, 32) if plain else file_rank({**peft_config, "rank_pattern": None}, ranks, 32)
        cfg = HiRAConfig(
            targets=[exact(s) for s in named],
            r=r,
            rank_pattern={re.escape(s): k for s, k in ranks.items() if k != r} or None,
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: HiRAConfig = delta.config
        fields = {
            "peft_type": "HIRA",
            "r": cfg.r,
            "hira_dropout": 0.0,
            "init_weights": True,
            "rank_pattern": {re.escape(p.key): p.r for p in pieces if p.r != cfg.r},
            **self.tuner_fields(delta, pieces),
        }
        return fields, self.piece_tensors(pieces)


HiRAConfig.peft_codec = HiRACodec()
