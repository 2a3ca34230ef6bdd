"""OFT (Qiu et al. 2023; PEFT 0.21's input-side form): a block-diagonal orthogonal rotation of a
linear layer's input, y = W (R x) + b, i.e. W' = W Rᵀ. R has r blocks of size b (r·b = in),
each the Cayley transform of a skew-symmetric matrix built from b(b−1)/2 trained numbers
(exact, or PEFT's default Cayley–Neumann series of `num_cayley_neumann_terms`); block_share
uses one block for all; coft projects the numbers into an eps-ball before each use (in place, as
PEFT does). The numbers start at zero: R = I, a fresh OFT changes nothing. Applied in a
forward-pre hook (b² work per input row, never a full weight: measured on the 2-core CPU, a
1024-wide layer with b=32, it costs 0.12x the weight-side W·Rᵀ at 1 token, 0.39x at 512 and
1.02x at 4096); merge writes W Rᵀ and keeps the
original, so unmerge is exact. Layout is PEFT's (`oft_R` [r, b(b−1)/2]), so its OFT files map
one-to-one."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, check_float, check_int, exact
from ..engine import Piece, current, map_first_input
from ..errors import ConfigError, DeltaFileError, UnsupportedModuleError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like


def fit_blocks(in_features: int, wanted: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of in_features nearest `wanted`."""
    if wanted >= in_features:
        return in_features
    higher = wanted
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = wanted
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


@dataclass(frozen=True, kw_only=True)
class OFTConfig(DeltaConfig):
    """OFT. Give oft_block_size (b, default 32) or r (the number of blocks), not both; a size that
    does not divide a layer's input is moved to the nearest one that does, with a warning (as
    PEFT). use_cayley_neumann / num_cayley_neumann_terms: PEFT's fast approximate Cayley (its
    default) or the exact one; coft / eps: constrained OFT; block_share: one block for all.
    Linear layers. Default targets: the attention query and value projections."""

    r: int = 0
    oft_block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False

    method = "oft"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        for name in ("r", "oft_block_size"):
            check_int(self, name, minimum=0)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"OFTConfig: give exactly one of r (blocks) and oft_block_size, the other 0; got "
                f"r={self.r}, oft_block_size={self.oft_block_size}"
            )
        check_int(self, "num_cayley_neumann_terms", minimum=1)
        for name in ("use_cayley_neumann", "coft", "block_share"):
            check_bool(self, name)
        check_float(self, "eps", low=0.0, low_open=True)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        for key in sites:
            module = linear_layer(model, key, "OFT", "rotates the input of")
            in_f = layer_dims(model, module, key)[0]
            wanted = self.oft_block_size or self.r
            fitted = fit_blocks(in_f, wanted)
            if fitted != wanted:
                warnings.warn(
                    f"OFT at {key!r}: {'oft_block_size' if self.oft_block_size else 'r'}={wanted} does not "
                    f"divide its {in_f} input features; using {fitted}",
                    stacklevel=3,
                )
            block = fitted if self.oft_block_size else in_f // fitted
            pieces.append(Rotation(self, key, module, in_f, block, layer_like(model, key, module)))
        return pieces


