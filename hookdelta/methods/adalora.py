"""AdaLoRA (Zhang et al. 2023): a LoRA in SVD form, ΔW = s·B·diag(E)·A with s = alpha / init_r,
whose rank budget moves during training to the layers that matter. PEFT's arithmetic, schedule
and files (ADALORA): lora_A [r, in], lora_B [out, r], lora_E [r, 1]; E starts at zero (a fresh
delta changes nothing), A and B at N(0, 0.02).

The schedule is a `RankAllocator` (`hd.optim.adalora(delta)`, or `hd.TrainerCallback` after each
optimizer step): every step it keeps a smoothed importance of each triplet (Eᵢ, Aᵢ, B[:, i]),
|p·∇p| times its uncertainty, and from `tinit` on it zeroes the E entries of the least important
triplets until init_r·layers shrinks to target_r·layers along PEFT's cubic schedule, fixed for the
last `tfinal` steps. `penalty()` is PEFT's orthogonality regulariser, added to the loss
(hd.delta_trainer adds it for Trainer users). Saved for PEFT, the zeroed triplets are cut from
the tensors and listed in `rank_pattern`; the scale keeps init_r, as in PEFT."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import MAX_ALPHA, DeltaConfig, PeftCodec, check_float, check_int, check_patterns, exact, pattern_value
from ..engine import Piece
from ..errors import ConfigError, DeltaFileError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like
from .dense_delta import LowRankDelta


@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(DeltaConfig):
    """AdaLoRA: init_r, each layer's starting rank; target_r, the average rank the schedule ends at;
    alpha (scale = alpha / init_r); dropout on the delta's input while training; the schedule over
    total_step steps: tinit warm-up steps at full rank, tfinal final steps at the final ranks, a
    reallocation every deltaT steps, EMA factors beta1 / beta2; orth_reg_weight, the regulariser's
    weight; rank_pattern: per-layer starting ranks (PEFT's pruned files load through it)."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: dict[str, int] | None = None

    method = "adalora"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "init_r")
        check_int(self, "target_r")
        check_float(self, "alpha", low=0.0, low_open=True, high=MAX_ALPHA, high_open=False)
        check_float(self, "dropout", low=0.0, high=1.0)
        if self.total_step is not None:
            check_int(self, "total_step")
        check_int(self, "tinit", minimum=0)
        check_int(self, "tfinal", minimum=0)
        check_int(self, "deltaT")
        check_float(self, "beta1", low=0.0, high=1.0, low_open=True)
        check_float(self, "beta2", low=0.0, high=1.0, low_open=True)
        check_float(self, "orth_reg_weight", low=0.0)
        check_patterns(self, (("rank_pattern", True),))
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRAConfig.target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoRAConfig: tinit ({self.tinit}) must be below total_step - tfinal "
                f"({self.total_step} - {self.tfinal}), or no step is left to reallocate ranks"
            )

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        for key in sites:
            module = linear_layer(model, key, "AdaLoRA", "adapts")
            pieces.append(SVDLoRA(self, key, module, layer_dims(model, module, key), layer_like(model, key, module)))
        return pieces


