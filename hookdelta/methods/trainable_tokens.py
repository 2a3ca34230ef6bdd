"""Trainable tokens (PEFT's TrainableTokensConfig / trainable_token_indices): train only some
rows of the input embedding, e.g. new special tokens, leaving every other row frozen. The
piece holds the chosen rows' values; for each call the embedding reads its weight with those
rows replaced (an out-of-place index_copy, as PEFT does). A weight tied to an output head is
replaced there too, so the two stay tied. Fresh rows are copies of the originals, so a new
delta changes nothing; merge writes just those rows, and unmerge restores them exactly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, check_bool, exact
from ..engine import Piece, TiedSwap, current
from ..errors import ConfigError, DeltaFileError, SelectorError, UnsupportedModuleError
from ..modules import Layer, parameter_holders


@dataclass(frozen=True, kw_only=True)
class TrainableTokensConfig(DeltaConfig):
    """token_indices: the rows (token ids) to train; targets: the embedding(s) (default: the
    model's input embedding, `get_input_embeddings()`); tie_weights: a tied output head gets
    the same rows (True) or the tie is refused (False)."""

    token_indices: Sequence[int] = ()
    tie_weights: bool = True

    method = "trainable_tokens"

    def validate(self) -> None:
        check_bool(self, "tie_weights")
        idx = self.token_indices
        if (
            isinstance(idx, (str, bytes))
            or not isinstance(idx, (list, tuple, range))
            or not idx
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in idx)
            or len(set(idx)) != len(idx)
        ):
            raise ConfigError(
                f"TrainableTokensConfig.token_indices must be a non-empty list of distinct token ids >= 0, got {idx!r}"
            )
        object.__setattr__(self, "token_indices", tuple(idx))

    def select(self, model: nn.Module) -> list[str]:
        if self.targets is not None:
            return super().select(model)
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        path = next((n for n, m in model.named_modules() if m is embedding and embedding is not None), None)
        if path is None:
            raise SelectorError("this model has no get_input_embeddings(); name the embedding in targets=[...]")
        return [path]

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        done: dict[int, TokenRows] = {}  # id(weight) -> its primary: a site tied to an earlier one
        holders = parameter_holders(model)
        # embeddings first: a tied output head then follows its embedding, never the other way
        for key in sorted(sites, key=lambda k: not isinstance(model.get_submodule(k), nn.Embedding)):
            module = model.get_submodule(key)
            if id(module.weight) in done:
                continue  # the other end of a tie that was already covered
            if not isinstance(module, (nn.Embedding, nn.Linear)):
                raise UnsupportedModuleError(
                    f"trainable tokens replace rows of an nn.Embedding (or a linear output "
                    f"head); {key!r} is a {type(module).__name__}"
                )
            rows = module.weight.shape[0]
            if max(self.token_indices) >= rows:
                raise ConfigError(
                    f"TrainableTokensConfig.token_indices holds {max(self.token_indices)}, but {key!r} has {rows} rows"
                )
            primary = TokenRows(key, module, self.token_indices)
            pieces.append(primary)
            done[id(module.weight)] = primary
            for path, other, name in holders.get(id(module.weight), ()):
                if other is module or name != "weight":
                    continue
                if not self.tie_weights:
                    raise UnsupportedModuleError(
                        f"{key!r} shares its weight with {path!r} (tied weights); set "
                        "tie_weights=True to train the rows in both, or untie them"
                    )
                pieces.append(TiedSwap(primary, path))
        return pieces


class TokenRows(Piece):
    swaps = ("weight",)
    merges_by = "value"  # rows replaced: only the kept original undoes it

    def __init__(self, key: str, module: Layer, indices: Sequence[int]) -> None:
        super().__init__(key)
        w = module.weight
        if not w.is_floating_point():
            raise UnsupportedModuleError(f"trainable tokens need a floating-point weight at {key!r}, found {w.dtype}")
        self.register_buffer(
            "token_indices", torch.tensor(list(indices), dtype=torch.long, device=w.device), persistent=False
        )
        self.trainable_tokens_delta = nn.Parameter(w.detach()[self.token_indices].clone())  # PEFT's name: the values

    def swap(self, module: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))

    def merged_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return {"weight": self.swap(module, "weight", current(module, "weight"))}

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return f"{len(self.token_indices)} trainable rows"


class TrainableTokensCodec(PeftCodec):
    """PEFT's TRAINABLE_TOKENS files: `trainable_tokens_delta` [n, dim] holds the rows' values."""

    peft_type = "TRAINABLE_TOKENS"
    understood = frozenset({"token_indices", "init_weights", "layers_to_transform", "modules_to_save"})
    suffixes = {".trainable_tokens_delta": "trainable_tokens_delta"}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        cfg = TrainableTokensConfig(
            token_indices=list(peft_config.get("token_indices") or []), targets=[exact(s) for s in named], **common
        )
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        embeddings_first = sorted(named, key=lambda k: not isinstance(model.get_submodule(k), nn.Embedding))
        for site in embeddings_first:  # PEFT writes a tied head's rows too: the same values, kept once
            ts = named[site]
            weight = model.get_submodule(site)._parameters.get("weight")
            first = seen.setdefault(id(weight), site)
            if first != site:
                if not torch.equal(ts["trainable_tokens_delta"], named[first]["trainable_tokens_delta"]):
                    raise DeltaFileError(
                        f"{site!r} and {first!r} share one weight, but the file gives them different token rows"
                    )
                continue
            tensors.update({f"{site}.{n}": t for n, t in ts.items()})
        return cfg, tensors

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        own = [p for p in pieces if isinstance(p, TokenRows)]
        # a tied head gets the same rows under its own name, as PEFT writes them
        tensors = {
            f"{p.key}.trainable_tokens_delta": getattr(p, "primary", p).trainable_tokens_delta.detach().clone()
            for p in pieces
        }
        fields = {
            "peft_type": "TRAINABLE_TOKENS",
            "token_indices": list(delta.config.token_indices),
            "init_weights": True,
            "target_modules": [p.key for p in own],
        }
        return fields, tensors


TrainableTokensConfig.peft_codec = TrainableTokensCodec()
