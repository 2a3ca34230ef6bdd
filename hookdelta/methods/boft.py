"""BOFT (Liu et al. 2024, butterfly orthogonal fine-tuning; PEFT's BOFT): the input is rotated by
a product of m butterfly factors, each a permuted block-diagonal orthogonal matrix (blocks of
size b, Cayley transforms of trained b×b matrices), and the layer's output (bias aside) is
scaled per feature: y = s ⊙ (W·(M x)) + bias, M = Π Pᵢ·Dᵢ·Pᵢᵀ. With m = 1 it is OFT with a
learned output scale. Trained numbers start at zero and s at one: a fresh BOFT changes
nothing. Mergeable: W' = diag(s)·W·Mᵀ, the original kept for an exact unmerge. Layouts are
PEFT's (`boft_R` [m, blocks, b, b], `boft_s` [out, 1]), so its BOFT files map one-to-one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_int, exact
from ..engine import Piece, current, map_first_input
from ..errors import ConfigError, DeltaFileError, UnsupportedModuleError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like, live_weight


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """PEFT's block_butterfly_perm: the index order of one butterfly factor's permutation."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ConfigError("BOFT: too many blocks for this butterfly factor")
    size = n // blocks
    step = size / half
    cpu = torch.device("cpu")  # (index arithmetic on the CPU, whatever device the delta is built for)
    seq = torch.cat((torch.arange(0, step, 2, device=cpu), torch.arange(1, step, 2, device=cpu)))
    order = torch.empty(size, dtype=torch.long, device=cpu)
    for i, pos in enumerate(seq):
        order[int(i * half) : int(i * half + half)] = torch.arange(size, device=cpu)[
            int(pos * half) : int(pos * half + half)
        ]
    idx = torch.arange(n, device=cpu)
    for i in range(0, n, size):
        idx[i : i + size] = idx[i : i + size][order]
    return idx


@dataclass(frozen=True, kw_only=True)
class BOFTConfig(DeltaConfig):
    """BOFT. Give boft_block_size (b) or boft_block_num (blocks per factor), the other 0;
    boft_n_butterfly_factor: how many butterfly factors (1: block-diagonal, as OFT). Linear
    layers. Default targets: the attention query and value projections."""

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1

    method = "boft"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "boft_block_size", minimum=0)
        check_int(self, "boft_block_num", minimum=0)
        check_int(self, "boft_n_butterfly_factor", minimum=1)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                "BOFTConfig: give exactly one of boft_block_size and boft_block_num, the other 0; got "
                f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}"
            )

    def shape_for(self, key: str, n: int) -> tuple[int, int]:
        """(blocks, block size) at a layer of n input features, PEFT's rules, or a ConfigError."""
        extra = self.boft_n_butterfly_factor - 1
        if self.boft_block_num:
            blocks = self.boft_block_num
            if n % blocks or (extra and (extra > (blocks.bit_length() - 1) or blocks % 2**extra)):
                raise ConfigError(
                    f"BOFT at {key!r}: boft_block_num={blocks} does not fit {n} input features with "
                    f"{extra + 1} butterfly factors"
                )
            size = n // blocks
        else:
            size = self.boft_block_size
            if n % size or (extra and n % (size * 2**extra)):
                raise ConfigError(
                    f"BOFT at {key!r}: boft_block_size={size} does not fit {n} input features with "
                    f"{extra + 1} butterfly factors"
                )
            blocks = n // size
        if extra and (blocks % 2 or size % 2):
            raise ConfigError(
                f"BOFT at {key!r}: butterfly factors need an even block count and size, got {blocks} blocks of {size}"
            )
        return blocks, size

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        for key in sites:
            module = linear_layer(model, key, "BOFT", "rotates the input of")
            in_f, out_f = layer_dims(model, module, key)
            blocks, size = self.shape_for(key, in_f)
            pieces.append(Butterfly(self, key, module, in_f, out_f, blocks, size, layer_like(model, key, module)))
        return pieces


