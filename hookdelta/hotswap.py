"""Hot-swap: a saved delta's values copied into an attached delta in place (PEFT's
`hotswap_adapter`), so a torch.compile'd model keeps its compiled code.

Nothing about the hooks changes: only tensor values do, and compiled code reads tensors as
inputs. A smaller rank is zero-padded (a zero row of A and column of B add nothing), and
LoRA's scale becomes a tensor (`hold_scale`), so another alpha is a new value, not a new
constant. `prepare_hotswap(model, max_rank=...)` pads up front, before compiling, so any
later adapter up to that rank swaps in without a recompilation.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from .config import DeltaConfig
from .engine import forget_compiled_code
from .errors import ConfigError, DeltaFileError, DeltaStateError
from .methods.lora import LoRAConfig
from .sharding import assign, shape, whole
from .store import check_model, deltas_of


def prepare_hotswap(model: nn.Module, max_rank: int, names: str | list[str] | None = None) -> None:
    """Pad the LoRA deltas `names` (default: all) to rank `max_rank` and hold their scales as
    tensors, so adapters up to that rank (any alpha) hot-swap in without recompiling. The
    outputs do not change. Call it before torch.compile."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ConfigError(f"prepare_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    found = deltas_of(check_model(model))
    chosen = list(found) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in chosen if n not in found]
    if unknown:
        raise DeltaStateError(f"the model has no delta named {unknown}; its deltas are {list(found)}")
    targets = [found[n] for n in chosen if found[n].method == "lora"]
    if not targets:
        raise DeltaStateError(f"prepare_hotswap pads LoRA deltas; {chosen} holds none")
    for delta in targets:
        too_big = {p.key: p.r for p in _lora_pieces(delta) if p.r > max_rank}
        fixed = [p.key for p in _lora_pieces(delta) if not p.rank_dims and p.r != max_rank]
        if too_big or fixed:
            raise ConfigError(
                f"prepare_hotswap(max_rank={max_rank}): delta {delta.name!r} has "
                + (
                    f"ranks above it at {too_big}"
                    if too_big
                    else f"pieces whose rank cannot be padded (fused slices, grouped conv) at {fixed[:3]}"
                )
            )
        if delta.merged:
            raise DeltaStateError(f"delta {delta.name!r} is merged; unmerge() it before prepare_hotswap")
    store = targets[0]._store()
    with store.guard.changing("prepare_hotswap"), torch.inference_mode(False):
        for delta in targets:
            for piece in _lora_pieces(delta):
                if piece.rank_dims:
                    piece.pad_rank(max_rank)
                piece.hold_scale()
            delta.config = delta.config.fitted(
                {p.key: p.r for p in _lora_pieces(delta)}, {p.key: float(p.scale) for p in _lora_pieces(delta)}
            )
        forget_compiled_code()  # the factors' shapes changed: compiled code must see the new ones


def swap_target(model: nn.Module, name: str) -> Any:
    """The attached delta a hot-swap writes into, checked before any file is read."""
    if not isinstance(name, str):
        raise ConfigError(f"hd.load(into=...) takes the name of an attached delta, got {name!r}")
    found = deltas_of(model)
    if name not in found:
        raise DeltaStateError(
            f"hd.load(into={name!r}): the model has no delta named {name!r}; its deltas are {list(found)}"
        )
    if found[name].merged:
        raise DeltaStateError(f"delta {name!r} is merged into the weights; unmerge() it before a hot-swap")
    return found[name]


def swap_in(
    delta: Any,
    config: DeltaConfig,
    sites: list[str],
    train: list[str],
    tensors: dict[str, torch.Tensor],
    directory: str | os.PathLike,
) -> Any:
    """Copy a saved delta (read by persistence.load) into the attached `delta`, in place.
    Everything is checked before anything is written."""
    name = delta.name
    if config.method != delta.method:
        raise DeltaFileError(
            f"the delta in {directory} is {config.method}; {name!r} is {delta.method}: a hot-swap needs the same method"
        )
    _check_same_sites(delta, sites, train, directory)
    _check_same_settings(delta, config, directory)
    values = _fitted_values(delta, tensors, directory)
    lora = config if delta.method == "lora" and isinstance(config, LoRAConfig) else None
    scales = {p.key: lora.scale_for(p.key) for p in _lora_pieces(delta)} if lora is not None else {}
    first = any(not isinstance(p.scale, torch.Tensor) for p in _lora_pieces(delta))
    with (
        delta._store().guard.changing("hot-swap"),
        torch.inference_mode(False),
        torch.no_grad(),
        whole([current for current, _ in values], modify=True),
    ):
        for current, value in values:
            assign(current, value)
        if first:  # the scales become tensors: code compiled with them as constants must go (once)
            forget_compiled_code()
        for piece in _lora_pieces(delta):
            piece.hold_scale().fill_(scales[piece.key])
        if lora is not None:
            delta.config = lora.fitted({p.key: p.r for p in _lora_pieces(delta)}, scales)
        else:
            delta.config = config
    return delta


