"""Training an attached delta with the Hugging Face `Trainer`: one callback.

    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[hd.TrainerCallback(delta)])

Trainer's optimizer already gets exactly the delta's tensors (it takes the parameters that
require grad, and the backbone is frozen). The callback adds what Trainer cannot know: every
checkpoint gets the delta in hookdelta's format (`checkpoint-N/hookdelta/<name>/`), and
`trainer.train(resume_from_checkpoint=...)` puts the checkpoint's delta back before the
first step. `trainer.save_model()` keeps writing the untouched base weights; save the delta
with `delta.save(...)`.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback as _Base

from ..errors import DeltaFileError
from ..persistence import read_meta, read_tensors


class TrainerCallback(_Base):
    """Saves the delta into each Trainer checkpoint and restores it when training resumes."""

    def __init__(self, delta: Any) -> None:
        self.delta = delta

    def folder(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, "hookdelta", self.delta.name)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.delta.save(self.folder(checkpoint), overwrite=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            return  # a fresh run
        folder = self.folder(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if not os.path.isdir(folder):
            raise DeltaFileError(
                f"resuming at step {state.global_step}, but the checkpoint has no saved delta at {folder}; "
                "was it written with hd.TrainerCallback(delta)?"
            )
        self.delta.load_tensors(read_tensors(folder, read_meta(folder)))
