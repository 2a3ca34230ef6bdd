"""RandLoRA (Albert et al. 2025): a full-rank update from many frozen random low-rank bases
shared by all layers, each basis scaled by two small trained vectors, so the update has full rank
at LoRA's parameter count: ΔW = s · B̄ · diag-scaled Ā with Ā = λ ⊙ A ⊙ γ. PEFT's arithmetic and
files (RANDLORA): the shared bases randlora_A [r, 1, min] and randlora_B [max, n_bases, r]
(n_bases = ⌈min/r⌉, min/max the smaller/larger width of the largest adapted layer), per layer
randlora_lambda [r, n_bases] and randlora_gamma [n_bases, min_dim]; s = randlora_alpha / r. λ
starts at zero: a fresh RandLoRA changes nothing. The bases are drawn from projection_prng_key
as PEFT draws them (bfloat16 kaiming, or PEFT's ternary `sparse` / `very_sparse` bases) and
saved with the delta (PEFT saves them by default too; PEFT draws in float16 where bfloat16 is
unavailable, so its own seeds are not portable)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, check_float, check_int, exact
from ..engine import Piece
from ..errors import DeltaFileError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like
from .dense_delta import LowRankDelta

BASES = "randlora_bases"


def draw_bases(
    r: int, out_dim: int, in_dim: int, key: int, sparsity: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared bases (A [r, 1, min], B [max, n_bases, r]) for the largest layer out × in."""
    big, small = max(out_dim, in_dim), min(out_dim, in_dim)
    n = math.ceil(small / r)
    g = torch.Generator(device="cpu").manual_seed(key)
    if sparsity is None:

        def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)

        a = kaiming((r, 1, small))
        b = torch.cat([kaiming((big, 1, r)) for _ in range(n)], dim=1)
    else:  # ternary: -1 / 0 / +1 with probability 1/(2·sparsity) at each end
        a, b = torch.rand((r, 1, small), generator=g), torch.rand((big, n, r), generator=g)
        a, b = (
            torch.where(t < 1 / (2 * sparsity), -1.0, torch.where(t > 1 - 1 / (2 * sparsity), 1.0, 0.0)) for t in (a, b)
        )
    return a / a.std(), b / b.std()


@dataclass(frozen=True, kw_only=True)
class RandLoRAConfig(DeltaConfig):
    """RandLoRA: r, the rank of each random basis; randlora_alpha (scale = randlora_alpha / r);
    projection_prng_key, the bases' seed; sparse / very_sparse, PEFT's ternary bases; dropout on the
    input while training; init_weights=True starts λ at zero (no change)."""

    r: int = 32
    randlora_alpha: float = 640.0
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False
    dropout: float = 0.0
    init_weights: bool = True

    method = "randlora"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_float(self, "randlora_alpha", low=0.0, low_open=True)
        check_int(self, "projection_prng_key", minimum=0)
        check_bool(self, "sparse")
        check_bool(self, "very_sparse")
        check_float(self, "dropout", low=0.0, high=1.0)
        check_bool(self, "init_weights")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        layers = [linear_layer(model, key, "RandLoRA", "adapts") for key in sites]
        dims = [layer_dims(model, m, k) for m, k in zip(layers, sites, strict=True)]
        if not dims:
            return []
        out_dim, in_dim = max(d[1] for d in dims), max(d[0] for d in dims)
        sparsity = math.sqrt(min(out_dim, in_dim)) if self.very_sparse else 3.0 if self.sparse else None
        like = layer_like(model, sites[0], layers[0])
        bases = RandomBases(sites[0], *draw_bases(self.r, out_dim, in_dim, self.projection_prng_key, sparsity), like)
        return [bases] + [
            ScaledBases(self, key, m, d, layer_like(model, key, m), bases)
            for key, m, d in zip(sites, layers, dims, strict=True)
        ]