class Butterfly(Piece):
    hooks = frozenset({"pre", "post"})
    rewrites_input = True
    reads_weight = True  # "bias aside" reads the layer's current bias: nothing may merge below it
    merges_by = "value"  # diag(s)·W·Mᵀ: only the kept original undoes it

    def __init__(
        self,
        cfg: BOFTConfig,
        key: str,
        module: nn.Module,
        in_f: int,
        out_f: int,
        blocks: int,
        size: int,
        like: torch.Tensor,
    ) -> None:
        super().__init__(key)
        if not like.is_floating_point():
            raise UnsupportedModuleError(f"BOFT needs a floating-point weight at {key!r}, found {like.dtype}")
        m = cfg.boft_n_butterfly_factor
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.boft_R = nn.Parameter(torch.zeros(m, blocks, size, size, **kw))
        self.boft_s = nn.Parameter(torch.ones(out_f, 1, **kw))
        perms = torch.stack([butterfly_perm(in_f, blocks // 2**i, size // 2, m - 1) for i in range(m)])
        self.register_buffer("perms", perms.to(like.device), persistent=False)
        self.conv1d = is_conv1d(module)

    def rotation(self) -> torch.Tensor:
        """M [in, in] (x -> x·M): the butterfly factors' product, each Pᵢ·Dᵢ·Pᵢᵀ."""
        m, d, h, _ = self.boft_R.shape
        data = self.boft_R.reshape(m * d, h, h)
        skew = 0.5 * (data - data.transpose(1, 2))
        eye = torch.eye(h, device=data.device, dtype=data.dtype).expand_as(skew)
        # (solved in float32 at least: torch's CPU LU has no bf16/fp16 kernel; a no-op for float32)
        wide = torch.promote_types(data.dtype, torch.float32)
        blocks = torch.linalg.solve((eye + skew).to(wide), (eye - skew).to(wide), left=False)
        blocks = blocks.to(data.dtype).reshape(m, d, h, h)
        total = torch.eye(d * h, dtype=blocks.dtype, device=blocks.device)  # (m >= 1 factors follow)
        for i in range(m):
            bd = torch.block_diag(*blocks[i].unbind(0))
            p = self.perms[i]
            factor = bd[p][:, p]  # P·D·Pᵀ with P the permutation matrix of `p` (P[i, p[i]] = 1)
            total = factor if i == 0 else factor @ total
        return total

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rot = self.rotation()

        def turn(x: torch.Tensor) -> torch.Tensor:
            return (x.to(rot.dtype) @ rot).to(x.dtype)

        return map_first_input(args, kwargs, turn)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        s = self.boft_s.reshape(-1)
        if module._parameters.get("bias") is None:
            return output * s.to(output.dtype)
        bias = live_weight(module, "bias").to(output.dtype)  # (real values also where accelerate offloads)
        return (output - bias) * s.to(output.dtype) + bias

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        rot, s = self.rotation().float(), self.boft_s.float()  # W' = diag(s)·W·Mᵀ
        w = current(module, "weight").float()
        if self.conv1d:  # stored [in, out]: W'ᵀ = M·Wᵀ·diag(s)
            return {"weight": rot @ w * s.reshape(1, -1)}
        return {"weight": (w @ rot.T) * s}

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        m, d, h, _ = self.boft_R.shape
        return f"BOFT {m} factor{'s' if m > 1 else ''} of {d}x{h}"


class BOFTCodec(PeftCodec):
    """PEFT's BOFT files. The factor count and block shape are read from each tensor (PEFT on a
    machine without its CUDA kernel trains one factor whatever the config says). boft_dropout
    only acts while PEFT trains: read, not applied."""

    peft_type = "BOFT"
    understood = frozenset(
        {
            "boft_block_size",
            "boft_block_num",
            "boft_n_butterfly_factor",
            "boft_dropout",
            "init_weights",
            "fan_in_fan_out",
            "layers_to_transform",
            "modules_to_save",
            "bias",
        }
    )
    suffixes = {".boft_R": "boft_R", ".boft_s": "boft_s"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        shapes = {tuple(ts["boft_R"].shape[:3]) for ts in named.values()}  # (factors, blocks, size)
        factors, blocks, sizes = ({s[i] for s in shapes} for i in range(3))
        if len(factors) != 1 or (len(blocks) != 1 and len(sizes) != 1):
            raise DeltaFileError(
                f"the BOFT file's layers differ in factor count, block count and block size "
                f"{sorted(shapes)}; hookdelta's BOFT keeps one of them for all layers"
            )
        size, num = (sizes.pop(), 0) if len(sizes) == 1 else (0, blocks.pop())
        cfg = BOFTConfig(
            boft_block_size=size,
            boft_block_num=num,
            boft_n_butterfly_factor=factors.pop(),
            targets=[exact(s) for s in named],
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.refuse_conv1d(delta, pieces)
        cfg: BOFTConfig = delta.config
        tensors = self.piece_tensors(pieces)
        fields = {
            "peft_type": "BOFT",
            "boft_block_size": cfg.boft_block_size,
            "boft_block_num": cfg.boft_block_num,
            "boft_n_butterfly_factor": cfg.boft_n_butterfly_factor,
            "boft_dropout": 0.0,
            "init_weights": True,
            "bias": "none",
            **self.tuner_fields(delta, pieces),
        }
        return fields, tensors


BOFTConfig.peft_codec = BOFTCodec()
