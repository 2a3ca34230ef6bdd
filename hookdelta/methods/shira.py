"""SHiRA (Bhardwaj et al. 2024, sparse high-rank adapters): train a fixed sparse subset of the
weight's entries, r·(in + out) of them (LoRA's parameter count at rank r), so the update has
high rank and switching adapters touches few weights. PEFT's arithmetic and files (SHIRA):
shira_weight [n] holds the values at a random mask drawn from random_seed (PEFT's random_mask: a
seeded permutation of the out × in entries; None is the default-seeded generator, as in PEFT),
values start at zero. The mask follows from the seed, so hookdelta's files do not store it;
PEFT's files store it as integer `shira_indices`, which must be the seed's mask (PEFT's custom
mask functions are not reproducible from a file's config, and are refused). On linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, check_choice, check_int, exact
from ..engine import Piece
from ..errors import ConfigError, DeltaFileError
from ..modules import linear_layer
from .dense_delta import DenseDelta, weight_shape


def random_mask(out_f: int, in_f: int, count: int, seed: int | None) -> torch.Tensor:
    """PEFT's random_mask as flat row-major indices, ascending (the order of PEFT's shira_indices)."""
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    return torch.randperm(out_f * in_f, generator=g)[:count].sort().values


@dataclass(frozen=True, kw_only=True)
class SHiRAConfig(DeltaConfig):
    """SHiRA: r sets the count, r·(in + out) trained entries per layer; random_seed, the mask's seed
    (None: the default-seeded generator, PEFT's default); init_weights=True starts the values at zero."""

    r: int = 32
    random_seed: int | None = None
    mask_type: str = "random"
    init_weights: bool = True

    method = "shira"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        if self.random_seed is not None:
            check_int(self, "random_seed", minimum=0)
        check_choice(self, "mask_type", ("random",))
        check_bool(self, "init_weights")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [SparseEntries(self, key, linear_layer(model, key, "SHiRA", "adapts"), model) for key in sites]


class SparseEntries(DenseDelta):
    def __init__(self, cfg: SHiRAConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "SHiRA", ranked=False)
        out, inp = self.shape
        count = cfg.r * (out + inp)
        if count > out * inp:
            raise ConfigError(f"SHiRA: r={cfg.r} asks for {count} entries of {key!r}, which has {out * inp}; lower r")
        self.r = cfg.r
        # (derived from the seed: not saved)
        self.register_buffer(
            "flat", random_mask(out, inp, count, cfg.random_seed).to(self.kw["device"]), persistent=False
        )
        values = torch.zeros(count) if cfg.init_weights else torch.randn(count)
        self.shira_weight = nn.Parameter(values.to(**self.kw))

    def delta(self) -> torch.Tensor:
        dense = self.shira_weight.new_zeros(self.shape[0] * self.shape[1])
        return dense.index_put((self.flat,), self.shira_weight).view(self.shape)

    def indices(self) -> torch.Tensor:
        """PEFT's shira_indices [2, n] (row, column), int32."""
        return torch.stack([self.flat // self.shape[1], self.flat % self.shape[1]]).to(torch.int32)

    def describe(self) -> str:
        return f"SHiRA {self.shira_weight.numel()} entries"


class SHiRACodec(PeftCodec):
    """PEFT's SHIRA files: shira_weight and the mask as integer shira_indices per layer; the
    indices must be the mask random_seed gives (they are checked, then dropped)."""

    peft_type = "SHIRA"
    understood = frozenset({"r", "mask_type", "random_seed", "fan_in_fan_out", "init_weights", "modules_to_save"})
    suffixes = {".shira_weight": "shira_weight", ".shira_indices": "shira_indices"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        kind = peft_config.get("mask_type", "random")
        return [] if kind == "random" else [f"mask_type={kind!r} (a custom mask function, not in the file)"]

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        seed = peft_config.get("random_seed")
        cfg = SHiRAConfig(
            targets=[exact(s) for s in named],
            r=int(peft_config.get("r", 32)),
            random_seed=None if seed is None else int(seed),
            **common,
        )
        for site, ts in named.items():
            given = ts.pop("shira_indices", None)
            if given is None or given.dim() != 2 or given.shape[0] != 2:
                raise DeltaFileError(f"the SHiRA file has no shira_indices [2, n] at {site!r}")
            module = linear_layer(model, site, "SHiRA", "adapts")
            out, inp = weight_shape(model, site, module, "SHiRA")
            want = random_mask(out, inp, cfg.r * (out + inp), cfg.random_seed)
            flat = given[0].long() * inp + given[1].long()
            if flat.shape != want.shape or not torch.equal(flat, want):
                raise DeltaFileError(
                    f"the SHiRA file's mask at {site!r} is not the one random_seed={cfg.random_seed} "
                    f"and r={cfg.r} give (a custom mask?); hookdelta derives SHiRA's mask from the seed"
                )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        cfg: SHiRAConfig = delta.config
        tensors = self.piece_tensors(pieces)
        tensors.update({f"{p.key}.shira_indices": p.indices() for p in pieces})
        fields = {
            "peft_type": "SHIRA",
            "r": cfg.r,
            "mask_type": "random",
            "random_seed": cfg.random_seed,
            "init_weights": True,
            **self.tuner_fields(delta, pieces),
        }
        return fields, tensors


SHiRAConfig.peft_codec = SHiRACodec()
