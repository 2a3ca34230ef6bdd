"""Sibling layers that read the same input (q/k/v, gate/up) share one GEMM over their stacked
factors: `x @ [A_q; A_k; A_v]ᵀ` once, sliced per sibling, instead of one GEMM per sibling (one
read of x instead of three, and in backward one `dx` GEMM and one accumulation instead of three).

A group is fixed when a delta is built, so every call of a member computes its product the same
way (slices of the stacked GEMM, whose rounding can differ from a GEMM over one factor alone):
the model gives the same bits call after call. Whether the siblings really got the same input is
checked per call, on the tensor itself: the same object, at the same version (no in-place write
in between), in the same forward of the model, with the same factors at their same versions, and
each member takes from one stacked product at most once. A member whose input differs computes
the stacked product of its own input (the same rounding). Inference tensors have no version
counter, so the caller (LoRA) computes alone under `torch.inference_mode()`, and in compiled
code (where inductor fuses anyway) and with dropout (a mask per layer) too.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch

_forward = [0]  # counts forwards of models with deltas: a product never outlives its forward


def new_forward() -> None:
    """Called at the start of each forward of a model with deltas (by its store)."""
    _forward[0] += 1


class SharedInput:
    """The members (pieces with a `lora_A`-like factor named `factor`) of one group; the last
    stacked product and who may still take from it."""

    def __init__(self, members: Sequence[Any], factor: str = "lora_A") -> None:
        self.members = tuple(members)
        self.factor = factor
        self.entry: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: the members, no product
        return {"members": self.members, "factor": self.factor}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"], state["factor"])  # type: ignore[misc]

    def product(self, member: Any, x: torch.Tensor) -> torch.Tensor:
        """`x @ factorᵀ` of `member`, as a slice of the group's stacked product for this input:
        taken from the sibling that computed it when it is valid for this call, else computed."""
        entry = self.entry
        factors = [getattr(m, self.factor) for m in self.members]
        mine = getattr(member, self.factor)
        if any(f.dtype != mine.dtype or f.device != mine.device for f in factors):
            return torch.nn.functional.linear(x, mine)  # a member was moved alone: never mix dtypes
        if entry is not None:
            ref, version, grad, forward, sources, left, slices = entry
            if (member in left and ref() is x and x._version == version and grad == torch.is_grad_enabled()
                    and forward == _forward[0] and all(s is f and s._version == v for (s, v), f in zip(sources, factors))):
                left.discard(member)
                if not left:
                    self.entry = None  # all took: let the product go with the graph
                return slices[member]
        out = torch.nn.functional.linear(x, torch.cat(factors))
        # one split (one backward node that concatenates the members' gradients), not a slice each
        slices = dict(zip(self.members, out.split([f.shape[0] for f in factors], dim=-1)))
        left = set(self.members) - {member}
        sources = tuple((f, f._version) for f in factors)
        self.entry = (weakref.ref(x), x._version, torch.is_grad_enabled(), _forward[0], sources, left, slices)
        return slices[member]
