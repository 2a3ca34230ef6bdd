"""`also_train`: modules trained in full next to a delta (PEFT's `modules_to_save`).

The delta holds a trainable copy of each matched module's own parameters and swaps it in
for every call through the reparametrization hook, so the backbone's tensors are never
written: detach restores exactly and the copies are saved with the delta.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from .engine import Piece
from .selection import match


class FullCopy(Piece):
    """Trainable copies of one module's direct parameters, swapped in for each call."""

    exact_unmerge_needs_copy = True  # merging writes the copy itself; only the original can undo it

    def __init__(self, path: str, module: nn.Module) -> None:
        super().__init__(path, key=path)
        names = []
        for name, p in module._parameters.items():
            if p is not None:
                self.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=True))
                names.append(name)
        self.swaps = tuple(names)

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._parameters[name]

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: self._parameters[name] for name in self.swaps}

    def describe(self) -> str:
        return "trained in full: " + ", ".join(self.swaps)


def also_train_paths(model: nn.Module, selectors: Any) -> list[str]:
    """Every module with parameters of its own inside the modules `selectors` picks."""
    out: dict[str, None] = {}
    for path in match(model, selectors):
        for sub, module in model.get_submodule(path).named_modules(prefix=path):
            if any(p is not None for p in module._parameters.values()):
                out[sub] = None
    return list(out)


def build_copies(model: nn.Module, paths: Sequence[str]) -> list[Piece]:
    return [FullCopy(path, model.get_submodule(path)) for path in paths]