class SVDLoRA(LowRankDelta):
    def __init__(
        self, cfg: AdaLoRAConfig, key: str, module: nn.Module, dims: tuple[int, int], like: torch.Tensor
    ) -> None:
        super().__init__(key)
        in_f, out_f = dims
        r = self.r = pattern_value(cfg.rank_pattern, key, cfg.init_r)
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter(nn.init.normal_(torch.empty(r, in_f), std=0.02).to(**kw))
        self.lora_B = nn.Parameter(nn.init.normal_(torch.empty(out_f, r), std=0.02).to(**kw))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.scale = cfg.alpha / (cfg.init_r + 1e-5)  # PEFT's ranknum stays init_r, also in pruned files
        self.p = cfg.dropout
        self.weight_path_exact = not self.p
        self.conv1d = is_conv1d(module)
        # the triplets the schedule keeps (1) or has cut (0); saved, so a reloaded delta keeps its ranks
        self.register_buffer("rank_mask", torch.ones(r, device=like.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A * self.lora_E, self.lora_B

    def kept(self) -> int:
        return int(self.rank_mask.sum().item())

    def describe(self) -> str:
        kept = self.kept()
        return f"AdaLoRA r={self.r}" + (f" (kept {kept})" if kept != self.r else "")


class RankAllocator:
    """PEFT's AdaLoRA budget schedule over one AdaLoRA delta. Call `update_and_allocate(step)` after
    each optimizer step, while the gradients are still there; add `penalty()` to the loss."""

    def __init__(self, delta: Any, total_step: int | None = None) -> None:
        if getattr(delta, "method", None) != "adalora":
            raise ConfigError(f"the AdaLoRA schedule is for AdaLoRA deltas, got {delta!r}")
        cfg: AdaLoRAConfig = delta.config
        if total_step is not None:  # (a Trainer knows its step count when the config does not)
            cfg = dataclasses.replace(cfg, total_step=total_step)
        if cfg.total_step is None:
            raise ConfigError("AdaLoRA's schedule needs AdaLoRAConfig.total_step (the number of training steps)")
        self.delta, self.cfg, self.total_step = delta, cfg, cfg.total_step
        self.pieces = [p for p in delta.pieces.values() if isinstance(p, SVDLoRA)]  # (not also_train copies)
        self.init_budget = sum(p.r for p in self.pieces)
        self.target_budget = cfg.target_r * len(self.pieces)
        self.reset()

    def reset(self) -> None:
        self.avg_ipt: dict[int, torch.Tensor] = {}
        self.avg_unc: dict[int, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(the total rank at `step`, whether this step reallocates): PEFT's cubic schedule."""
        c = self.cfg
        if step <= c.tinit:
            return self.init_budget, False
        if step > self.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (self.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * left**3 + self.target_budget), step % c.deltaT == 0

    def _tensors(self) -> list[torch.Tensor]:
        return [t for p in self.pieces for t in (p.lora_A, p.lora_B, p.lora_E)]

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for t in self._tensors():
            if t.grad is None:
                raise ConfigError(
                    "AdaLoRA's schedule reads the gradients: call update_and_allocate(step) after "
                    "backward() and before the optimizer's zero_grad()"
                )
            ipt = (t * t.grad).abs()
            avg = self.avg_ipt.get(id(t), torch.zeros_like(t))
            avg = b1 * avg + (1 - b1) * ipt
            self.avg_unc[id(t)] = b2 * self.avg_unc.get(id(t), torch.zeros_like(t)) + (1 - b2) * (ipt - avg).abs()
            self.avg_ipt[id(t)] = avg

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        score = {id(t): self.avg_ipt[id(t)] * self.avg_unc[id(t)] for t in self._tensors()}
        triplets = [
            score[id(p.lora_E)].view(-1) + score[id(p.lora_A)].mean(dim=1) + score[id(p.lora_B)].mean(dim=0)
            for p in self.pieces
        ]
        if budget >= self.init_budget:
            return  # nothing to cut yet
        threshold = torch.kthvalue(torch.cat(triplets), k=self.init_budget - budget)[0].item()
        for p, s in zip(self.pieces, triplets, strict=True):
            keep = s > threshold
            p.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            p.rank_mask.copy_(keep.to(p.rank_mask.dtype))

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for p in self.pieces:
            p.lora_E.mul_(p.rank_mask.view(-1, 1).to(p.lora_E.dtype))

    def update_and_allocate(self, step: int) -> None:
        """One step of PEFT's `update_and_allocate`: importance, then (on schedule) the cut."""
        final = self.total_step - self.cfg.tfinal
        if step < final:
            self._update_importance()
            budget, now = self.budget(step)
            if now:
                self._mask_to(budget)
        elif step == final:  # the final allocation, then the ranks stay
            self._mask_to(self.budget(step)[0])
            self.reset()
        else:
            self._apply_masks()

    def penalty(self) -> torch.Tensor:
        """orth_reg_weight · mean over A's and B's of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F (PEFT's regulariser)."""
        terms = []
        for p in self.pieces:
            for cov in (p.lora_A @ p.lora_A.T, p.lora_B.T @ p.lora_B):
                terms.append(
                    torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))
                )
        return self.cfg.orth_reg_weight * torch.stack(terms).mean()


class AdaLoRACodec(PeftCodec):
    """PEFT's ADALORA files. A file from a finished schedule holds only the kept triplets, and its
    rank_pattern lists, per layer, which of the init_r triplets they were: the layer's rank is read
    off its tensors, the scale keeps init_r."""

    peft_type = "ADALORA"
    understood = frozenset(
        {
            "r",
            "init_r",
            "target_r",
            "lora_alpha",
            "lora_dropout",
            "tinit",
            "tfinal",
            "deltaT",
            "beta1",
            "beta2",
            "orth_reg_weight",
            "total_step",
            "rank_pattern",
            "fan_in_fan_out",
            "bias",
            "init_lora_weights",
            "layers_to_transform",
            "modules_to_save",
            "target_modules",
        }
    )
    suffixes = {".lora_A": "lora_A", ".lora_B": "lora_B", ".lora_E": "lora_E"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        init_r = int(peft_config.get("init_r", 12))
        ranks = {s: int(ts["lora_E"].shape[0]) for s, ts in named.items() if "lora_E" in ts}
        if any(k > init_r for k in ranks.values()):
            raise DeltaFileError(
                f"the AdaLoRA file has layers of rank {max(ranks.values())}, above its init_r={init_r}"
            )
        total = peft_config.get("total_step")
        tinit, tfinal = int(peft_config.get("tinit", 0)), int(peft_config.get("tfinal", 0))
        try:
            cfg = AdaLoRAConfig(
                targets=[exact(s) for s in named],
                init_r=init_r,
                target_r=min(int(peft_config.get("target_r", 8)), init_r),
                alpha=float(peft_config.get("lora_alpha", 8)),
                dropout=float(peft_config.get("lora_dropout") or 0.0),
                total_step=int(total) if total and tinit < int(total) - tfinal else None,
                tinit=tinit,
                tfinal=tfinal,
                deltaT=int(peft_config.get("deltaT", 1)),
                beta1=float(peft_config.get("beta1", 0.85)),
                beta2=float(peft_config.get("beta2", 0.85)),
                orth_reg_weight=float(peft_config.get("orth_reg_weight", 0.5)),
                rank_pattern={re.escape(s): k for s, k in ranks.items() if k != init_r} or None,
                **common,
            )
        except ConfigError as exc:
            raise DeltaFileError(f"PEFT's AdaLoRA config does not fit: {exc}") from None
        tensors = self.flat(named)
        for s, k in ranks.items():  # every triplet in the file was kept
            tensors[f"{s}.rank_mask"] = torch.ones(k)
        return cfg, tensors

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: AdaLoRAConfig = delta.config
        tensors: dict[str, torch.Tensor] = {}
        pattern: dict[str, list[bool]] = {}
        for p in pieces:
            keep = p.rank_mask.bool()
            for name, t, dim in (("lora_A", p.lora_A, 0), ("lora_B", p.lora_B, 1), ("lora_E", p.lora_E, 0)):
                tensors[f"{p.key}.{name}"] = t.detach().index_select(dim, keep.nonzero().view(-1)).contiguous()
            # (PEFT resizes each layer from init_r: a list of init_r flags, the kept ones first)
            pattern[f"{p.key}.lora_E"] = keep.tolist() + [False] * (cfg.init_r - p.r)
        fields = {
            "peft_type": "ADALORA",
            "r": cfg.target_r,
            "init_r": cfg.init_r,
            "target_r": cfg.target_r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "tinit": cfg.tinit,
            "tfinal": cfg.tfinal,
            "deltaT": cfg.deltaT,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_reg_weight,
            "total_step": cfg.total_step or 1,
            "bias": "none",
            "init_lora_weights": True,
            "rank_pattern": pattern if any(not all(v) for v in pattern.values()) else None,
            **self.tuner_fields(delta, pieces),
        }
        return fields, tensors


AdaLoRAConfig.peft_codec = AdaLoRACodec()
