"""VB-LoRA (Li et al. 2024, vector bank LoRA): every LoRA factor of every layer is assembled
from one small bank of vectors shared by the whole delta: each length-`vector_length` piece of
A and B is a softmax-weighted sum of the top-k bank vectors its logits pick. A layer trains only
its logits; the bank trains once. PEFT's arithmetic and files (VBLORA): vblora_logits_A
[r, in/len, n], vblora_logits_B [out/len, r, n], the bank `base_model.vblora_vector_bank`
[n, len]; y = out + B·(A·x), no scale. A and B both start random, as in PEFT (a fresh VB-LoRA
changes the model a little). PEFT's save_only_topk_weights files (integer indices) are refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, PeftCodec, check_float, check_int, exact
from ..engine import Piece
from ..errors import ConfigError, DeltaFileError
from ..modules import is_conv1d, layer_dims, linear_layer
from ..placement import layer_like
from .dense_delta import LowRankDelta

BANK = "vblora_vector_bank"


@dataclass(frozen=True, kw_only=True)
class VBLoRAConfig(DeltaConfig):
    """VB-LoRA: rank r; a bank of num_vectors vectors of vector_length (which must divide every
    adapted layer's widths); each factor piece mixes the topk best bank vectors; the bank starts
    U(±init_vector_bank_bound), the logits N(0, init_logits_std); dropout on the input while training."""

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    dropout: float = 0.0

    method = "vblora"
    default_targets = ("attn.q", "attn.v")

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_int(self, name)
        check_float(self, "init_vector_bank_bound", low=0.0)
        check_float(self, "init_logits_std", low=0.0)
        check_float(self, "dropout", low=0.0, high=1.0)
        if self.topk > self.num_vectors:
            raise ConfigError(f"VBLoRAConfig.topk ({self.topk}) is more than num_vectors ({self.num_vectors})")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        layers: list[Piece] = []
        bank: VectorBank | None = None
        for key in sites:
            module = linear_layer(model, key, "VB-LoRA", "adapts")
            like = layer_like(model, key, module)
            if bank is None:
                bank = VectorBank(sites[0], self, like)
            layers.append(BankLoRA(self, key, module, layer_dims(model, module, key), like, bank))
        return ([bank] if bank is not None else []) + layers


class VectorBank(Piece):
    """The bank every layer of the delta draws from. It hooks nothing and changes nothing itself."""

    additive = True

    def __init__(self, site_path: str, cfg: VBLoRAConfig, like: torch.Tensor) -> None:
        super().__init__(site_path, key=BANK)
        bound = cfg.init_vector_bank_bound
        bank = torch.empty(cfg.num_vectors, cfg.vector_length).uniform_(-bound, bound)
        self.bank = nn.Parameter(bank.to(like.device, like.dtype))

    def describe(self) -> str:
        return f"VB-LoRA vector bank {tuple(self.bank.shape)}"


class BankLoRA(LowRankDelta):
    def __init__(
        self,
        cfg: VBLoRAConfig,
        key: str,
        module: nn.Module,
        dims: tuple[int, int],
        like: torch.Tensor,
        bank: VectorBank,
    ) -> None:
        super().__init__(key)
        in_f, out_f = dims
        n, length = cfg.vector_length, cfg.vector_length
        if in_f % length or out_f % length:
            raise ConfigError(
                f"VB-LoRA: vector_length {length} must divide {key!r}'s {in_f} inputs and {out_f} outputs"
            )
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        std = cfg.init_logits_std
        self.vblora_logits_A = nn.Parameter(torch.randn(cfg.r, in_f // n, cfg.num_vectors, **kw) * std)
        self.vblora_logits_B = nn.Parameter(torch.randn(out_f // n, cfg.r, cfg.num_vectors, **kw) * std)
        object.__setattr__(self, "_bank", bank)  # a plain reference: the bank piece owns (and saves) it
        self.topk, self.p, self.r = cfg.topk, cfg.dropout, cfg.r
        self.weight_path_exact = not self.p
        self.conv1d = is_conv1d(module)

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        top, idx = logits.topk(self.topk, dim=-1)
        return (F.softmax(top, dim=-1).unsqueeze(-1) * self._bank.bank[idx]).sum(-2)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) assembled from the bank."""
        a = self._mix(self.vblora_logits_A).reshape(self.r, -1)
        b = self._mix(self.vblora_logits_B).transpose(1, 2).reshape(-1, self.r)
        return a, b

    def describe(self) -> str:
        return f"VB-LoRA r={self.r} top-{self.topk}"


class VBLoRACodec(PeftCodec):
    """PEFT's VBLORA files: the logits per layer and the shared bank."""

    peft_type = "VBLORA"
    understood = frozenset(
        {
            "r",
            "num_vectors",
            "vector_length",
            "topk",
            "save_only_topk_weights",
            "vblora_dropout",
            "fan_in_fan_out",
            "bias",
            "init_vector_bank_bound",
            "init_logits_std",
            "layers_to_transform",
            "modules_to_save",
        }
    )
    suffixes = {".vblora_logits_A": "vblora_logits_A", ".vblora_logits_B": "vblora_logits_B"}
    shared_keys = frozenset({"base_model." + BANK})

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        out = self.refuse_bias(peft_config)
        if peft_config.get("save_only_topk_weights"):
            out.append("save_only_topk_weights=True (integer top-k indices, an inference-only file)")
        return out

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        bank = peft_config.get("__shared__", {}).get("base_model." + BANK)
        if bank is None or bank.dim() != 2:
            raise DeltaFileError("the VB-LoRA file has no vector bank (base_model.vblora_vector_bank [n, length])")
        cfg = VBLoRAConfig(
            targets=[exact(s) for s in named],
            r=int(peft_config.get("r", 4)),
            num_vectors=bank.shape[0],
            vector_length=bank.shape[1],
            topk=int(peft_config.get("topk", 2)),
            dropout=float(peft_config.get("vblora_dropout") or 0.0),
            **common,
        )
        return cfg, {**self.flat(named), f"{BANK}.bank": bank}

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: VBLoRAConfig = delta.config
        layers = [p for p in pieces if isinstance(p, BankLoRA)]
        (bank,) = [p for p in pieces if isinstance(p, VectorBank)]
        fields = {
            "peft_type": "VBLORA",
            "r": cfg.r,
            "num_vectors": cfg.num_vectors,
            "vector_length": cfg.vector_length,
            "topk": cfg.topk,
            "save_only_topk_weights": False,
            "vblora_dropout": cfg.dropout,
            "bias": "none",
            "init_vector_bank_bound": cfg.init_vector_bank_bound,
            "init_logits_std": cfg.init_logits_std,
            **self.tuner_fields(delta, layers),
        }
        return fields, {**self.piece_tensors(layers), BANK: bank.bank.detach().contiguous()}

    def file_key(self, key: str) -> str:
        return "base_model." + key if key == BANK else self.prefix + key


VBLoRAConfig.peft_codec = VBLoRACodec()
