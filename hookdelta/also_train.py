"""`also_train`: modules trained in full next to a delta (PEFT's `modules_to_save`).

The delta holds a trainable copy of each matched module's own parameters and swaps it in
for every call through the reparametrization hook, so the backbone's tensors are never
written: detach restores exactly and the copies are saved with the delta.

A parameter shared with another module (GPT-2's `lm_head` tied to `wte`) gets one copy that
every holder uses, so the model stays tied and merged equals unmerged. With
`tie_also_train=False` (PEFT's modules_to_save) each named module gets its own copy, and
such a delta refuses to merge into the shared tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .engine import Piece
from .errors import MergeError
from .modules import parameter_holders
from .placement import real_weight
from .selection import match


class FullCopy(Piece):
    """Trainable copies of one module's direct parameters, swapped in for each call."""

    merges_by = "value"  # merging writes the copy itself; only the original can undo it
    role = "also_train"

    def __init__(
        self, path: str, module: nn.Module, model: nn.Module, skip: tuple[str, ...] = (), shared: tuple[str, ...] = ()
    ) -> None:
        super().__init__(path, key=path)
        self.shared = shared  # untied copies of parameters other modules hold too: not mergeable
        names = []
        for name, p in module._parameters.items():
            if p is not None and name not in skip:
                value = real_weight(model, path, name).detach().clone()
                self.register_parameter(name, nn.Parameter(value, requires_grad=True))
                names.append(name)
        self.swaps = tuple(names)

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._parameters[name]

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.shared:
            raise MergeError(
                f"the trained copy of {self.key}.{self.shared[0]} is used at {self.key!r} only, but the model shares "
                "that tensor with another module (tied weights), so merging would change both. Keep the delta "
                "unmerged, or attach with tie_also_train=True (one copy used by every holder)"
            )
        return {name: self._parameters[name] for name in self.swaps}

    def describe(self) -> str:
        return "trained in full: " + ", ".join(self.swaps) + (" (untied)" if self.shared else "")


def also_train_paths(model: nn.Module, selectors: Any) -> list[str]:
    """Every module with parameters of its own inside the modules `selectors` picks."""
    out: dict[str, None] = {}
    for path in match(model, selectors):
        for sub, module in model.get_submodule(path).named_modules(prefix=path):
            if any(p is not None for p in module._parameters.values()):
                out[sub] = None
    return list(out)


class TiedCopy(Piece):
    """Another holder of a copied parameter: swaps in the same trainable copy, so both ends of a
    tie (an output head and the embedding) use one tensor, merged or not."""

    merges_by = "value"
    role = "also_train"

    def __init__(self, primary: FullCopy, name: str, path: str) -> None:
        super().__init__(path, key=f"{path}:{name}")
        object.__setattr__(self, "primary", primary)  # not a submodule: the copy is saved once
        self.swaps = (name,)

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.primary._parameters[name]

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {}  # the primary writes the shared tensor once

    def describe(self) -> str:
        return f"uses the copy trained at {self.primary.key}"


def build_copies(model: nn.Module, paths: Sequence[str], tie: bool = True) -> list[Piece]:
    """One FullCopy per module, and (tie) a TiedCopy wherever another module holds a copied parameter."""
    holders = parameter_holders(model)
    if not tie:
        return [
            FullCopy(
                path,
                model.get_submodule(path),
                model,
                shared=tuple(
                    n
                    for n, p in model.get_submodule(path)._parameters.items()
                    if p is not None and len(holders[id(p)]) > 1
                ),
            )
            for path in paths
        ]
    pieces: list[Piece] = []
    copied: dict[int, FullCopy] = {}  # id(parameter) -> the piece holding its copy
    for path in paths:
        module = model.get_submodule(path)
        shared = {n: copied[id(p)] for n, p in module._parameters.items() if p is not None and id(p) in copied}
        primary = FullCopy(path, module, model, skip=tuple(shared))
        if primary.swaps:
            pieces.append(primary)
        pieces += [TiedCopy(owner, n, path) for n, owner in shared.items()]
        for name in primary.swaps:
            copied[id(module._parameters[name])] = primary
    for pid, primary in list(copied.items()):
        for path, _, name in holders.get(pid, []):
            if path not in paths:  # a holder outside also_train uses the copy too
                pieces.append(TiedCopy(primary, name, path))
    return pieces
