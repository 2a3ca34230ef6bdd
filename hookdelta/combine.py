"""Several deltas made into one: a weighted combination of LoRA deltas into a new one (PEFT's `add_weighted_adapter`, with
its formulas, so the results match): task arithmetic, TIES, DARE and magnitude pruning on the
factors, concatenation, or an SVD of the combined weight change.

On the factors (`linear`, `ties`, `dare_*`, `magnitude_prune`), a weight w on a delta of
scale s becomes sign(w·s)·sqrt|w·s| on A and sqrt|w·s| on B: a negative weight flips one
side only, so task arithmetic (`{"a": 1.0, "b": -1.0}`) subtracts. `cat` stacks the scaled
factors (exact: the sum of the weighted updates). The `*svd` kinds combine the full updates
s·B·A and keep the top `svd_rank` singular directions. The new delta has scale 1.

The composition blocks (average, fuse, split: methods/composition.py) instead keep their
sources and run them together at each layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from .config import exact
from .delta import attach
from .errors import ConfigError, DeltaStateError, UnsupportedModuleError
from .methods.composition import AverageConfig, FuseConfig, SplitConfig
from .methods.lora import LoRAConfig, LoRAEmbedding, LoRALinear, LoRAParameter
from .store import check_model, deltas_of

ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_UPDATES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
HOWS = ON_FACTORS + ("cat",) + ON_UPDATES


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    how: str = "linear",
    name: str | None = None,
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Any:
    """A new LoRA delta, attached under `name`, that combines `weights` {delta name: weight} of
    the model's LoRA deltas (same sites) as `how` says; the sources are left as they were (and
    stay enabled: `hd.set_active(model, name)` runs the combination alone). `density` is the
    fraction kept by ties / dare / magnitude_prune; DARE draws its masks from `generator`."""
    model = check_model(model)
    found = deltas_of(model)
    sources = _check(found, weights, how, name, density, svd_rank, svd_clamp, majority_sign_method)
    how = "linear" if len(sources) == 1 else how  # one delta: only a weighting (as PEFT)
    keys = _keys(sources[0][0])
    per_site = {
        key: _combine_site(
            [(d.piece(key), w) for d, w in sources], how, density, svd_rank, svd_clamp, majority_sign_method, generator
        )
        for key in keys
    }
    params = [k for k in keys if type(sources[0][0].piece(k)) is LoRAParameter]
    config = LoRAConfig(
        targets=[exact(k) for k in keys if k not in params] or None,
        target_parameters=[exact(k) for k in params] or None,
    ).fitted({k: a.shape[-2] for k, (a, _) in per_site.items()}, dict.fromkeys(keys, 1.0))
    delta = attach(model, config, name=name)
    with torch.no_grad():
        for key, (a, b) in per_site.items():
            piece = delta.piece(key)
            piece.lora_A.copy_(a)
            piece.lora_B.copy_(b)
    return delta


def average(model: nn.Module, weights: Mapping[str, float], name: str | None = None, normalize: bool = True) -> Any:
    """A block that runs the deltas {name: weight} side by side at each of their layers and adds
    their weighted changes (AdapterHub's Average); the sources are disabled while it is attached."""
    return attach(model, AverageConfig(sources=_plain(weights), normalize=normalize), name=name)


def fuse(model: nn.Module, names: Sequence[str], name: str | None = None, temperature: float = 1.0) -> Any:
    """AdapterFusion over the deltas `names`: a trainable attention over their changes at each
    layer. The returned delta's parameters are the fusion weights only; the sources are frozen."""
    return attach(model, FuseConfig(sources=_plain(names), temperature=temperature), name=name)


def split(model: nn.Module, ranges: Mapping[str, slice], name: str | None = None) -> Any:
    """Each delta acts on its token range only, e.g. {"a": slice(0, 16), "b": slice(16, None)}."""
    return attach(model, SplitConfig(sources=_plain(ranges)), name=name)


def _plain(sources: Any) -> Any:
    """A mapping as a dict, a list or tuple as a list; anything else as given, for the config to refuse."""
    if isinstance(sources, Mapping):
        return dict(sources)
    return list(sources) if isinstance(sources, (list, tuple)) else sources


def _check(
    found: dict[str, Any],
    weights: Any,
    how: str,
    name: str | None,
    density: float | None,
    svd_rank: int | None,
    svd_clamp: float | None,
    majority_sign_method: str,
) -> list[tuple[Any, float]]:
    """The (delta, weight) pairs, after checking every argument; raises before anything changes."""
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"hd.combine needs {{delta name: weight}}, got {weights!r}")
    if how not in HOWS:
        raise ConfigError(f"hd.combine: how={how!r} is not one of {list(HOWS)}")
    unknown = [n for n in weights if n not in found]
    if unknown:
        raise DeltaStateError(f"the model has no delta named {unknown}; its deltas are {list(found)}")
    if name is not None and name in found:
        raise DeltaStateError(f"the model already has a delta named {name!r}; choose another name")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"hd.combine: the weight of {n!r} must be a finite number, got {w!r}")
    needs_density = how not in ("linear", "cat", "svd")
    if needs_density and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1):
        raise ConfigError(f"hd.combine: how={how!r} needs density= in [0, 1] (the fraction kept), got {density!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigError(f"hd.combine: svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1
    ):
        raise ConfigError(f"hd.combine: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(
            f"hd.combine: majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    sources = [(found[n], float(w)) for n, w in weights.items()]
    first = sources[0][0]
    for delta, _ in sources:
        if delta.method != "lora":
            raise UnsupportedModuleError(f"hd.combine combines LoRA deltas; {delta.name!r} is {delta.method}")
        odd = [k for k, p in delta.pieces.items() if type(p) not in (LoRALinear, LoRAEmbedding, LoRAParameter)]
        if odd:
            raise UnsupportedModuleError(
                f"hd.combine: delta {delta.name!r} has pieces it cannot combine at {odd[:3]} (DoRA, LoRA bias, a "
                "PiSSA/OLoRA start, aLoRA, fused slices, conv or tied LoRA); it combines plain LoRA on linear and "
                "embedding layers and on parameters (fused experts)"
            )
        experts = [k for k, p in delta.pieces.items() if type(p) is LoRAParameter]
        if experts and how not in ("linear", "cat", "svd"):
            raise UnsupportedModuleError(
                f"hd.combine(how={how!r}) prunes by magnitude or draws masks over a whole tensor; on a parameter "
                f"target such as {experts[0]!r} (every expert in one tensor) it is unclear whether per expert or over "
                "all, so it is refused: use how='linear', 'cat' or 'svd' (these act per expert)"
            )
        if set(_keys(delta)) != set(_keys(first)):
            diff = sorted(set(_keys(delta)) ^ set(_keys(first)))
            raise ConfigError(
                f"hd.combine needs deltas on the same layers; {first.name!r} and {delta.name!r} differ at {diff[:4]}"
            )
    if how in ON_FACTORS and len(sources) > 1:
        for key in _keys(first):
            ranks = {d.name: d.piece(key).r for d, _ in sources}  # (per expert for parameter targets)
            if len(set(ranks.values())) > 1:
                raise ConfigError(
                    f"hd.combine(how={how!r}) needs equal ranks, found {ranks} at {key!r}; use how='cat' or how='svd'"
                )
    return sources


def _keys(delta: Any) -> list[str]:
    return [p.key for p in delta.pieces.values()]


# -- one site ----------------------------------------------------------------------------------------


def _combine_site(
    parts: list[tuple[Any, float]],
    how: str,
    density: float | None,
    svd_rank: int | None,
    svd_clamp: float | None,
    sign_method: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined delta at one site, for scale 1."""
    if how == "cat":  # (the rank is dim -2 of A and -1 of B: per expert too, for parameter targets)
        a = torch.cat([p.lora_A.detach() * (w * float(p.scale)) for p, w in parts], dim=-2)
        return a, torch.cat([p.lora_B.detach() for p, _ in parts], dim=-1)
    if how in ON_FACTORS:
        scaled = [w * float(p.scale) for p, w in parts]
        wa = torch.tensor([(1 if s >= 0 else -1) * abs(s) ** 0.5 for s in scaled])
        wb = torch.tensor([abs(s) ** 0.5 for s in scaled])
        merge = _MERGES[how]
        dtype = parts[0][0].lora_A.dtype
        a = merge([p.lora_A.detach() for p, _ in parts], wa, density, sign_method, generator)
        b = merge([p.lora_B.detach() for p, _ in parts], wb, density, sign_method, generator)
        return a.to(dtype), b.to(dtype)
    updates = [(p.lora_B.detach() * float(p.scale)) @ p.lora_A.detach() for p, _ in parts]  # [(experts,) out, in]
    dw = _MERGES[how.removesuffix("_svd")](
        updates, torch.tensor([w for _, w in parts]), density, sign_method, generator
    )
    rank = svd_rank or max(p.r for p, _ in parts)
    u, s, vh = torch.linalg.svd(dw, full_matrices=True)  # (batched over experts)
    u, vh = u[..., :, :rank] @ torch.diag_embed(s[..., :rank]), vh[..., :rank, :]
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def _weighted(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors)
    return stacked * weights.to(stacked).view(-1, *[1] * (stacked.dim() - 1))


def _magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its `density` fraction of largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def _dropped(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _signed(tensors: list[torch.Tensor], weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """Majority signs are taken before weighting (as the TIES paper and PEFT do)."""
    stacked = torch.stack(tensors)
    sign = stacked.sign()
    total = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(total >= 0, 1, -1)
    weighted = _weighted(tensors, weights)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


_MERGES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": lambda ts, w, d, m, g: _weighted(ts, w).sum(0),
    "svd": lambda ts, w, d, m, g: _weighted(ts, w).sum(0),
    "magnitude_prune": lambda ts, w, d, m, g: _weighted([_magnitude(t, d) for t in ts], w).sum(0),
    "ties": lambda ts, w, d, m, g: _signed([_magnitude(t, d) for t in ts], w, m),
    "dare_linear": lambda ts, w, d, m, g: _weighted([_dropped(t, d, g) for t in ts], w).sum(0),
    "dare_ties": lambda ts, w, d, m, g: _signed([_dropped(t, d, g) for t in ts], w, m),
}