def _lora_pieces(delta: Any) -> list[Any]:
    return [p for p in delta.pieces.values() if hasattr(p, "hold_scale")]


def _check_same_sites(delta: Any, sites: list[str], train: list[str], directory: Any) -> None:
    extra, missing = sorted(set(sites) - set(delta.sites)), sorted(set(delta.sites) - set(sites))
    extra_t, missing_t = sorted(set(train) - set(delta.also_train)), sorted(set(delta.also_train) - set(train))
    if extra or missing or extra_t or missing_t:
        parts = [
            f"{what}: {keys[:4]}"
            for what, keys in (("only in the file", extra + extra_t), (f"only in {delta.name!r}", missing + missing_t))
            if keys
        ]
        raise DeltaFileError(
            f"a hot-swap needs the same sites; the delta in {directory} and {delta.name!r} differ "
            f"({'; '.join(parts)}). Attach it as a new delta (hd.load without into=)"
        )


_WHERE = frozenset({"targets", "exclude", "layers", "also_train", "target_parameters"})  # compared as sites


def _check_same_settings(delta: Any, config: DeltaConfig, directory: Any) -> None:
    """Every config field that changes the computation and that the swap does not take over must
    be the same in the file and in the live delta (else the swapped delta would compute neither)."""
    saved, live = config.to_dict(), delta.config.to_dict()
    differ = sorted(
        k
        for k in set(saved) | set(live)
        if k not in _WHERE and k not in type(delta.config).hot_swappable and saved.get(k) != live.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} in the file, {live.get(k)!r} in {delta.name!r}" for k in differ[:4])
        raise DeltaFileError(
            f"the delta in {directory} is set up differently from {delta.name!r} ({shown}); a "
            "hot-swap copies tensors only. Attach it as a new delta (hd.load without into=)"
        )


def _fitted_values(
    delta: Any, tensors: dict[str, torch.Tensor], directory: Any
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(attached tensor, the saved value in its shape): a smaller rank zero-padded; a larger
    rank or another shape is refused, naming the tensors."""
    values, bad, used = [], [], set()
    for piece in delta.pieces.values():
        for tensor_name, current in piece.state_dict(keep_vars=True).items():
            key = f"{piece.key}.{tensor_name}"
            used.add(key)
            if key not in tensors:
                raise DeltaFileError(f"the delta in {directory} has no tensor {key!r}, which {delta.name!r} has")
            saved = tensors[key]
            dim = getattr(piece, "rank_dims", {}).get(tensor_name)
            whole_shape = shape(current)  # (a ZeRO-3 partition is empty outside a forward)
            if tuple(saved.shape) != whole_shape and not _pads_to(saved, whole_shape, dim):
                bad.append(f"{key} {tuple(saved.shape)} -> {whole_shape}")
                continue
            if dim is not None and tuple(saved.shape) != whole_shape:  # (it pads: dim is known)
                dim = dim % saved.dim()
                padded = saved.new_zeros(whole_shape)
                padded.narrow(dim, 0, saved.shape[dim]).copy_(saved)
                saved = padded
            values.append((current, saved.to(device=current.device, dtype=current.dtype)))
    extra = sorted(set(tensors) - used)
    if extra:
        raise DeltaFileError(
            f"the delta in {directory} has tensors {delta.name!r} lacks ({len(extra)}, e.g. "
            f"{extra[:3]}): it computes something else. Attach it as a new delta (hd.load without into=)"
        )
    if bad:
        raise DeltaFileError(
            f"the delta in {directory} does not fit {delta.name!r} in place ({len(bad)} tensors, e.g. {bad[:3]}): a "
            "larger rank needs hd.prepare_hotswap(model, max_rank=...) before compiling, other shapes a new delta"
        )
    return values


def _pads_to(saved: torch.Tensor, current: tuple[int, ...], dim: int | None) -> bool:
    """Whether `saved` fits the shape `current` by zero-padding its rank dimension `dim`."""
    if dim is None or saved.dim() != len(current):
        return False
    dim = dim % saved.dim()
    return all(s == c if i != dim else s <= c for i, (s, c) in enumerate(zip(saved.shape, current, strict=True)))
