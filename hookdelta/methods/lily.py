"""Lily (Zhong et al. 2025, low-rank interconnected adaptation across layers): layers share
their LoRA factors. Consecutive layers of one kind (the same leaf name and shape) share a down
projection A (`stride_A` layers per A); all layers of a kind share `num_B` up projections, mixed
per layer by a small router over the low-rank hidden state: out + s · h·(Σₑ pₑ Bₑ), h = A·x,
p = the router's softmax averaged over every token of the batch (PEFT's arithmetic: one mix per
call, so a row's output depends on the rest of its batch). PEFT's files (LILY): lily_A.weight
[r, in], lily_B.weight [num_B·r, out], lily_router.weight [num_B, r] under every layer (shared
tensors written once per layer); B starts at zero, so a fresh Lily changes nothing. Not
mergeable (the mix depends on the input), not routable per row. On linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MAX_ALPHA, DeltaConfig, PeftCodec, check_bool, check_float, check_int, exact
from ..engine import Piece, first_input
from ..errors import DeltaFileError, UnsupportedModuleError
from ..modules import layer_dims, linear_layer
from ..placement import layer_like
from ..selection import model_order
from .dense_delta import kaiming_


@dataclass(frozen=True, kw_only=True)
class LilyConfig(DeltaConfig):
    """Lily: rank r; stride_A consecutive layers of a kind share one A; num_B shared up projections
    per kind; scaling, the update's scale; init_weights=True starts the B's at zero."""

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    init_weights: bool = True

    method = "lily"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        check_int(self, "r")
        check_int(self, "stride_A")
        check_int(self, "num_B")
        check_float(self, "scaling", low=0.0, high=MAX_ALPHA, high_open=False)
        check_bool(self, "init_weights")

    def owners(self, model: nn.Module, sites: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Each site's (A owner, B owner), PEFT's sharing: layers of one kind (leaf name and shape) in
        the model's order; B from the first of the kind, A from the first of each stride_A run."""
        kinds: dict[tuple[str, tuple[int, int]], list[str]] = {}
        out: dict[str, tuple[str, str]] = {}
        for key in model_order(model, sites):
            dims = layer_dims(model, linear_layer(model, key, "Lily", "adapts"), key)
            group = kinds.setdefault((key.rpartition(".")[2], dims), [])
            i = len(group)
            out[key] = (
                key if i % self.stride_A == 0 else group[i // self.stride_A * self.stride_A],
                key if i == 0 else group[0],
            )
            group.append(key)
        return out

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        built: dict[str, InterconnectedLoRA] = {}
        for key, (a, b) in self.owners(model, sites).items():
            module = model.get_submodule(key)
            built[key] = InterconnectedLoRA(
                self,
                key,
                layer_dims(model, module, key),
                layer_like(model, key, module),
                built.get(a) if a != key else None,
                built.get(b) if b != key else None,
            )
        return list(built.values())


class InterconnectedLoRA(Piece):
    hooks = frozenset({"post"})
    mergeable = False  # the B mix depends on the batch
    routable = False  # ... on the whole batch: a row's output depends on the other rows
    unroutable = (
        "mixes its B's by the router's average over the whole batch, so a row's output depends on the other rows"
    )

    def __init__(
        self,
        cfg: LilyConfig,
        key: str,
        dims: tuple[int, int],
        like: torch.Tensor,
        owner_a: InterconnectedLoRA | None,
        owner_b: InterconnectedLoRA | None,
    ) -> None:
        super().__init__(key)
        in_f, out_f = dims
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.r, self.num_b, self.scale = cfg.r, cfg.num_B, cfg.scaling
        if owner_a is None:
            self.lily_A = nn.Parameter(kaiming_(torch.empty(cfg.r, in_f, **kw)))
        else:  # a plain reference: the owner holds (and saves) the shared tensor
            object.__setattr__(self, "_a_owner", owner_a)
        if owner_b is None:
            b = torch.empty(cfg.num_B * cfg.r, out_f, **kw)
            self.lily_B = nn.Parameter(b.zero_() if cfg.init_weights else kaiming_(b))
        else:
            object.__setattr__(self, "_b_owner", owner_b)
        self.lily_router = nn.Parameter(kaiming_(torch.empty(cfg.num_B, cfg.r, **kw)))

    def factor(self, name: str) -> torch.Tensor:
        """lily_A or lily_B, this layer's own or its owner's."""
        owner = self.__dict__.get("_a_owner" if name == "lily_A" else "_b_owner")
        return getattr(owner if owner is not None else self, name)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        a, b = self.factor("lily_A"), self.factor("lily_B")
        x = first_input(args, kwargs)
        hidden = F.linear(x.to(a.dtype), a)
        mix = F.softmax(F.linear(hidden, self.lily_router), dim=-1).reshape(-1, self.num_b).mean(dim=0)
        combined = torch.einsum("e,eio->io", mix, b.reshape(self.num_b, -1, b.shape[-1]))
        y = (hidden @ combined) * self.scale
        return output + y.to(output.dtype)

    def describe(self) -> str:
        shared = [n[1:2].upper() for n in ("_a_owner", "_b_owner") if n in self.__dict__]
        return f"Lily r={self.r} B×{self.num_b}" + (f" (shares {'+'.join(shared)})" if shared else "")


class LilyCodec(PeftCodec):
    """PEFT's LILY files: every layer's A, B and router, the shared ones once per layer (checked
    to be equal). PEFT shares by the target name a layer matched and its shape, so a file is
    written with the layers' leaf names as target_modules, covering every layer of those names."""

    peft_type = "LILY"
    understood = frozenset(
        {
            "r",
            "stride_A",
            "num_B",
            "scaling",
            "init_weights",
            "layers_to_transform",
            "modules_to_save",
            "target_modules",
        }
    )
    suffixes = {".lily_A.weight": "lily_A", ".lily_B.weight": "lily_B", ".lily_router.weight": "lily_router"}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        cfg = LilyConfig(
            targets=[exact(s) for s in named],
            r=int(peft_config.get("r", 32)),
            stride_A=int(peft_config.get("stride_A", 1)),
            num_B=int(peft_config.get("num_B", 2)),
            scaling=float(peft_config.get("scaling", 1.0)),
            **common,
        )
        tensors: dict[str, torch.Tensor] = {}
        for site, (a, b) in cfg.owners(model, list(named)).items():
            for name, owner in (("lily_A", a), ("lily_B", b), ("lily_router", site)):
                t = named[site].get(name)
                if t is None:
                    raise DeltaFileError(f"the Lily file has no {name} at {site!r}")
                key = f"{owner}.{name}"
                if key in tensors and not torch.equal(tensors[key], t):
                    raise DeltaFileError(
                        f"the Lily file's {name} at {site!r} differs from the one it shares with "
                        f"{owner!r}: its layers are shared another way than by name and shape"
                    )
                tensors[key] = t
        return cfg, tensors

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: LilyConfig = delta.config
        leaves = sorted({p.key.rpartition(".")[2] for p in pieces})
        covered = {name for name, m in delta.model.named_modules() if name.rpartition(".")[2] in leaves}
        if covered != {p.key for p in pieces}:
            raise UnsupportedModuleError(
                f"delta {delta.name!r} adapts some of the layers named {leaves}; PEFT's Lily "
                "shares by target name, so its file must cover all of them. Save it with "
                "delta.save()"
            )
        tensors = {
            f"{p.key}.{name}.weight": p.factor(name).detach().contiguous()
            for p in pieces
            for name in ("lily_A", "lily_B")
        }
        tensors.update({f"{p.key}.lily_router.weight": p.lily_router.detach().contiguous() for p in pieces})
        fields = {
            "peft_type": "LILY",
            "r": cfg.r,
            "stride_A": cfg.stride_A,
            "num_B": cfg.num_B,
            "scaling": cfg.scaling,
            "init_weights": True,
            "target_modules": leaves,
        }
        return fields, tensors


LilyConfig.peft_codec = LilyCodec()
