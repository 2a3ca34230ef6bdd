"""VeRA (Kopiczko et al. 2024): one pair of frozen random projections A [r, in_max] and
B [out_max, r] shared by every adapted layer (each reads its top-left slice), and two trained
vectors per layer: y + b ⊙ B(d ⊙ A x). Only d and b are trained and saved; A and B are
regenerated from `projection_prng_key` exactly as PEFT draws them (kaiming-uniform from a
seeded CPU generator), so PEFT's VERA files map one-to-one. b starts at zero: a fresh VeRA
changes nothing. Mergeable: ΔW = diag(b)·B·diag(d)·A."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, PeftCodec, check_float, check_int, exact
from ..engine import Piece, first_input
from ..errors import ConfigError, DeltaFileError, UnsupportedModuleError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like


def projections(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared A [r, in_max] and B [out_max, r]: kaiming-uniform (gain sqrt 2, fan-in the
    second dim), A first, from one CPU generator seeded with `key`."""
    g = torch.Generator(device="cpu").manual_seed(key)
    out = []
    for shape in ((r, in_max), (out_max, r)):
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=g))
    return out[0], out[1]


@dataclass(frozen=True, kw_only=True)
class VeRAConfig(DeltaConfig):
    """VeRA. r: rank of the shared projections (VeRA uses large ones, 256 by default);
    projection_prng_key: the seed A and B are drawn from; d_initial: d's initial value;
    dropout: on the delta's input while the host trains. Linear layers only.
    Default targets: the attention query and value projections."""

    r: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    method = "vera"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_int(self, "projection_prng_key", minimum=0)
        check_float(self, "d_initial", low=-math.inf)
        check_float(self, "dropout", low=0.0, high=1.0)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        dims = {}
        for key in sites:
            module = linear_layer(model, key, "VeRA", "adapts")
            dims[key] = layer_dims(model, module, key)
        a, b = projections(
            self.r, max(i for i, _ in dims.values()), max(o for _, o in dims.values()), self.projection_prng_key
        )
        return [
            VeRALinear(
                self, key, model.get_submodule(key), dims[key], a, b, layer_like(model, key, model.get_submodule(key))
            )
            for key in sites
        ]


class VeRALinear(Piece):
    hooks = frozenset({"post"})
    additive = True

    def __init__(
        self,
        cfg: VeRAConfig,
        key: str,
        module: nn.Module,
        dims: tuple[int, int],
        a: torch.Tensor,
        b: torch.Tensor,
        like: torch.Tensor,
    ) -> None:
        super().__init__(key)
        in_f, out_f = dims
        if not like.is_floating_point():
            raise UnsupportedModuleError(f"VeRA needs a floating-point weight at {key!r}, found {like.dtype}")
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        # frozen and not saved: regenerated from the seed (each piece holds its slice)
        self.register_buffer("vera_A", a[:, :in_f].to(**kw), persistent=False)
        self.register_buffer("vera_B", b[:out_f, :].to(**kw), persistent=False)
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_f, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **kw))
        self.p, self.r = cfg.dropout, cfg.r
        self.conv1d = is_conv1d(module)
        self.weight_path_exact = not self.p

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_input(args, kwargs)
        x = x if x.dtype == self.vera_A.dtype else x.to(self.vera_A.dtype)
        if self.p and module.training:
            x = F.dropout(x, self.p, training=True)
        y = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, self.vera_A), self.vera_B)
        return output + (y if y.dtype == output.dtype else y.to(output.dtype))

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        dw = (self.vera_lambda_b.float()[:, None] * self.vera_B.float()) @ (
            self.vera_lambda_d.float()[:, None] * self.vera_A.float()
        )
        return {"weight": dw.T if self.conv1d else dw}

    def describe(self) -> str:
        return f"VeRA r={self.r}"


class VeRACodec(PeftCodec):
    """PEFT's VERA files: vera_lambda_b / vera_lambda_d per layer; the shared projections
    (base_model.vera_A / vera_B, written when save_projection) must equal the seed's."""

    peft_type = "VERA"
    understood = frozenset(
        {
            "r",
            "projection_prng_key",
            "save_projection",
            "vera_dropout",
            "d_initial",
            "fan_in_fan_out",
            "layers_to_transform",
            "modules_to_save",
            "init_weights",
            "bias",
        }
    )
    suffixes = {".vera_lambda_b": "vera_lambda_b", ".vera_lambda_d": "vera_lambda_d"}
    shared_keys = frozenset({"base_model.vera_A", "base_model.vera_B"})

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        return self.refuse_bias(peft_config)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        try:
            cfg = VeRAConfig(
                r=int(peft_config.get("r", 256)),
                projection_prng_key=int(peft_config.get("projection_prng_key", 0)),
                d_initial=float(peft_config.get("d_initial", 0.1)),
                dropout=float(peft_config.get("vera_dropout") or 0.0),
                targets=[exact(s) for s in named],
                **common,
            )
        except ConfigError as exc:
            raise DeltaFileError(f"PEFT's VeRA config does not fit: {exc}") from None
        shared = peft_config.get("__shared__", {})
        if len(shared) == 1:
            raise DeltaFileError(f"the VeRA file holds {sorted(shared)[0]} without its partner projection")
        if shared:  # the file's projections must be the ones the seed gives, or the adapter means something else
            a, b = projections(
                cfg.r,
                shared["base_model.vera_A"].shape[1],
                shared["base_model.vera_B"].shape[0],
                cfg.projection_prng_key,
            )
            if not (
                torch.equal(a, shared["base_model.vera_A"].float())
                and torch.equal(b, shared["base_model.vera_B"].float())
            ):
                raise DeltaFileError(
                    "the VeRA file's saved projections (vera_A / vera_B) differ from the ones its "
                    f"projection_prng_key={cfg.projection_prng_key} gives; hookdelta regenerates them "
                    "from the key, so it cannot load this file"
                )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: VeRAConfig = delta.config
        tensors = self.piece_tensors(pieces)
        a, b = projections(
            cfg.r,
            max(p.vera_A.shape[1] for p in pieces),
            max(p.vera_B.shape[0] for p in pieces),
            cfg.projection_prng_key,
        )
        tensors.update({"vera_A": a, "vera_B": b})  # PEFT's save_projection=True, its default
        fields = {
            "peft_type": "VERA",
            "r": cfg.r,
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": True,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "bias": "none",
            **self.tuner_fields(delta, pieces),
        }
        return fields, tensors

    def file_key(self, key: str) -> str:
        return "base_model." + key if key in ("vera_A", "vera_B") else self.prefix + key


VeRAConfig.peft_codec = VeRACodec()
