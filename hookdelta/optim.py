"""Optimizer recipes for LoRA deltas, as torch optimizers or parameter groups (no optimizer of our own).

- LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A. `loraplus_groups` builds
  PEFT's four groups (`create_loraplus_optimizer`): A and every other tensor at `lr`; B and the
  1-D tensors (LoRA's bias, DoRA's magnitude) at lr·ratio, with weight decay unless they are
  biases; a LoRA on an embedding at `lr_embedding` (A and B alike, as PEFT).
- LoRA-FA (Zhang et al. 2023): A frozen, B trained on the gradient projected onto A's row space,
  g_B ← g_B·(A·Aᵀ + δI)⁺ / s², so that the update of ΔW = s·B·A is the one full fine-tuning's
  gradient gives within that space. `lorafa` freezes A, puts the projection on B's gradient (a
  tensor hook: it is linear, so projecting each backward's gradient equals projecting their sum)
  and returns a torch AdamW over the rest; `LoRAFA.remove()` takes the hooks off and unfreezes A.
- AdaLoRA (Zhang et al. 2023): `adalora(delta)` is the rank schedule of an AdaLoRA delta; it
  writes only the delta's E entries, between steps, as PEFT's `update_and_allocate` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError, UnsupportedModuleError

_NO_DECAY = (nn.LayerNorm,)  # transformers' ALL_LAYERNORM_LAYERS, whose tensors PEFT's groups never decay


def _deltas(target: Any) -> list[Any]:
    """The LoRA deltas of a Delta, a list of them, or a model (its enabled LoRA deltas)."""
    from .delta import Delta
    from .store import deltas_of

    if isinstance(target, Delta):
        found = [target]
    elif isinstance(target, (list, tuple)) and all(isinstance(d, Delta) for d in target):
        found = list(target)
    elif isinstance(target, nn.Module):
        found = [d for d in deltas_of(target).values() if d.enabled]
    else:
        raise ConfigError(f"hd.optim takes a Delta, a list of Deltas or a model, got {type(target).__name__}")
    odd = [d.name for d in found if d.method != "lora"]
    if odd or not found:
        raise UnsupportedModuleError(
            f"hd.optim's recipes are for LoRA deltas; {odd or 'no delta'} {'are not LoRA' if odd else 'was found'}"
        )
    return found


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value != value:
        raise ConfigError(f"hd.optim: {name} must be a number >= 0, got {value!r}")
    return float(value)


def loraplus_groups(
    target: Any, *, lr: float, ratio: float, weight_decay: float = 0.0, lr_embedding: float = 1e-6
) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups (PEFT's `create_loraplus_optimizer`) for any torch optimizer:
    [A and the rest, embedding LoRAs, B with decay, B and biases without]. `target`: a Delta, a list
    of them, or a model (all its enabled LoRA deltas)."""
    from .methods.lora_layers import LoRAEmbedding

    lr, ratio = _check_lr("lr", lr), _check_lr("ratio", ratio)
    weight_decay, lr_embedding = _check_lr("weight_decay", weight_decay), _check_lr("lr_embedding", lr_embedding)
    groups: dict[str, list[torch.Tensor]] = {"a": [], "embedding": [], "b": [], "b_no_decay": []}
    for delta in _deltas(target):
        for piece in delta.pieces.values():
            for name, p in piece.named_parameters():
                if not p.requires_grad:
                    continue
                owner = piece.get_submodule(name.rpartition(".")[0]) if "." in name else piece
                if isinstance(piece, LoRAEmbedding) and name in ("lora_A", "lora_B"):
                    groups["embedding"].append(p)
                elif "lora_B" in name or p.dim() == 1:  # (as PEFT: biases and norms' tensors without decay)
                    decay = "bias" not in name.rpartition(".")[2] and not isinstance(owner, _NO_DECAY)
                    groups["b" if decay else "b_no_decay"].append(p)
                else:
                    groups["a"].append(p)
    return [
        {"params": groups["a"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["b"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["b_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]


def loraplus(
    target: Any,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,  # (a class, or any factory)
    *,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A torch optimizer of `optimizer_cls` over LoRA+'s groups (see `loraplus_groups`); `kwargs`
    go to the optimizer (betas, eps, ...)."""
    return optimizer_cls(
        loraplus_groups(target, lr=lr, ratio=ratio, weight_decay=weight_decay, lr_embedding=lr_embedding),
        lr=lr,
        **kwargs,
    )


@dataclass
class LoRAFA:
    """What `lorafa` set up: the optimizer, and `remove()` to undo the freezing and the hooks."""

    optimizer: torch.optim.Optimizer
    frozen: list[torch.Tensor] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for p in self.frozen:
            p.requires_grad_(True)
        self.handles, self.frozen = [], []

    def step(self, closure: Any = None) -> Any:
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def lorafa(
    target: Any,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,  # (a class, or any factory)
    **kwargs: Any,
) -> LoRAFA:
    """LoRA-FA: freezes every plain LoRA's A, projects B's gradient (g_B·(A·Aᵀ + 1e-8·I)⁺ / s², as
    PEFT's `create_lorafa_optimizer`) and returns the optimizer over the trainable tensors (AdamW
    with PEFT's betas and eps unless told otherwise), wrapped in a `LoRAFA` whose `remove()` undoes it."""
    from .methods.lora_layers import LoRALinear

    lr, weight_decay = _check_lr("lr", lr), _check_lr("weight_decay", weight_decay)
    found = _deltas(target)
    odd = [p.key for d in found for p in d.pieces.values() if type(p) is not LoRALinear]
    if odd:
        raise UnsupportedModuleError(
            f"LoRA-FA projects a plain LoRA's gradient on a linear layer; {odd[0]!r} is "
            f"another kind of piece. Narrow the delta's targets or use hd.optim.loraplus"
        )
    setup = LoRAFA(optimizer=None)  # type: ignore[arg-type]  # (made below, once the hooks are in)
    for delta in found:
        for piece in delta.pieces.values():
            a, b, s = piece.lora_A, piece.lora_B, piece.scale
            if a.requires_grad:
                a.requires_grad_(False)
                setup.frozen.append(a)

            def project(grad: torch.Tensor, a: torch.Tensor = a, s: Any = s) -> torch.Tensor:
                a32 = a.detach().float()
                gram = a32 @ a32.T + 1e-8 * torch.eye(a.shape[0], device=a.device)
                return (grad.float() @ torch.linalg.pinv(gram) / float(s) ** 2).to(grad.dtype)

            setup.handles.append(b.register_hook(project))
    params = [p for d in found for p in d.parameters() if p.requires_grad]
    setup.optimizer = optimizer_cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    return setup


__all__ = ("loraplus", "loraplus_groups", "lorafa", "LoRAFA")


def adalora(delta: Any, total_step: int | None = None) -> Any:
    """The rank schedule of an AdaLoRA delta (`methods.adalora.RankAllocator`): call
    `update_and_allocate(step)` after each optimizer step, add `penalty()` to the loss.
    `total_step` overrides the config's."""
    from .methods.adalora import RankAllocator

    return RankAllocator(delta, total_step)