class Rotation(Piece):
    hooks = frozenset({"pre"})
    rewrites_input = True
    merges_by = "value"  # W Rᵀ: only the kept original undoes it

    def __init__(self, cfg: OFTConfig, key: str, module: nn.Module, in_f: int, block: int, like: torch.Tensor) -> None:
        super().__init__(key)
        if not like.is_floating_point():
            raise UnsupportedModuleError(f"OFT needs a floating-point weight at {key!r}, found {like.dtype}")
        self.block, self.blocks = block, in_f // block
        self.oft_R = nn.Parameter(
            torch.zeros(
                1 if cfg.block_share else self.blocks, block * (block - 1) // 2, device=like.device, dtype=like.dtype
            )
        )
        rows, cols = torch.triu_indices(block, block, 1, device=like.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.neumann = cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else 0
        self.coft, self.eps = cfg.coft, cfg.eps
        self.conv1d = is_conv1d(module)

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        q = vec.new_zeros(vec.shape[0], self.block, self.block)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(-2, -1)

    def _project(self) -> None:
        """COFT: move each block's numbers into the eps-ball around 0 (PEFT's _project_batch)."""
        with torch.no_grad():
            q = self._skew(self.oft_R)
            eps = self.eps / math.sqrt(q.shape[0])
            norm = q.norm(dim=(1, 2), keepdim=True)
            q = torch.where(norm <= eps, q, eps * q / norm)
            self.oft_R.copy_(q[:, self.rows, self.cols])

    def blocks_R(self) -> torch.Tensor:
        """The rotation's blocks [r, b, b]: Cayley (I − Q)(I + Q)⁻¹, or its Neumann series."""
        q = self._skew(self.oft_R)
        eye = torch.eye(self.block, device=q.device, dtype=q.dtype).expand_as(q)
        if not self.neumann:
            wide = torch.promote_types(q.dtype, torch.float32)  # (no bf16/fp16 LU on the CPU)
            rot = torch.linalg.solve((eye + q).to(wide), (eye - q).to(wide), left=False).to(q.dtype)
        else:  # PEFT's truncated series, term for term: I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)
            n, rot = self.neumann, eye
            if n > 1:
                rot = rot + 2 * q
            if n > 2:
                power = q @ q
                rot = rot + 2 * power
                for _ in range(3, n - 1):
                    power = power @ q
                    rot = rot + 2 * power
                rot = rot + power @ q
        return rot.expand(self.blocks, -1, -1) if rot.shape[0] == 1 else rot

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.coft:
            self._project()
        rot = self.blocks_R()

        def turn(x: torch.Tensor) -> torch.Tensor:
            y = x.to(rot.dtype).reshape(*x.shape[:-1], self.blocks, self.block)
            return torch.einsum("...rk,rkc->...rc", y, rot).reshape(x.shape).to(x.dtype)

        return map_first_input(args, kwargs, turn)

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        full = torch.block_diag(*self.blocks_R().float())  # [in, in]: y = x·R_bd·Wᵀ
        w = current(module, "weight").float()
        return {"weight": full @ w if self.conv1d else w @ full.T}  # Conv1D keeps W as [in, out]

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return f"OFT {self.blocks}x{self.block}" + (" shared" if self.oft_R.shape[0] == 1 else "")


class OFTCodec(PeftCodec):
    """PEFT's OFT files (0.17 and later: the input-side form): `oft_R.weight` [r, b(b−1)/2] per
    layer; a layer's block size is read from its tensor. module_dropout only acts while PEFT
    trains: read, not applied."""

    peft_type = "OFT"
    understood = frozenset(
        {
            "r",
            "oft_block_size",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
            "coft",
            "eps",
            "block_share",
            "module_dropout",
            "init_weights",
            "fan_in_fan_out",
            "layers_to_transform",
            "modules_to_save",
            "bias",
        }
    )
    suffixes = {".oft_R.weight": "oft_R"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        out = self.refuse_bias(peft_config)
        if "oft_block_size" not in peft_config:
            out.append("an OFT adapter from PEFT before 0.14 (another parametrization)")
        version = str(peft_config.get("peft_version") or "0").partition("@")[0]
        if peft_config.get("use_cayley_neumann") and _older(version, (0, 18)):
            out.append(
                f"use_cayley_neumann from PEFT {version if version != '0' else 'before 0.18'} (its series "
                "changed in 0.18; hookdelta computes the new one)"
            )
        return out

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        sizes = {round((1 + math.sqrt(1 + 8 * ts["oft_R"].shape[1])) / 2) for ts in named.values()}
        if len(sizes) != 1:
            raise DeltaFileError(
                f"the OFT file's layers use different block sizes {sorted(sizes)}; hookdelta's OFT "
                "uses one block size for all its layers"
            )
        cfg = OFTConfig(
            r=0,
            oft_block_size=sizes.pop(),
            coft=bool(peft_config.get("coft")),
            eps=float(peft_config.get("eps", 6e-5)),
            block_share=bool(peft_config.get("block_share")),
            use_cayley_neumann=bool(peft_config.get("use_cayley_neumann", True)),
            num_cayley_neumann_terms=int(peft_config.get("num_cayley_neumann_terms", 5)),
            targets=[exact(s) for s in named],
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        sizes = {p.block for p in pieces}
        if len(sizes) != 1:
            raise UnsupportedModuleError(
                f"delta {delta.name!r} uses OFT blocks of sizes {sorted(sizes)} on different "
                "layers; PEFT's file holds one oft_block_size. Save it with delta.save()"
            )
        cfg: OFTConfig = delta.config
        tensors = {f"{p.key}.oft_R.weight": p.oft_R.detach().contiguous() for p in pieces}
        fields = {
            "peft_type": "OFT",
            "r": 0,
            "oft_block_size": sizes.pop(),
            "coft": cfg.coft,
            "eps": cfg.eps,
            "block_share": cfg.block_share,
            "use_cayley_neumann": cfg.use_cayley_neumann,
            "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
            "module_dropout": 0.0,
            "init_weights": True,
            "bias": "none",
            **self.tuner_fields(delta, pieces),
            "peft_version": "0.18.0",
        }  # the file format (and Cayley-Neumann series) of PEFT 0.18 and later
        return fields, tensors


def _older(version: str, than: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[: len(than)]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) < than


OFTConfig.peft_codec = OFTCodec()
