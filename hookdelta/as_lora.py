"""Any mergeable delta as a plain LoRA, for servers that load LoRA and little else (vLLM, SGLang,
LoRAX): each site's weight change ΔW (what merge() would add: DoRA, LoHa, LoKr, OFT, BOFT, VeRA,
IA3, ...) is factored by a truncated SVD, ΔW ≈ B·A with B = U_k·√S_k and A = √S_k·V_kᵀ, at a
fixed rank or at the smallest rank whose relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F is within a
tolerance. At full rank the LoRA is the delta's merged change exactly (up to rounding). Fused
expert tensors are factored per expert. The new delta is attached beside the source (which is
left as it was) and carries the report: `delta.conversion[site] = (rank, relative error)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .config import exact
from .errors import ConfigError, MergeError, UnsupportedModuleError
from .modules import is_conv1d, is_linear_like

if TYPE_CHECKING:
    from .delta import Delta


def as_lora(delta: Delta, rank: int | None = None, tolerance: float | None = None, name: str | None = None) -> Delta:
    """A LoRA delta with each site's ΔW of `delta` truncated to `rank`, or to the smallest rank
    within `tolerance` (relative Frobenius error), attached under `name`; see the module docstring."""
    from .delta import Delta, attach
    from .methods.lora import LoRAConfig

    if not isinstance(delta, Delta):
        raise ConfigError(f"as_lora converts a Delta, got {type(delta).__name__}")
    if (rank is None) == (tolerance is None):
        raise ConfigError(
            "as_lora needs exactly one of rank= (a fixed rank) or tolerance= (the largest relative "
            f"error per layer, e.g. 1e-3), got rank={rank!r}, tolerance={tolerance!r}"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"as_lora: rank must be an integer >= 1, got {rank!r}")
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1
    ):
        raise ConfigError(f"as_lora: tolerance must be a number in [0, 1), got {tolerance!r}")
    if delta.merged or not delta.mergeable():
        raise UnsupportedModuleError(
            f"as_lora writes a delta's weight change as a LoRA; {delta.name!r} ({delta.method}) "
            + (
                "is merged: unmerge() it first"
                if delta.merged
                else "has no weight change (adapters and prompts add computations, not weights)"
            )
        )
    with torch.no_grad():
        changes = {key: dw.detach() for key, dw in _changes(delta).items()}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: dict[str, tuple[int, float]] = {}
    for key, dw in changes.items():
        u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)  # (batched over experts)
        energy = s.square().flip(-1).cumsum(-1).flip(-1)  # energy[..., k]: what ranks k.. hold
        total = energy[..., :1].clamp_min(1e-300)
        if rank is not None:
            k = min(rank, s.shape[-1])
        else:
            assert tolerance is not None  # (one of the two: checked above)
            left = torch.cat([(energy[..., 1:] / total).sqrt(), torch.zeros_like(total)], dim=-1)  # error at rank k+1
            k = int((left <= tolerance).float().argmax(-1).max().item()) + 1
        error = float(((energy[..., k : k + 1] if k < s.shape[-1] else torch.zeros_like(total)) / total).sqrt().max())
        root = s[..., :k].sqrt()
        factors[key] = ((root.unsqueeze(-1) * vh[..., :k, :]), (u[..., :, :k] * root.unsqueeze(-2)))
        report[key] = (k, error)
    modules = [k for k in changes if _is_module(delta.model, k)]
    params = [k for k in changes if k not in modules]
    config = LoRAConfig(
        targets=[exact(k) for k in modules] or None, target_parameters=[exact(k) for k in params] or None
    ).fitted({k: r for k, (r, _) in report.items()}, dict.fromkeys(changes, 1.0))
    new = attach(delta.model, config, name=name)
    with torch.no_grad():
        for key, (a, b) in factors.items():
            piece = new.piece(key)
            piece.lora_A.copy_(a.to(piece.lora_A.dtype))
            piece.lora_B.copy_(b.to(piece.lora_B.dtype))
    new.conversion = report  # type: ignore[assignment]  # (an attribute of its own, not a tensor)
    return new


def _is_module(model: nn.Module, key: str) -> bool:
    try:
        model.get_submodule(key)
        return True
    except AttributeError:
        return False


def _changes(delta: Any) -> dict[str, torch.Tensor]:
    """Each site's ΔW in LoRA's layout ([out, in] for a linear layer, the tensor's own for a
    parameter target), float32; an UnsupportedModuleError where LoRA cannot carry the change."""
    model = delta.model
    out: dict[str, torch.Tensor] = {}
    for piece in delta.pieces.values():
        host = model.get_submodule(piece.site_path)
        if piece.through:
            host = host.get_submodule(piece.through)
        try:
            change = {n: d for n, d in piece.delta_weights(host).items() if d.abs().max() > 0 or n != "bias"}
        except MergeError as exc:  # (BitFit on a layer without a bias of its own)
            raise UnsupportedModuleError(
                f"as_lora: a plain LoRA carries the weight of a linear layer (or a parameter "
                f"target) only, and {delta.name!r} cannot be written as one: {exc}"
            ) from None
        if not change:  # (a piece that holds shared tensors, such as VB-LoRA's bank, changes no weight)
            continue
        name = getattr(piece, "param_name", None)
        if name is not None and set(change) == {name}:  # a parameter target (fused experts: per expert)
            out[piece.key] = change[name].float()
            continue
        if set(change) != {"weight"} or not is_linear_like(host):
            raise UnsupportedModuleError(
                f"as_lora: {delta.name!r} changes {sorted(change)} of {piece.key!r} ({type(host).__name__}); a plain "
                "LoRA carries the weight of a linear layer (or a parameter target) only"
            )
        dw = change["weight"].float()
        key = piece.site_path + (f".{piece.through}" if piece.through else "")
        out[key] = dw.T if is_conv1d(host) else dw
    return out
