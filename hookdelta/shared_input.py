"""Sibling layers that read the same input (q/k/v, gate/up) share one GEMM over their stacked
factors: `x @ [A_q; A_k; A_v]ᵀ` once, sliced per sibling, instead of one GEMM per sibling (one
read of x instead of three, and in backward one `dx` GEMM and one accumulation instead of three).

A group is fixed when a delta is built, so every call of a member computes its product the same
way (slices of the stacked GEMM, whose rounding can differ from a GEMM over one factor alone):
the model gives the same bits call after call. Whether the siblings really got the same input is
checked per call, on the tensor itself: the same object, at the same version (no in-place write
in between), in the same forward of the model, with the same factors at their same versions, and
each member takes from one stacked product at most once. (Version counters are trusted only
within one forward: the writers that skip them, optimizer steps and `.data` writes, do not run
between two layers of one forward; across forwards nothing is kept.) A member whose input differs computes
the stacked product of its own input (the same rounding). Inference tensors have no version
counter, so the caller (LoRA) computes alone under `torch.inference_mode()`, and in compiled
code (where inductor fuses anyway) and with dropout (a mask per layer) too.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from . import ops

_forward = [0]  # counts forwards of models with deltas: a product never outlives its forward


def new_forward() -> None:
    """Called at the start of each forward of a model with deltas (by its store)."""
    _forward[0] += 1


class SharedInput:
    """The members (pieces with a `lora_A`-like factor named `factor`) of one group; the last
    stacked product and who may still take from it. Every call is on the hot path: the checks
    below are the few that decide correctness, in the cheapest order."""

    def __init__(self, members: Sequence[Any], factor: str = "lora_A") -> None:
        self.members = tuple(members)
        self.factor = factor
        self.index = {m: i for i, m in enumerate(self.members)}
        # (input ref, its version, grad mode, forward, the slices, (factor, version) each was made
        # from, who may still take)
        self.entry: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: the members, no product
        return {"members": self.members, "factor": self.factor}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"], state["factor"])  # type: ignore[misc]  # (rebuilt from its state)

    def product(self, member: Any, x: torch.Tensor) -> torch.Tensor:
        """`x @ factorᵀ` of `member`, as a slice of the group's stacked product for this input:
        taken from the sibling that computed it when it is valid for this call, else computed."""
        mine = member._parameters[self.factor]
        i = self.index[member]
        entry = self.entry
        if entry is not None:
            ref, version, grad, forward, parts, made, left = entry
            # the same input tensor, unwritten since, in the same forward and grad mode, this
            # member's own factor unchanged since the product was made, and not taken before
            if (
                left[i]
                and ref() is x
                and forward == _forward[0]
                and x._version == version
                and grad == torch.is_grad_enabled()
                and made[i][0] is mine
                and mine._version == made[i][1]
            ):
                left[i] = False
                if not any(left):
                    self.entry = None  # all took: let the product go with the graph
                return parts[i]
        factors = [m._parameters[self.factor] for m in self.members]
        if any(f.dtype != mine.dtype or f.device != mine.device for f in factors):
            return torch.nn.functional.linear(x, mine)  # a member moved alone: never mix dtypes or devices
        parts = ops.stacked_linear(x, factors)  # stacked per call, never kept (see ops.py)
        left = [True] * len(factors)
        left[i] = False
        made = [(f, f._version) for f in factors]
        self.entry = (weakref.ref(x), x._version, torch.is_grad_enabled(), _forward[0], parts, made, left)
        return parts[i]
