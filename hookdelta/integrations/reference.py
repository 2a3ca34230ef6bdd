"""A reference model without a copy (DPO, KTO, ORPO's reference; any teacher-equals-base setup):
the same model with its deltas off.

    trainer = DPOTrainer(model=model, ref_model=hd.reference_model(model), ...)

TRL and others call the reference as a model, and may replace its `forward` with their own
(TRL's fused loss calls its backbone and reads its head's weight): so the switch lives in this
wrapper's forward hooks, which run whatever forward is called, and every other attribute (config,
backbone, head) is the model's own. The switch is `hd.set_active`, allowed between the policy's
checkpointed forward and its backward because it is undone before the backward.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..delta import deltas, set_active


class ReferenceModel(nn.Module):
    """`model` with every delta off for the duration of each call (merged deltas cannot be
    switched off: set_active refuses them)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", model)  # not a child: its parameters are not this module's
        object.__setattr__(self, "active", [])  # the deltas that were on, per call under way
        self.register_forward_pre_hook(self._off)
        self.register_forward_hook(self._on, always_call=True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    def _off(self, module: nn.Module, args: Any) -> None:
        self.active.append([n for n, d in deltas(self.wrapped).items() if d.enabled])
        set_active(self.wrapped)

    def _on(self, module: nn.Module, args: Any, output: Any) -> None:
        set_active(self.wrapped, *self.active.pop())


def reference_model(model: nn.Module) -> ReferenceModel:
    """The model with its deltas off in each call: a trainer's reference model without a copy."""
    return ReferenceModel(model)
