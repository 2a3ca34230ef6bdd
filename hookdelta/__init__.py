"""hookdelta: parameter-efficient deltas (LoRA, adapters, prompts, ...) attached to any PyTorch model through
hooks, without replacing a module or changing a state-dict key.

    import hookdelta as hd
    delta = hd.attach(model, hd.LoRAConfig(r=8, targets=["q_proj", "v_proj"]))
"""

from typing import Any

from . import inits, methods, optim
from .as_lora import as_lora
from .combine import average, combine, fuse, split
from .config import DeltaConfig
from .delta import Delta, attach, deltas, include_in_state_dict, route, set_active
from .errors import (
    BaseWeightsMismatchWarning,
    BypassError,
    ConfigError,
    DeltaFileError,
    DeltaStateError,
    HookdeltaError,
    MergeError,
    PathPrefixWarning,
    RoutingError,
    SelectorError,
    UnsupportedModuleError,
)
from .hotswap import prepare_hotswap
from .integrations.reference import ReferenceModel, reference_model
from .methods import *  # noqa: F403  (every method's config: methods.__all__)
from .peft_format import load_peft
from .persistence import load
from .roles import roles
from .selection import match
from .version import VERSION as __version__
from .visualize import visualize


def __getattr__(name: str) -> Any:  # integrations import their framework only when asked for
    if name == "TrainerCallback":
        from .integrations.trainer import TrainerCallback

        return TrainerCallback
    if name == "delta_trainer":
        from .integrations.trainer import delta_trainer

        return delta_trainer
    if name == "report":  # (its HTML writer loads on use)
        from .reporting import report

        return report
    if name == "pick":  # (its web server loads on use)
        from .picker import pick

        return pick
    if name == "LightningCallback":
        from .integrations.lightning import LightningCallback

        return LightningCallback
    raise AttributeError(f"module 'hookdelta' has no attribute {name!r}")


__all__ = [
    "BaseWeightsMismatchWarning",
    "ConfigError",
    "Delta",
    "DeltaConfig",
    "DeltaFileError",
    "DeltaStateError",
    "HookdeltaError",
    "MergeError",
    "SelectorError",
    "UnsupportedModuleError",
    "attach",
    "deltas",
    "set_active",
    "load",
    "match",
    "visualize",
    "load_peft",
    "PathPrefixWarning",
    "include_in_state_dict",
    "BypassError",
    "roles",
    "route",
    "RoutingError",
    "combine",
    "prepare_hotswap",
    "average",
    "fuse",
    "split",
    "__version__",
    "reference_model",
    "ReferenceModel",
    "optim",
    "inits",
    "as_lora",
    "report",
    "pick",
]
__all__ += methods.__all__  # the method configs, listed once (methods/__init__.py)
