"""LoReFT and DiReFT (Wu et al. 2024, pyreft): representation fine-tuning. At chosen token
positions of a block's output hidden states h, LoReFT adds Rᵀ(W h + b − R h), R [r, d] with
orthonormal rows (torch's orthogonal parametrization), W h + b a learned projection to r dims;
DiReFT adds Rᵀ(W h + b) with R unconstrained. A forward hook on the block: no per-model code.

positions: "f<k>+l<k>" (first k and last k tokens; "f3", "l1", "f1+l1"), or a callable given
the hidden states [batch, seq, dim] returning per-row positions [batch, k]. In generate(),
only the prompt is intervened on (as pyreft does): a call that continues a sequence (its
position_ids do not start at 0) passes through. Not a weight change: merge is refused."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

from ..config import DeltaConfig, check_float, check_int
from ..engine import Piece, map_output
from ..errors import ConfigError, UnsupportedModuleError
from ..modules import hidden_size, named_modules
from ..roles import blocks

Positions = str | Callable[[torch.Tensor], Any]


def parse_positions(spec: str) -> tuple[int, int]:
    """ "f2+l1" -> (2, 1): how many first and last tokens."""
    first = last = 0
    for part in spec.split("+"):
        m = re.fullmatch(r"([fl])([1-9]\d*)", part.strip())
        if m is None:
            raise ConfigError(
                f"positions must look like 'f1', 'l2' or 'f1+l1' (first / last k tokens), or be a "
                f"callable; got {spec!r}"
            )
        if m.group(1) == "f":
            first = int(m.group(2))
        else:
            last = int(m.group(2))
    return first, last


@dataclass(frozen=True, kw_only=True)
class LoReFTConfig(DeltaConfig):
    """LoReFT. r: the subspace rank; positions: where in the sequence it acts (see the module
    docstring); dropout: on the intervened states while the block trains. Default targets: every
    block's output (narrow with layers=[...] or targets=[...])."""

    r: int = 4
    positions: Positions = "l1"
    dropout: float = 0.0

    method = "loreft"
    orthogonal = True  # R's rows orthonormal (LoReFT); DiReFT leaves R free

    def validate(self) -> None:
        check_int(self, "r")
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        if not callable(self.positions):
            if not isinstance(self.positions, str):
                raise ConfigError(
                    f"{type(self).__name__}.positions must be a string like 'f1+l1' or a callable, "
                    f"got {self.positions!r}"
                )
            parse_positions(self.positions)

    def portable(self, delta: Any) -> dict[str, Any]:
        if callable(self.positions):
            raise ConfigError(
                f"{type(self).__name__}.positions is a callable ({getattr(self.positions, '__qualname__', '?')}), "
                "which a delta file cannot hold; save a delta whose positions are a string such as "
                "'f1+l1', or keep its tensors with delta.tensors()"
            )
        return super().portable(delta)

    def select(self, model: nn.Module) -> list[str]:
        if self.targets is not None:
            return super().select(model)
        found = blocks(model, named_modules(model))
        if not found:
            raise ConfigError(
                f"no repeated blocks found in {type(model).__name__}; pass targets=[...] naming the "
                "modules whose output hidden states to intervene on"
            )
        if self.layers is not None:
            bad = [i for i in self.layers if i >= len(found)]
            if bad:
                raise ConfigError(f"layers={list(self.layers)}: the model has {len(found)} blocks")
            found = [found[i] for i in self.layers]
        return found

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        width = hidden_size(model)
        if width is None:
            raise UnsupportedModuleError(
                f"cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)"
            )
        like = next((p for p in model.parameters() if p.is_floating_point()), None)
        if like is None:
            raise UnsupportedModuleError("ReFT needs a model with floating-point weights")
        return [Intervention(self, key, width, like) for key in sites]


@dataclass(frozen=True, kw_only=True)
class DiReFTConfig(LoReFTConfig):
    """DiReFT: LoReFT without the orthogonality constraint and without subtracting R h."""

    method = "direft"
    orthogonal = False


