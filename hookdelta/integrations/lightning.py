"""Training attached deltas with Lightning: one callback.

    trainer = L.Trainer(..., callbacks=[hd.LightningCallback(delta)])

Lightning's checkpoint holds the module's state dict, which leaves hookdelta's tensors out
(attaching changes no state-dict key), and the optimizer's state, which holds the delta's Adam
moments. Without the callback a resume would continue a fresh delta with the old moments. The
callback saves each delta's tensors in the checkpoint (under "hookdelta") and puts them back on
resume; a checkpoint without them is refused with a DeltaFileError, never continued.
(`hd.include_in_state_dict(model)` is the other way: the tensors then ride in the state dict.)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from ..errors import ConfigError, DeltaFileError

KEY = "hookdelta"


class LightningCallback(Callback):
    """Saves the deltas into each Lightning checkpoint and restores them when training resumes."""

    def __init__(self, *deltas: Any) -> None:
        if not deltas or any(not hasattr(d, "pieces") for d in deltas):
            raise ConfigError(
                f"hd.LightningCallback takes the deltas to keep, e.g. LightningCallback(delta); got {deltas!r}"
            )
        self.deltas = deltas

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = {
            d.name: {k: v.detach().cpu().clone() for k, v in d.state_dict().items()} for d in self.deltas
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(KEY) or {}
        missing = [d.name for d in self.deltas if d.name not in saved]
        if missing:
            raise DeltaFileError(
                f"this checkpoint holds no tensors of delta(s) {missing} (it was saved without "
                "hd.LightningCallback), while its optimizer state may hold their Adam moments: resuming would "
                "continue a fresh delta with an old optimizer. Resume from a checkpoint saved with the callback, "
                "or start a new run"
            )
        for d in self.deltas:
            tensors = saved[d.name]
            mine = d.state_dict()
            if set(tensors) != set(mine) or any(tensors[k].shape != mine[k].shape for k in mine):
                raise DeltaFileError(
                    f"the checkpoint's tensors of delta {d.name!r} do not fit the attached delta "
                    "(other sites, ranks or method); attach it as it was when the checkpoint was saved"
                )
            d.load_state_dict(tensors)
