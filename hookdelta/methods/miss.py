"""MiSS (Kang & Yin 2025, matrix shard sharing; PEFT's successor of Bone): one small block
shared by every shard of the weight. The input is cut into chunks of r features, the chunks are
summed, and the block maps the sum to the output: ΔW[o, i] = block[i mod r, o]. PEFT's
arithmetic and files (MISS): miss_block [r, out], or [r, mini_r] repeated across the output
("mini"); it starts at zero, so a fresh MiSS changes nothing. PEFT's "bat" form (the block
multiplies the base weight's own shards) is not built. On linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, check_choice, check_int, exact
from ..engine import Piece
from ..errors import ConfigError
from ..modules import linear_layer
from .dense_delta import DenseDelta, kaiming_


@dataclass(frozen=True, kw_only=True)
class MiSSConfig(DeltaConfig):
    """MiSS: r, the shard width (at most the layer's inputs); mode "miss" (a block [r, out]) or
    "mini" (a block [r, mini_r] repeated across the outputs, which mini_r must divide);
    init_weights=True starts the block at zero, False draws it."""

    r: int = 64
    mode: str = "miss"
    mini_r: int = 1
    init_weights: bool = True

    method = "miss"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_choice(self, "mode", ("miss", "mini"))
        check_int(self, "mini_r")
        check_bool(self, "init_weights")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return [SharedShard(self, key, linear_layer(model, key, "MiSS", "adapts"), model) for key in sites]


class SharedShard(DenseDelta):
    def __init__(self, cfg: MiSSConfig, key: str, module: nn.Module, model: nn.Module) -> None:
        super().__init__(cfg, key, module, model, "MiSS", ranked=False)
        out, inp = self.shape
        if cfg.r > inp:
            raise ConfigError(f"MiSS: r={cfg.r} is more than {key!r}'s {inp} input features; lower it")
        width = out if cfg.mode == "miss" else cfg.mini_r
        if out % width:
            raise ConfigError(f"MiSS: mini_r={width} must divide {key!r}'s {out} output features")
        self.r, self.mode = cfg.r, cfg.mode
        block = torch.zeros(cfg.r, width, **self.kw)
        self.miss_block = nn.Parameter(block if cfg.init_weights else kaiming_(block))
        self.register_buffer("shard", torch.arange(inp, device=self.kw["device"]) % cfg.r, persistent=False)

    def delta(self) -> torch.Tensor:
        block = self.miss_block.repeat(1, self.shape[0] // self.miss_block.shape[1])
        return block[self.shard].T

    def describe(self) -> str:
        return f"MiSS r={self.r}" + (" mini" if self.mode == "mini" else "")


class MiSSCodec(PeftCodec):
    """PEFT's MISS files; miss_dropout only acts while PEFT trains: read, not applied."""

    peft_type = "MISS"
    understood = frozenset(
        {"r", "miss_dropout", "mini_r", "init_weights", "bias", "layers_to_transform", "modules_to_save"}
    )
    suffixes = {".miss_block": "miss_block"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        out = self.refuse_bias(peft_config)
        if peft_config.get("init_weights") == "bat":
            out.append("init_weights='bat' (the block multiplies the base weight's shards; not built in hookdelta)")
        return out

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        mini = peft_config.get("init_weights") == "mini"
        cfg = MiSSConfig(
            targets=[exact(s) for s in named],
            r=int(peft_config.get("r", 64)),
            mode="mini" if mini else "miss",
            mini_r=int(peft_config.get("mini_r", 1)),
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: MiSSConfig = delta.config
        fields = {
            "peft_type": "MISS",
            "r": cfg.r,
            "mini_r": cfg.mini_r,
            "miss_dropout": 0.0,
            "bias": "none",
            "init_weights": "mini" if cfg.mode == "mini" else True,
            **self.tuner_fields(delta, pieces, layout=False),
        }
        return fields, self.piece_tensors(pieces)


MiSSConfig.peft_codec = MiSSCodec()
