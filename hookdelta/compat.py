"""Other libraries' private names that hookdelta's own code must use, found in one place.

Each is looked up once, when first needed; where a release no longer has it, the feature that
needs it refuses with a `HookdeltaError` naming the release, instead of failing somewhere deep.
(torch's `nn.Module` internals, `_parameters`, `_modules`, `_forward_hooks` and the like, are the
module protocol that accelerate and PEFT rely on too; docs/guides/compatibility.md lists
them with the rest.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import UnsupportedModuleError

BNB_CPU_UNPACK = "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@functools.cache
def _lookup(dotted: str) -> Callable[..., Any] | None:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name, None)
    except ImportError:
        return None


def bnb_cpu_unpack() -> Callable[..., Any]:
    """bitsandbytes' inverse of the layout it packs 4-bit weights into for CPU inference
    (bitsandbytes 0.50); refused clearly where the release has none."""
    found = _lookup(BNB_CPU_UNPACK)
    if found is None:
        raise UnsupportedModuleError(
            f"this 4-bit weight was repacked by bitsandbytes {package_version('bitsandbytes')} for CPU inference, and "
            f"that release has no {BNB_CPU_UNPACK.rpartition('.')[2]} to read it back; attach deltas before the first "
            "inference forward (hookdelta then holds the repacking off), or use a bitsandbytes release hookdelta "
            "is tested with (docs/guides/compatibility.md)"
        )
    return found


# transformers' Trainer refuses a quantized model unless it carries "trainable adapters", which it
# recognises by PEFT's wrapper class or by this flag of its own PEFT integration; there is no
# public way to say "adapters are attached" without PEFT. hookdelta sets it only while a Trainer
# is being built (hd.TrainerCallback, hd.delta_trainer), so save_pretrained never sees it.
TRANSFORMERS_ADAPTER_FLAG = "_hf_peft_config_loaded"


def declare_adapters(model: Any) -> Callable[[], None]:
    """Mark a quantized `model` as carrying trainable adapters for transformers' Trainer check;
    returns the undo (a no-op where the model is not quantized or is already marked)."""
    if not getattr(model, "is_quantized", False) or getattr(model, TRANSFORMERS_ADAPTER_FLAG, False):
        return lambda: None
    before = vars(model).get(TRANSFORMERS_ADAPTER_FLAG, None)  # (usually only a class default)
    setattr(model, TRANSFORMERS_ADAPTER_FLAG, True)

    def undo() -> None:
        if before is None:
            vars(model).pop(TRANSFORMERS_ADAPTER_FLAG, None)
        else:
            setattr(model, TRANSFORMERS_ADAPTER_FLAG, before)

    return undo
