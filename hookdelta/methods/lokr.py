"""LoKr (Yeh et al. 2023; LyCORIS): ΔW = s · W1 ⊗ W2, a Kronecker product of a small matrix W1
[a, c] and a larger W2 [b, d·k] (out = a·b, in = c·d, split by PEFT's `factorization`, or by
decompose_factor). W2 is low-rank (W2a·W2b) when r is below half its size, W1 too with
decompose_both; with use_effective_conv2d a conv's W2 gets a CP core over the kernel. Layouts
and initialisation are PEFT's, so its LOKR files map one-to-one. W1 starts at zero: a fresh
LoKr changes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, exact
from ..engine import Piece
from ..errors import ConfigError
from .dense_delta import DenseDelta, DenseDeltaConfig, kaiming_, peft_fields, peft_rank_fields

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dimension: m = factor where it divides, else the divisor pair
    nearest the square root with m <= factor (PEFT's and LyCORIS' rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True, kw_only=True)
class LoKrConfig(DenseDeltaConfig):
    """LoKr: ΔW = W1 ⊗ W2 (fields: DenseDeltaConfig's, and) decompose_both: W1 low-rank too (when
    r is below half its size); decompose_factor: the size of W1's sides (-1: near the square
    root); init: "default" (W1 zero) or "lycoris" (W2's second factor zero)."""

    decompose_both: bool = False
    decompose_factor: int = -1
    init: str = "default"

    method = "lokr"

    def validate(self) -> None:
        super().validate()
        check_bool(self, "decompose_both")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f < 1):
            raise ConfigError(
                f"LoKrConfig.decompose_factor must be -1 (near the square root) or an integer >= 1, got {f!r}"
            )
        if self.init not in ("default", "lycoris"):
            raise ConfigError(f"LoKrConfig.init must be one of ['default', 'lycoris'], got {self.init!r}")


class Kronecker(DenseDelta):
    def __init__(self, cfg: LoKrConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "LoKr")
        shape, kw = self.shape, self.kw
        r, kernel = self.r, tuple(shape[2:])
        (a, b), (c, d) = factorization(shape[0], cfg.decompose_factor), factorization(shape[1], cfg.decompose_factor)
        full1 = not (cfg.decompose_both and r < max(a, c) / 2)
        full2 = r >= max(b, d) / 2
        self.cp = not full2 and cfg.use_effective_conv2d and math.prod(kernel) > 1
        if full1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, **kw))
        else:
            self.lokr_w1_a, self.lokr_w1_b = (
                nn.Parameter(torch.empty(a, r, **kw)),
                nn.Parameter(torch.empty(r, c, **kw)),
            )
        if full2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel, **kw))
        elif self.cp:
            core = kernel + ((1,) if len(kernel) == 1 else ())  # PEFT keeps Conv1d's core 4-D
            self.lokr_t2 = nn.Parameter(kaiming_(torch.empty(r, r, *core, **kw)))
            self.lokr_w2_a, self.lokr_w2_b = (
                nn.Parameter(torch.empty(r, b, **kw)),
                nn.Parameter(torch.empty(r, d, **kw)),
            )
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r, **kw))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel), **kw))
        with torch.no_grad():
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
                if hasattr(self, name):
                    kaiming_(getattr(self, name))
            # PEFT's zero: W1 (or its first factor) by default, W2 (or its second factor) the LyCORIS way
            zero = ("lokr_w1", "lokr_w1_a") if cfg.init == "default" else ("lokr_w2", "lokr_w2_b")
            getattr(self, zero[0] if hasattr(self, zero[0]) else zero[1]).zero_()

    def delta(self) -> torch.Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2: torch.Tensor
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif self.cp:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() == 4:  # a Conv2d's W2 [b, d, kh, kw] (or a CP one): the kernel rides along
            w1 = w1[:, :, None, None]
        # (a Conv1d's full W2 [b, d, k] meets the 2-D W1 as torch.kron pads it, [1, a, c]: PEFT's
        # arithmetic, kept so that its files load to its outputs)
        return (torch.kron(w1, w2.contiguous()) * self.scale).reshape(self.shape)

    def describe(self) -> str:
        return f"LoKr r={self.r} scale={self.scale:g}"


class LoKrCodec(PeftCodec):
    """PEFT's LOKR files. rank_dropout, module_dropout and rank_dropout_scale only act while PEFT
    trains: read, not applied (hookdelta's LoKr has no dropout)."""

    peft_type = "LOKR"
    understood = frozenset(
        {
            "r",
            "alpha",
            "rank_pattern",
            "alpha_pattern",
            "use_effective_conv2d",
            "decompose_both",
            "decompose_factor",
            "rank_dropout",
            "module_dropout",
            "rank_dropout_scale",
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
        ranks = {s: int(ts[n].shape[0]) for s, ts in named.items() for n in ("lokr_w2_b", "lokr_w1_b") if n in ts}
        init = "lycoris" if peft_config.get("init_weights") == "lycoris" else "default"
        cfg = LoKrConfig(
            targets=[exact(s) for s in named],
            **peft_rank_fields(peft_config, named, ranks),
            decompose_both=bool(peft_config.get("decompose_both")),
            decompose_factor=int(peft_config.get("decompose_factor", -1)),
            use_effective_conv2d=bool(peft_config.get("use_effective_conv2d")),
            init=init,
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        cfg = delta.config
        fields = peft_fields(
            "LOKR",
            delta,
            pieces,
            decompose_both=cfg.decompose_both,
            decompose_factor=cfg.decompose_factor,
            init_weights="lycoris" if cfg.init == "lycoris" else True,
        )
        return fields, self.piece_tensors(pieces)


LoKrConfig.peft_codec = LoKrCodec()


LoKrConfig.piece_class = Kronecker