class Rotation(nn.Module):
    """R as pyreft's LowRankRotateLayer: weight [d, r] (R = weightᵀ), orthogonally initialised."""

    if TYPE_CHECKING:  # (for the type checker only: the tensors and layers it registers, typed as they are used)

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, d: int, r: int, like: torch.Tensor) -> None:
        super().__init__()
        start = torch.empty(d, r, device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
        nn.init.orthogonal_(start)  # (in float32 at least: torch's CPU QR has no bf16/fp16 kernel)
        self.weight = nn.Parameter(start.to(like.dtype))


class Intervention(Piece):
    hooks = frozenset({"post"})
    mergeable = False  # it acts on hidden states at some positions: no weight can hold it

    def __init__(self, cfg: LoReFTConfig, key: str, width: int, like: torch.Tensor) -> None:
        super().__init__(key)
        if cfg.r > width:
            raise ConfigError(f"{type(cfg).__name__}.r={cfg.r} exceeds the hidden size {width}")
        if cfg.orthogonal and like.is_floating_point() and like.element_size() < 4:
            # torch's orthogonal parametrization does not run in bf16/fp16 (no QR there): the
            # intervention keeps float32 tensors and edits in float32 (edit casts back)
            like = like.float()
        self.rotate_layer = Rotation(width, cfg.r, like)
        if cfg.orthogonal:  # orthonormal columns of weight = orthonormal rows of R
            # matrix_exp, not torch's default for a tall matrix (householder): in torch 2.13 that
            # one collapses the weight to zero after a single optimizer step
            parametrizations.orthogonal(self.rotate_layer, orthogonal_map="matrix_exp")
            orth = self.rotate_layer.parametrizations.weight[0]
            if like.is_meta and getattr(orth, "base", None) is None:
                # (on meta torch leaves out the [d, d] base it keeps: the plan of a load must see it)
                original = self.rotate_layer.parametrizations.weight.original
                orth.base = torch.empty(width, width, dtype=original.dtype, device="meta")
        self.learned_source = nn.Linear(width, cfg.r, device=like.device, dtype=like.dtype)
        self.orthogonal, self.p, self.positions = cfg.orthogonal, cfg.dropout, cfg.positions
        self.span = None if callable(cfg.positions) else parse_positions(cfg.positions)

    def edit(self, h: torch.Tensor, training: bool = False) -> torch.Tensor:
        """h + Rᵀ(W h + b − R h) (LoReFT) or h + Rᵀ(W h + b) (DiReFT), on [..., d]."""
        w = self.rotate_layer.weight  # [d, r]
        x = h if h.dtype == w.dtype else h.to(w.dtype)
        target = self.learned_source(x)
        if self.orthogonal:
            target = target - x @ w
        out = x + target @ w.T
        if self.p and training:
            out = nn.functional.dropout(out, self.p, training=True)
        return out.to(h.dtype)

    def where(self, h: torch.Tensor) -> torch.Tensor:
        """Per-row positions [batch, k] (LongTensor) in a [batch, seq, dim] tensor."""
        b, t = h.shape[0], h.shape[1]
        if self.span is not None:
            first, last = self.span
            idx = sorted(set(range(min(first, t))) | set(range(max(t - last, 0), t)))
            return torch.tensor(idx, device=h.device).expand(b, -1)
        try:
            find: Any = self.positions  # (a callable here: a string gave a span)
            pos = torch.as_tensor(find(h), device=h.device, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"the positions callable must give a [batch={b}, k] array of positions; its result "
                f"could not be read as one ({exc})"
            ) from None
        if pos.dim() != 2 or pos.shape[0] != b or (pos.numel() and (pos.min() < 0 or pos.max() >= t)):
            raise ConfigError(
                f"the positions callable must give a [batch={b}, k] array of positions in [0, {t}), "
                f"got shape {tuple(pos.shape)}"
            )
        return pos

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = kwargs.get("position_ids")
        if isinstance(ids, torch.Tensor) and ids.numel() and int(ids.min()) > 0:
            return output  # a decode step continuing a sequence: the prompt was intervened on already

        def apply(h: torch.Tensor) -> torch.Tensor:
            if h.dim() != 3:
                raise UnsupportedModuleError(
                    f"ReFT acts on [batch, seq, dim] hidden states; {self.key!r} gave shape {tuple(h.shape)}"
                )
            pos = self.where(h)
            index = pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            return h.scatter(1, index, self.edit(h.gather(1, index), module.training))

        return map_output(output, apply)

    def describe(self) -> str:
        where = self.positions if isinstance(self.positions, str) else "callable"
        return f"{'LoReFT' if self.orthogonal else 'DiReFT'} r={self.rotate_layer.weight.shape[1]} at {where}"
