"""Composition blocks (AdapterHub's Average, Fuse and Split): a delta that runs other attached
deltas at each of their layers and combines what they change, instead of stacking them.

Each source's change at a layer is what its piece does to the layer's output h:
Δ_i = piece_i(h) − h (computed in float32). The sources must act on layer outputs only
(LoRA, DoRA, IA3 on outputs, BitFit, bottleneck adapters). While a block is attached its
sources are disabled (it runs them; enabled they would act twice, which a forward refuses),
and detaching the block enables them again.

- Average:  h + Σ w_i·Δ_i (weights normalized to sum 1 unless normalize=False).
- Fuse:     h + Σ_i softmax_i(q·k_i)·v_i with q = W_q·h, k_i = W_k·Δ_i, v_i = W_v·Δ_i
            (AdapterFusion, Pfeiffer et al. 2021; W_v starts as the identity); only the fusion
            weights train, the sources are frozen.
- Split:    source i acts on the tokens in its range of the sequence (dim 1) only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, check_bool, check_float
from ..engine import Piece, first_input, map_output
from ..errors import ConfigError, DeltaStateError, UnsupportedModuleError
from ..modules import layer_dims
from ..placement import layer_like
from ..store import deltas_of


@dataclass(frozen=True, kw_only=True)
class BlockConfig(DeltaConfig):
    """A block over the deltas named in `sources`; its sites are theirs."""

    sources: Any = None
    same_sites = True  # Average and Fuse need every source at every site; Split does not

    def validate(self) -> None:
        self.check_fields()
        names = list(self.sources) if isinstance(self.sources, (list, tuple, dict)) else None
        if not names or len(names) < 2 or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ConfigError(
                f"{type(self).__name__}.sources must name two or more distinct deltas, got {self.sources!r}"
            )
        if self.targets is not None or self.also_train is not None:
            raise ConfigError(f"{type(self).__name__} acts where its sources are: it takes no targets or also_train")

    def check_fields(self) -> None:
        """The block's own fields (before `sources`, so each error names its field)."""

    def select(self, model: nn.Module) -> list[str]:
        found = deltas_of(model)
        missing = [n for n in self.sources if n not in found]
        if missing:
            raise DeltaStateError(
                f"{type(self).__name__}: the model has no delta named {missing}; its deltas are {list(found)}"
            )
        sites: dict[str, set[str]] = {}
        for name in self.sources:
            delta = found[name]
            if delta.merged:
                raise DeltaStateError(f"{type(self).__name__}: delta {name!r} is merged; unmerge() it first")
            for piece in delta.pieces.values():
                if piece.hooks != frozenset({"post"}) or piece.swapping() or not piece.routable:
                    raise UnsupportedModuleError(
                        f"{type(self).__name__}: delta {name!r} does not act on layer outputs alone at "
                        f"{piece.key!r} ({piece.describe() or type(piece).__name__}); blocks combine LoRA, DoRA, IA3 "
                        "on outputs, BitFit and bottleneck adapters"
                    )
                sites.setdefault(piece.site_path, set()).add(name)
        if self.same_sites:
            partial = {k: sorted(v) for k, v in sites.items() if len(v) != len(self.sources)}
            if partial:
                key = next(iter(partial))
                raise ConfigError(
                    f"{type(self).__name__} needs its sources at the same layers; {key!r} has only "
                    f"{partial[key]} ({len(partial)} such layers)"
                )
        return list(sites)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        self.select(model)  # the sources are there and fit (also when loaded from a file)
        return [self.piece(model, site, self.parts(model, site)) for site in sites]

    def piece(self, model: nn.Module, site: str, parts: list[tuple[Any, Piece]]) -> Piece:
        raise NotImplementedError

    def parts(self, model: nn.Module, site: str) -> list[tuple[Any, Piece]]:
        """(source delta, its piece) at `site`, in the order of `sources`."""
        found = deltas_of(model)
        return [(found[n], p) for n in self.sources for p in found[n].pieces.values() if p.site_path == site]

    def attached(self, model: nn.Module, delta: Any) -> None:
        delta.reenable = []
        for name in self.sources:  # the block runs them now
            source = deltas_of(model)[name]
            if source.enabled:
                source.disable()
                delta.reenable.append(name)

    def detached(self, model: nn.Module, delta: Any) -> None:
        found = deltas_of(model)
        for name in getattr(delta, "reenable", []):
            if name in found and not found[name].enabled:
                found[name].enable()


