"""FourierFT (Gao et al. 2024): the weight change is a sparse 2-D spectrum: n trainable
coefficients c at fixed random frequencies (a seeded permutation of the out × in grid), and
ΔW = scaling · Re(IFFT2(C)) with C zero but for c at those frequencies. A few hundred numbers per
layer instead of LoRA's r·(in + out). PEFT's arithmetic and files (FOURIERFT): the frequencies
come from `random_loc_seed` (the same draw as PEFT's, so they are not saved), `scaling` is not
divided by anything, the spectrum starts random (`init_weights=False`, PEFT's default) or at zero.
On nn.Linear and transformers' Conv1D, as PEFT."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import (
    MAX_ALPHA,
    DeltaConfig,
    PeftCodec,
    after_dot_pattern,
    check_bool,
    check_float,
    check_int,
    check_patterns,
    exact,
)
from ..engine import Piece
from ..errors import ConfigError, UnsupportedModuleError
from ..modules import is_linear_like
from .dense_delta import DenseDelta


@dataclass(frozen=True, kw_only=True)
class FourierFTConfig(DeltaConfig):
    """FourierFT: n_frequency trainable spectral coefficients per layer (n_frequency_pattern:
    per-layer counts, keyed as PEFT's: a regex matched at the end of the layer's path), ΔW =
    scaling · Re(IFFT2(spectrum)), frequencies drawn with random_loc_seed; init_weights=True starts
    the spectrum at zero (a fresh delta then changes nothing), False (PEFT's default) at N(0, 1)."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    n_frequency_pattern: dict[str, int] | None = None
    init_weights: bool = False

    method = "fourierft"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "n_frequency")
        check_float(self, "scaling", low=0.0, low_open=True, high=MAX_ALPHA, high_open=False)
        check_int(self, "random_loc_seed", minimum=0)
        check_bool(self, "init_weights")
        check_patterns(self, (("n_frequency_pattern", True),))

    def frequencies_for(self, key: str) -> int:
        """PEFT's rule for n_frequency_pattern, the first key that matches the end of the path after
        a dot, or a key that is the whole path."""
        for pattern, value in (self.n_frequency_pattern or {}).items():
            if re.match(rf".*\.{pattern}$", key) or re.fullmatch(pattern, key):
                return value
        return self.n_frequency

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [Spectrum(self, key, model.get_submodule(key), model) for key in sites]


class Spectrum(DenseDelta):
    def __init__(self, cfg: FourierFTConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        if not is_linear_like(module):
            raise UnsupportedModuleError(
                f"FourierFT adapts linear layers (nn.Linear, transformers Conv1D), as PEFT; "
                f"{key!r} is a {type(module).__name__}. Narrow the targets."
            )
        super().__init__(cfg, key, module, model, "FourierFT", ranked=False)
        out, inp = self.shape
        n = cfg.frequencies_for(key)
        if n > out * inp:
            raise ConfigError(
                f"FourierFT: n_frequency {n} at {key!r} is more than the layer's {out} x {inp} "
                "frequencies; lower it (or its n_frequency_pattern entry)"
            )
        self.n, self.scale, self.seed = n, float(cfg.scaling), cfg.random_loc_seed
        flat = torch.randperm(out * inp, generator=torch.Generator().manual_seed(self.seed))[:n]
        # (derived from the seed: not saved, as PEFT does not)
        self.register_buffer("indices", torch.stack([flat // inp, flat % inp]), persistent=False)
        spectrum = torch.zeros(n) if cfg.init_weights else torch.randn(n)  # (PEFT draws from the global generator)
        self.fourierft_spectrum = nn.Parameter(spectrum.to(**self.kw))

    def delta(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, device=self.fourierft_spectrum.device)  # (no FFT in half precision)
        dense = dense.index_put((self.indices[0], self.indices[1]), self.fourierft_spectrum.float())
        return (torch.fft.ifft2(dense).real * self.scale).to(self.fourierft_spectrum.dtype)

    def describe(self) -> str:
        return f"FourierFT n={self.n} scaling={self.scale:g}"


class FourierFTCodec(PeftCodec):
    """PEFT's FOURIERFT files: one `fourierft_spectrum` per layer; the frequencies follow from
    random_loc_seed, so a file's counts and seed give the layer exactly."""

    peft_type = "FOURIERFT"
    understood = frozenset(
        {
            "n_frequency",
            "scaling",
            "random_loc_seed",
            "fan_in_fan_out",
            "n_frequency_pattern",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
            "bias",
        }
    )
    suffixes = {".fourierft_spectrum": "fourierft_spectrum"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        n = int(peft_config.get("n_frequency", 1000))
        counts = {s: int(ts["fourierft_spectrum"].numel()) for s, ts in named.items()}
        cfg = FourierFTConfig(
            targets=[exact(s) for s in named],
            n_frequency=n,
            scaling=float(peft_config.get("scaling", 150.0)),
            random_loc_seed=int(peft_config.get("random_loc_seed", 777)),
            n_frequency_pattern={re.escape(s): k for s, k in counts.items() if k != n} or None,
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: FourierFTConfig = delta.config
        fields = {
            "peft_type": "FOURIERFT",
            "n_frequency": cfg.n_frequency,
            "scaling": cfg.scaling,
            "random_loc_seed": cfg.random_loc_seed,
            "init_weights": cfg.init_weights,
            "n_frequency_pattern": {after_dot_pattern(p.key): p.n for p in pieces if p.n != cfg.n_frequency},
            **self.tuner_fields(delta, pieces),
        }
        return fields, self.piece_tensors(pieces)


FourierFTConfig.peft_codec = FourierFTCodec()