class RandomBases(Piece):
    """The frozen bases every layer of the delta scales. It hooks nothing and changes nothing itself."""

    additive = True

    def __init__(self, site_path: str, a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> None:
        super().__init__(site_path, key=BASES)
        self.register_buffer("randlora_A", a.to(like.device, like.dtype))
        self.register_buffer("randlora_B", b.to(like.device, like.dtype))

    def describe(self) -> str:
        return f"RandLoRA bases {tuple(self.randlora_B.shape)}"


class ScaledBases(LowRankDelta):
    def __init__(
        self,
        cfg: RandLoRAConfig,
        key: str,
        module: nn.Module,
        dims: tuple[int, int],
        like: torch.Tensor,
        bases: RandomBases,
    ) -> None:
        super().__init__(key)
        self.in_f, self.out_f = dims
        small, big = min(dims), max(dims)
        n = self.n_bases = math.ceil(small / cfg.r)
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        if cfg.init_weights:
            lam, gamma = torch.zeros(cfg.r, n, **kw), torch.full((n, small), 1 / max(n, small), **kw)
        else:
            lam, gamma = torch.randn(cfg.r, n, **kw), torch.full((n, small), 1 / big, **kw)
        self.randlora_lambda, self.randlora_gamma = nn.Parameter(lam), nn.Parameter(gamma)
        object.__setattr__(self, "_bases", bases)  # a plain reference: the bases piece owns (and saves) them
        self.scale, self.p, self.r = cfg.randlora_alpha / cfg.r, cfg.dropout, cfg.r
        self.weight_path_exact = not self.p
        self.conv1d = is_conv1d(module)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [k, in], up [out, k]): PEFT's get_scaled_bases, its index order kept."""
        small, big, n = min(self.in_f, self.out_f), max(self.in_f, self.out_f), self.n_bases
        a = self._bases.randlora_A[:, :n, :small]
        scaled = (self.randlora_lambda[:, :, None] * a * self.randlora_gamma[None]).flatten(end_dim=1)  # [r·n, small]
        b = self._bases.randlora_B[:big, :n, :].flatten(start_dim=1)  # [big, n·r]
        return (scaled, b) if small == self.in_f else (b.T, scaled.T)

    def describe(self) -> str:
        return f"RandLoRA r={self.r} × {self.n_bases} bases"


class RandLoRACodec(PeftCodec):
    """PEFT's RANDLORA files: λ and γ per layer, and the shared bases (base_model.randlora_A / _B)
    when save_projection (PEFT's default); without them the bases are drawn from the key."""

    peft_type = "RANDLORA"
    understood = frozenset(
        {
            "r",
            "projection_prng_key",
            "save_projection",
            "sparse",
            "very_sparse",
            "randlora_dropout",
            "fan_in_fan_out",
            "randlora_alpha",
            "bias",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
        }
    )
    # (PEFT also writes the shared bases under every layer: copies, checked against the shared ones)
    suffixes = {
        ".randlora_lambda": "randlora_lambda",
        ".randlora_gamma": "randlora_gamma",
        ".randlora_A": "randlora_A",
        ".randlora_B": "randlora_B",
    }
    shared_keys = frozenset({"base_model.randlora_A", "base_model.randlora_B"})

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        cfg = RandLoRAConfig(
            targets=[exact(s) for s in named],
            r=int(peft_config.get("r", 32)),
            randlora_alpha=float(peft_config.get("randlora_alpha", 640)),
            projection_prng_key=int(peft_config.get("projection_prng_key", 0)),
            sparse=bool(peft_config.get("sparse")),
            very_sparse=bool(peft_config.get("very_sparse")),
            dropout=float(peft_config.get("randlora_dropout") or 0.0),
            **common,
        )
        shared = dict(peft_config.get("__shared__", {}))
        for site, ts in named.items():
            for name in ("randlora_A", "randlora_B"):
                if name in ts:
                    copy = ts.pop(name)
                    if not torch.equal(copy, shared.setdefault(f"base_model.{name}", copy)):
                        raise DeltaFileError(f"the RandLoRA file's {name} at {site!r} differs from its shared bases")
        tensors = self.flat(named)
        if len(shared) == 1:
            raise DeltaFileError(f"the RandLoRA file holds {sorted(shared)[0]} without its partner basis")
        if shared:  # the file's own bases (they replace the drawn ones on load)
            tensors[f"{BASES}.randlora_A"] = shared["base_model.randlora_A"]
            tensors[f"{BASES}.randlora_B"] = shared["base_model.randlora_B"]
        return cfg, tensors

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: RandLoRAConfig = delta.config
        layers = [p for p in pieces if isinstance(p, ScaledBases)]
        (bases,) = [p for p in pieces if isinstance(p, RandomBases)]
        fields = {
            "peft_type": "RANDLORA",
            "r": cfg.r,
            "randlora_alpha": cfg.randlora_alpha,
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": True,
            "sparse": cfg.sparse,
            "very_sparse": cfg.very_sparse,
            "randlora_dropout": cfg.dropout,
            "bias": "none",
            "init_weights": True,
            **self.tuner_fields(delta, layers),
        }
        return fields, {
            **self.piece_tensors(layers),
            "randlora_A": bases.randlora_A.detach().contiguous(),
            "randlora_B": bases.randlora_B.detach().contiguous(),
        }

    def file_key(self, key: str) -> str:
        return "base_model." + key if key in ("randlora_A", "randlora_B") else self.prefix + key


RandLoRAConfig.peft_codec = RandLoRACodec()