class BlockPiece(Piece):
    """The block at one layer: runs its sources' pieces on the same output and combines them."""

    hooks = frozenset({"post"})
    mergeable = False
    routable = False
    unroutable = "combines its sources' outputs at each layer, which cannot differ per row"

    def __init__(self, site: str, parts: list[tuple[Any, Piece]]) -> None:
        super().__init__(site)
        object.__setattr__(self, "parts", parts)  # plain references: the sources' tensors are theirs

    def check_sources(self) -> None:
        for delta, piece in self.parts:
            if not delta.attached or piece.live:
                why = "was detached" if not delta.attached else "is enabled too, so it would act twice"
                raise DeltaStateError(
                    f"delta {delta.name!r}, a source of the block at {self.site_path!r}, {why}; "
                    "the block runs its sources (disable them, or detach the block)"
                )

    def changes(self, module: nn.Module, args: tuple, kwargs: dict, h: torch.Tensor) -> list[torch.Tensor]:
        """Δ_i for each source at this call, in float32."""
        self.check_sources()
        hf = h.float()
        return [piece.post_forward(module, args, kwargs, hf) - hf for _, piece in self.parts]

    def describe(self) -> str:
        return f"{type(self).__name__.removesuffix('Piece').lower()} of {[d.name for d, _ in self.parts]}"


# -- Average -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AverageConfig(BlockConfig):
    """h + Σ w_i·Δ_i over the sources {name: weight}; weights normalized to sum 1 by default."""

    normalize: bool = True

    method = "average"

    def check_fields(self) -> None:
        check_bool(self, "normalize")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.sources, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.sources.values()
        ):
            raise ConfigError(f"AverageConfig.sources must map delta names to weights, got {self.sources!r}")
        if self.normalize and not sum(self.sources.values()):
            raise ConfigError("AverageConfig: the weights sum to 0, so they cannot be normalized (normalize=False)")

    def piece(self, model: nn.Module, site: str, parts: list[tuple[Any, Piece]]) -> Piece:
        total = sum(self.sources.values()) if self.normalize else 1.0
        return AveragePiece(site, parts, [w / total for w in self.sources.values()])


class AveragePiece(BlockPiece):
    def __init__(self, site: str, parts: list[tuple[Any, Piece]], weights: list[float]) -> None:
        super().__init__(site, parts)
        self.weights = weights

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        def run(h: torch.Tensor) -> torch.Tensor:
            changes = self.changes(module, args, kwargs, h)
            return h + sum((w * c for w, c in zip(self.weights, changes, strict=True)), torch.zeros_like(h)).to(h.dtype)

        return map_output(output, run)


# -- Fuse ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FuseConfig(BlockConfig):
    """AdapterFusion over the sources (a list of delta names): trainable query, key and value
    projections per layer; `temperature` divides the attention scores."""

    temperature: float = 1.0

    method = "fuse"

    def check_fields(self) -> None:
        check_float(self, "temperature", low=0.0, low_open=True)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.sources, (list, tuple)):
            raise ConfigError(f"FuseConfig.sources must be a list of delta names, got {self.sources!r}")
        object.__setattr__(self, "sources", tuple(self.sources))

    def piece(self, model: nn.Module, site: str, parts: list[tuple[Any, Piece]]) -> Piece:
        module = model.get_submodule(site)
        width = layer_dims(model, module, site)[1]
        return FusePiece(site, parts, width, layer_like(model, site, module), self.temperature)

    def attached(self, model: nn.Module, delta: Any) -> None:
        super().attached(model, delta)
        delta.unfrozen = []
        for name in self.sources:  # only the fusion trains
            for p in deltas_of(model)[name].parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    delta.unfrozen.append(p)

    def detached(self, model: nn.Module, delta: Any) -> None:
        for p in getattr(delta, "unfrozen", []):
            p.requires_grad_(True)
        super().detached(model, delta)


