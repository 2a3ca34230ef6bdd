"""Training an attached delta with the Hugging Face `Trainer` (and the trainers built on it:
Seq2SeqTrainer, TRL's): one callback, or one class wrapper.

    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[hd.TrainerCallback(delta)])
    trainer = hd.delta_trainer(SFTTrainer)(model=model, args=args, ...)  # also save_model() and quantized bases

Trainer's optimizer already gets exactly the delta's tensors (it takes the parameters that
require grad, and the backbone is frozen). The callback adds what Trainer cannot know:
- the delta's tensors join the model's state dict (`hd.include_in_state_dict`), so every
  checkpoint's weights hold them and Trainer itself restores them when it loads a checkpoint:
  `train(resume_from_checkpoint=<any path>)` and `load_best_model_at_end` bring the delta back;
- every checkpoint also gets the delta in hookdelta's format (`checkpoint-N/hookdelta/<name>/`),
  loadable with `hd.load`;
- resuming with neither is refused, never continued with a fresh delta and the old optimizer;
- at the end of training the delta is saved in hookdelta's format to `<output_dir>/hookdelta/<name>/`;
- checkpoints do not keep the frozen base (`save_base=False`, the default): after Trainer wrote
  a checkpoint, its weights file is rewritten to the deltas' tensors alone and its config.json
  is removed, so the folder is a few MB and `from_pretrained(checkpoint)` fails loudly instead of
  building a model with random base weights. Trainer resumes from it as from any checkpoint;
- a quantized base (bitsandbytes, GGUF) passes Trainer's check for "trainable adapters";
- an AdaLoRA delta gets its rank schedule after every optimizer step (over Trainer's max_steps
  unless its config sets total_step); `hd.delta_trainer` also adds its orthogonality penalty to
  the training loss (PEFT adds it in its model's forward).

`save_model()` is no callback event: `hd.delta_trainer(cls)` is `cls` with a `save_model()` that
writes what a checkpoint holds (no base unless `save_base=True`), and a callback for each
attached delta that was not given one.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch
from transformers import Trainer
from transformers import TrainerCallback as _Base

from ..compat import declare_adapters
from ..errors import ConfigError, DeltaFileError
from ..modules import STORE_NAME
from ..persistence import read_meta, read_tensors
from ..sharding import full, is_sharded, whole
from ..store import store_of

WEIGHTS = "model.safetensors"


def _prefix(delta: Any) -> str:
    """Where the delta's tensors sit in its model's state dict."""
    return next((f"{path}." for path, m in delta.model.named_modules() if m is delta), "")


def delta_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every attached delta's tensors under their keys in the model's state dict: what Trainer's
    resume loads (non-strictly) back into the model. Sharded tensors are gathered (collective)."""
    from ..delta import deltas

    out = {}
    for d in deltas(model).values():
        own = d.state_dict(keep_vars=True)
        with whole(own.values()):  # (a ZeRO-3 partition holds its values only inside: so the clones)
            out.update({_prefix(d) + k: full(v).detach().cpu().contiguous().clone() for k, v in own.items()})
    return out


def sharded(model: torch.nn.Module) -> bool:
    """Whether the deltas' tensors are sharded: then saving them is collective (every rank calls)."""
    from ..delta import deltas

    return any(is_sharded(p) for d in deltas(model).values() for p in d.parameters())


def write_without_base(folder: str, model: torch.nn.Module, write: bool = True) -> None:
    """Replace the model's weight files and config in `folder` by the deltas' tensors alone
    (gathered on every rank that calls it; written only where `write`)."""
    from safetensors.torch import save_file

    tensors = delta_weights(model)
    if not write:
        return
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith(("model.safetensors", "model-", "pytorch_model")) or name == "config.json":
            os.remove(os.path.join(folder, name))
    save_file(tensors, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})


def _release(hook: Any, undeclare: Any) -> None:
    hook.remove()
    undeclare()


