"""Training an attached delta with the Hugging Face `Trainer` (and the trainers built on it:
Seq2SeqTrainer, TRL's): one callback.

    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[hd.TrainerCallback(delta)])

Trainer's optimizer already gets exactly the delta's tensors (it takes the parameters that
require grad, and the backbone is frozen). The callback adds what Trainer cannot know:
- the delta's tensors join the model's state dict (`hd.include_in_state_dict`), so every
  checkpoint's weights hold them and Trainer itself restores them when it loads a checkpoint:
  `train(resume_from_checkpoint=<any path>)` and `load_best_model_at_end` bring the delta back;
- every checkpoint also gets the delta in hookdelta's format (`checkpoint-N/hookdelta/<name>/`),
  loadable with `hd.load`;
- resuming with neither is refused, never continued with a fresh delta and the old optimizer;
- at the end of training the delta is saved in hookdelta's format to `<output_dir>/hookdelta/<name>/`
  (`save_model()` writes the model's weights, the delta's tensors among them, not that folder);
- checkpoints do not keep the frozen base (`save_base=False`, the default): after Trainer wrote
  a checkpoint, its weights file is rewritten to the delta's tensors alone and its config.json
  is removed, so the folder is a few MB and `from_pretrained(checkpoint)` fails loudly instead of
  building a model with random base weights. Trainer resumes from it as from any checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback as _Base

from ..errors import DeltaFileError
from ..persistence import read_meta, read_tensors
from ..store import store_of


class TrainerCallback(_Base):
    """Saves the delta into each Trainer checkpoint and restores it when training resumes."""

    def __init__(self, delta: Any, save_base: bool = False) -> None:
        self.delta = delta
        self.save_base = save_base
        self.restored = False  # whether Trainer loaded the delta's tensors from a checkpoint
        store = store_of(delta.model)
        if store is not None:
            store.include_in_state_dict = True
        delta.register_load_state_dict_post_hook(self._loaded)

    def _prefix(self) -> str:
        """Where the delta's tensors sit in the model's state dict."""
        return next((f"{path}." for path, m in self.delta.model.named_modules() if m is self.delta), "")

    def _loaded(self, module: Any, incompatible: Any) -> None:
        # called with the whole load's keys: the delta's own are under its path in the model
        prefix = self._prefix()
        self.restored = bool(prefix) and not any(k.startswith(prefix) for k in incompatible.missing_keys)

    def folder(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, "hookdelta", self.delta.name)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.delta.save(self.folder(checkpoint), overwrite=True)
            if not self.save_base:
                self._drop_base(checkpoint)

    def _drop_base(self, checkpoint: str) -> None:
        """Rewrite the checkpoint's weights to the delta's tensors alone (under their keys in the
        model's state dict, which Trainer's resume loads non-strictly) and remove its config."""
        from safetensors.torch import save_file

        prefix = self._prefix()
        tensors = {prefix + k: v.detach().contiguous().cpu() for k, v in self.delta.state_dict().items()}
        for name in os.listdir(checkpoint):
            if name.startswith(("model.safetensors", "model-", "pytorch_model")) or name == "config.json":
                os.remove(os.path.join(checkpoint, name))
        save_file(tensors, os.path.join(checkpoint, "model.safetensors"), metadata={"format": "pt"})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.delta.save(self.folder(args.output_dir), overwrite=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            return  # a fresh run
        if self.restored:
            return  # Trainer loaded the checkpoint's weights, the delta's among them
        folder = self.folder(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if not os.path.isdir(folder):
            raise DeltaFileError(
                f"resuming at step {state.global_step}, but the checkpoint's weights do not hold delta "
                f"{self.delta.name!r} and there is no saved delta at {folder}; was it written with "
                "hd.TrainerCallback(delta)?")
        self.delta.load_tensors(read_tensors(folder, read_meta(folder)))