class FusePiece(BlockPiece):
    def __init__(
        self, site: str, parts: list[tuple[Any, Piece]], width: int, like: torch.Tensor, temperature: float
    ) -> None:
        super().__init__(site, parts)
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.query, self.key_proj, self.value = (nn.Linear(width, width, **kw) for _ in range(3))
        with torch.no_grad():
            for layer in (self.query, self.key_proj):  # AdapterHub's init: N(0, 0.02), zero bias
                layer.weight.normal_(0.0, 0.02)
                layer.bias.zero_()
            self.value.weight.copy_(torch.eye(width, **kw))  # starts as the sources' weighted sum
            self.value.bias.zero_()
        self.temperature = temperature

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        def run(h: torch.Tensor) -> torch.Tensor:
            changes = torch.stack(self.changes(module, args, kwargs, h), dim=-2).to(self.query.weight.dtype)
            q = self.query(h.to(self.query.weight.dtype))  # [..., d]
            k = self.key_proj(changes)  # [..., n, d]
            probs = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) / self.temperature, dim=-1)  # [..., n]
            fused = (probs.unsqueeze(-2) @ self.value(changes)).squeeze(-2)
            return h + fused.to(h.dtype)

        return map_output(output, run)


# -- Split ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SplitConfig(BlockConfig):
    """Each source acts on its token range only: sources {name: [start, stop]} (stop None: to
    the end), over dim 1 of the layer's input and output; ranges must not overlap. Full
    sequences only: a call with a filled KV cache is refused (positions would shift)."""

    method = "split"
    same_sites = False
    full_sequence = True  # store.py refuses calls that continue from a KV cache

    def validate(self) -> None:
        super().validate()
        ranges = {}
        for name, span in self.sources.items() if isinstance(self.sources, dict) else []:
            if isinstance(span, slice):
                if span.step not in (None, 1):
                    raise ConfigError(f"SplitConfig: the range of {name!r} has a step ({span}); give contiguous ranges")
                span = [span.start or 0, span.stop]
            ok = (
                isinstance(span, (list, tuple))
                and len(span) == 2
                and _index(span[0])
                and span[0] >= 0
                and (span[1] is None or (_index(span[1]) and span[1] > span[0]))
            )
            if not ok:
                raise ConfigError(
                    f"SplitConfig: the range of {name!r} must be slice(start, stop) with "
                    f"0 <= start < stop (stop may be None), got {span!r}"
                )
            ranges[name] = [span[0], span[1]]
        if not isinstance(self.sources, dict):
            raise ConfigError(f"SplitConfig.sources must map delta names to token ranges, got {self.sources!r}")
        spans = sorted((s, math.inf if e is None else e, n) for n, (s, e) in ranges.items())
        for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                raise ConfigError(f"SplitConfig: the ranges of {n1!r} and {n2!r} overlap; each token gets one delta")
        object.__setattr__(self, "sources", ranges)

    def piece(self, model: nn.Module, site: str, parts: list[tuple[Any, Piece]]) -> Piece:
        return SplitPiece(site, parts, [slice(*self.sources[d.name]) for d, _ in parts])


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SplitPiece(BlockPiece):
    def __init__(self, site: str, parts: list[tuple[Any, Piece]], spans: list[slice]) -> None:
        super().__init__(site, parts)
        self.spans = spans

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_input(args, kwargs)

        def run(h: torch.Tensor) -> torch.Tensor:
            if h.dim() < 3 or not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[:2] != h.shape[:2]:
                raise UnsupportedModuleError(
                    f"hd.split: the layer {self.site_path!r} does not see [batch, tokens, features] in and out "
                    f"(input {tuple(getattr(x, 'shape', ()))}, output {tuple(h.shape)}); split deltas on token layers"
                )
            self.check_sources()
            out = h.clone()
            for (_, piece), span in zip(self.parts, self.spans, strict=True):
                sub_args = (x[:, span],) + tuple(args[1:]) if args else args
                sub_kwargs = kwargs if args else {**kwargs, next(iter(kwargs)): x[:, span]}
                out[:, span] = piece.post_forward(module, sub_args, sub_kwargs, h[:, span])
            return out

        return map_output(output, run)