class TrainerCallback(_Base):
    """Saves the delta into each Trainer checkpoint and restores it when training resumes."""

    def __init__(self, delta: Any, save_base: bool = False) -> None:
        self.delta = delta
        self.save_base = save_base
        self.restored = False  # whether Trainer loaded the delta's tensors from a checkpoint
        self.allocator: Any = None  # AdaLoRA's rank schedule, made when training begins
        store = store_of(delta.model)
        if store is not None:
            store.include_in_state_dict = True
        loaded = weakref.WeakMethod(self._loaded)  # (the delta must not keep a finished callback alive)

        def on_load(module: Any, found: Any) -> None:
            callback = loaded()
            if callback is not None:
                callback(module, found)

        hook = delta.register_load_state_dict_post_hook(on_load)
        # undone when the Trainer is built (on_init_end): only its check for adapters sees it; and
        # when this callback goes away unused (a Trainer that failed to build), the model is as it was
        self.undeclare = declare_adapters(delta.model)
        weakref.finalize(self, _release, hook, self.undeclare)

    def _loaded(self, module: Any, incompatible: Any) -> None:
        # called with the whole load's keys: the delta's own are under its path in the model
        prefix = _prefix(self.delta)
        self.restored = bool(prefix) and not any(k.startswith(prefix) for k in incompatible.missing_keys)
        if self.restored and not self.save_base:
            # a checkpoint of ours holds the deltas only: when it left out exactly the frozen base
            # (every key outside hookdelta's store), that is by design, not missing (Trainer would
            # log every base key as missing on resume)
            missing = incompatible.missing_keys
            outside = [k for k in missing if STORE_NAME not in k.split(".")]
            base = [k for k in self.delta.model.state_dict(keep_vars=True) if STORE_NAME not in k.split(".")]
            if outside and sorted(outside) == sorted(base):
                missing[:] = [k for k in missing if STORE_NAME in k.split(".")]

    def folder(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, "hookdelta", self.delta.name)

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.undeclare()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # sharded tensors (DeepSpeed ZeRO-3, FSDP2): every rank gathers, rank 0 writes
        if state.is_world_process_zero or sharded(self.delta.model):
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.delta.save(self.folder(checkpoint), overwrite=True)
            if not self.save_base:
                write_without_base(checkpoint, self.delta.model, write=state.is_world_process_zero)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero or sharded(self.delta.model):
            self.delta.save(self.folder(args.output_dir), overwrite=True)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.allocator is not None:  # AdaLoRA's rank schedule runs while the gradients are there
            self.allocator.update_and_allocate(state.global_step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.undeclare()
        if self.delta.method == "adalora":  # its schedule; the steps come from Trainer unless the config has them
            from ..optim import adalora

            self.allocator = adalora(self.delta, None if self.delta.config.total_step else state.max_steps)
        if state.global_step == 0:
            return  # a fresh run
        if self.restored:
            return  # Trainer loaded the checkpoint's weights, the delta's among them
        folder = self.folder(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        if not os.path.isdir(folder):
            raise DeltaFileError(
                f"resuming at step {state.global_step}, but the checkpoint's weights do not hold delta "
                f"{self.delta.name!r} and there is no saved delta at {folder}; was it written with "
                "hd.TrainerCallback(delta)?"
            )
        self.delta.load_tensors(read_tensors(folder, read_meta(folder)))


class _DeltaTrainer:
    """What `hd.delta_trainer` adds to a Trainer class (kept first in the MRO)."""

    # (the Trainer's, which this mixin comes before)
    args: Any
    model: Any
    callback_handler: Any
    processing_class: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ..delta import deltas

        model = kwargs.get("model", args[0] if args else None)
        if not isinstance(model, torch.nn.Module) or not deltas(model):
            raise ConfigError(
                f"{type(self).__name__} needs the model object with its deltas attached (hd.attach(model, cfg) "
                "first), not a name or a bare model; a plain Trainer class trains a model without deltas"
            )
        given = list(kwargs.get("callbacks") or [])
        have = {id(c.delta) for c in given if isinstance(c, TrainerCallback)}
        added = [TrainerCallback(d) for d in deltas(model).values() if id(d) not in have]
        kwargs["callbacks"] = given + added
        try:
            super().__init__(*args, **kwargs)
        finally:  # a Trainer that failed to build leaves no mark on the model
            for c in kwargs["callbacks"]:
                if isinstance(c, TrainerCallback):
                    c.undeclare()

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Trainer's loss, plus the orthogonality penalty of AdaLoRA deltas while training (PEFT adds
        it in its model's forward)."""
        out = super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]  # (the Trainer's)
        if not model.training:
            return out
        extra = [
            c.allocator.penalty()
            for c in self.callback_handler.callbacks
            if isinstance(c, TrainerCallback) and c.allocator is not None
        ]
        if not extra:
            return out
        if isinstance(out, tuple):
            return (out[0] + sum(extra),) + tuple(out[1:])
        return out + sum(extra)

    def save_model(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        """Like Trainer's, but writes the deltas (hookdelta's format, and their tensors as the weights
        file Trainer resumes from) and the processing class, not the frozen base, unless a callback
        says `save_base=True`."""
        callbacks = [c for c in self.callback_handler.callbacks if isinstance(c, TrainerCallback)]
        if any(c.save_base for c in callbacks):
            return super().save_model(output_dir, *args, **kwargs)  # type: ignore[misc]  # (the Trainer's)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = callbacks[0].delta.model if callbacks else self.model
        if not (self.args.should_save or sharded(model)):
            return None
        for c in callbacks:  # (sharded: every rank gathers, rank 0 writes)
            c.delta.save(c.folder(output_dir), overwrite=True)
        write_without_base(output_dir, model, write=self.args.should_save)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        return None


@functools.cache
def delta_trainer(trainer_class: type) -> type:
    """`trainer_class` (Trainer, Seq2SeqTrainer, TRL's SFTTrainer, DPOTrainer, ...) with a
    `save_model()` that writes the attached deltas, not the frozen base, and an `hd.TrainerCallback`
    for every attached delta that was not given one."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise ConfigError(f"hd.delta_trainer takes a Trainer class (Trainer, SFTTrainer, ...), got {trainer_class!r}")
    return type(f"Delta{trainer_class.__name__}", (_DeltaTrainer, trainer_class), {"__module__": __name__})
