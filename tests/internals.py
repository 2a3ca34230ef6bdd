"""The one place where tests touch other libraries' private names.

A test that reads another library's internals breaks when that library renames them, and then
says nothing about hookdelta. So every such read lives here, each with the reason no public
call does the job, and `tests/test_packaging.py` fails if a private name of another library
shows up in any other test file. Each accessor either works or skips the test with a message
naming what went missing, so a rename in a new release is one clear skip, never a wrong result.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.nn as nn


def _missing(what: str) -> None:
    pytest.skip(f"{what} is gone from this release: update tests/internals.py")


# -- torch.nn.Module: invariants 1 and 2 promise that hooks, slots and children are as before, and
# torch offers no public read of a module's hook dicts, its raw parameter slots or its child dict.


def forward_hooks(module: nn.Module) -> dict:
    """The module's forward hooks, in call order (torch has no public getter)."""
    return module._forward_hooks


def forward_pre_hooks(module: nn.Module) -> dict:
    """The module's forward-pre hooks, in call order."""
    return module._forward_pre_hooks


def hook_state(module: nn.Module) -> tuple:
    """Every kind of hook a module holds, as ids: what detach must leave as it found it."""
    return (
        tuple(module._forward_hooks),
        tuple(module._forward_pre_hooks),
        tuple(module._state_dict_hooks),
        tuple(module._load_state_dict_post_hooks),
        tuple(module._backward_hooks),
    )


def no_global_forward_hooks() -> bool:
    """True when no global forward (pre-)hook is registered (torch has no public getter)."""
    module = nn.modules.module
    return not module._global_forward_hooks and not module._global_forward_pre_hooks


def child_names(module: nn.Module) -> list[str]:
    """Names of the module's child slots, including slots set to None (named_children skips those)."""
    return list(module._modules)


def parameter_slot(module: nn.Module, name: str) -> Any:
    """The object stored in the module's parameter slot `name`, past any `parametrize` property."""
    return module._parameters[name]


# -- torch.compile: graph breaks and graph counts have no public counter.


def compile_stats() -> tuple[dict, int]:
    """(graph breaks by reason, unique graphs) dynamo counted since `reset_compile_stats()`."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        _missing("torch._dynamo.utils.counters")
    return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def reset_compile_stats() -> None:
    torch.compiler.reset()
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        _missing("torch._dynamo.utils.counters")
    counters.clear()


def explain(model: nn.Module, **inputs: Any) -> Any:
    """dynamo's report (graph_break_count, break_reasons) of one call of `model`."""
    fn = getattr(getattr(torch, "_dynamo", None), "explain", None)
    if fn is None:
        _missing("torch._dynamo.explain")
    return fn(model)(**inputs)


# -- transformers: generate() compiles its forward on its own only on accelerators; the switch that
# allows it on the CPU is private.


def compile_config_for_cpu() -> Any:
    """A transformers CompileConfig that generate() also honours on the CPU."""
    from transformers import CompileConfig

    config = CompileConfig()
    if not hasattr(config, "_compile_all_devices"):
        _missing("transformers CompileConfig._compile_all_devices")
    config._compile_all_devices = True
    return config


# -- peft: reference arithmetic that PEFT keeps in its layer modules only.


def _peft_internal(module: str, name: str) -> Any:
    try:
        found = importlib.import_module(module)
        getattr(found, name)
    except (ImportError, AttributeError):
        _missing(f"{module}.{name}")
    return found


def peft_boft_layer() -> Any:
    """PEFT's BOFTLayer class: its butterfly permutations and block product are the reference."""
    return _peft_internal("peft.tuners.boft.layer", "BOFTLayer").BOFTLayer


def use_plain_loha_cp(monkeypatch: pytest.MonkeyPatch, fn: Any) -> None:
    """Replace PEFT's LoHa CP-decomposition helper for one test (its einsum's rounding differs)."""
    monkeypatch.setattr(_peft_internal("peft.tuners.loha.layer", "make_weight_cp"), "make_weight_cp", fn)


def use_plain_c3a(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run PEFT's C3A through plain autograd for one test: PEFT 0.21's hand-written backward
    (BlockCircularConvolution) returns wrong *input* gradients (the kernel's are right), so every
    gradient below a C3A layer is wrong there; its forward is kept, as PEFT's own dense circulant."""
    module = _peft_internal("peft.tuners.c3a.layer", "BlockCircularConvolution")
    circulant = _peft_internal("peft.tuners.c3a.utils", "get_circulant_fast").get_circulant_fast

    class Plain:
        @staticmethod
        def apply(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x @ circulant(w).T

    monkeypatch.setattr(module, "BlockCircularConvolution", Plain)


def peft_corda() -> tuple[Any, Any]:
    """PEFT's CorDA entry points (CordaConfig, preprocess_corda): PEFT does not export them at its top
    level, its examples import them from peft.tuners.lora."""
    config = _peft_internal("peft.tuners.lora.config", "CordaConfig")
    corda = _peft_internal("peft.tuners.lora.corda", "preprocess_corda")
    return config.CordaConfig, corda.preprocess_corda


def peft_low_rank_decomposition() -> Any:
    """PEFT's LoftQ split of a residual into L = U·√S and R = √S·Vh (its LoftQ entry points run on
    CUDA or XPU only, this step runs anywhere)."""
    return _peft_internal("peft.utils.loftq_utils", "_low_rank_decomposition")._low_rank_decomposition


def torch_function_modes() -> list:
    """This thread's torch-function mode stack (torch has no public getter)."""
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


# -- PEFT's LoRA-FA optimizer computes B's projected gradient under bf16 autocast wherever bf16 is
# available (on this CPU too): a rounding of the gradient that no option turns off. To compare the
# arithmetic, its availability check (a name its module imports from accelerate) is turned off.


def peft_lorafa_in_float32(monkeypatch: Any) -> None:
    """PEFT's LoraFAOptimizer with the projection in float32 (the test's monkeypatch undoes it)."""
    module = importlib.import_module("peft.optimizers.lorafa")
    if not hasattr(module, "is_bf16_available"):
        _missing("peft.optimizers.lorafa.is_bf16_available")
    monkeypatch.setattr(module, "is_bf16_available", lambda: False)


# -- Python: a distributed test worker's exit. The interpreter's own teardown sometimes destroys a C++
# thread of torch.distributed that is still running and aborts the process ("terminate called without
# an active exception", seen twice in a row in CI after every rank had passed the final barrier), which
# would fail a run whose verdict is already on disk. os._exit is documented, despite the underscore.


def leave() -> None:
    """End a worker process now, without the interpreter's teardown (its work is done and written)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
