"""What hookdelta needs to know about a module, for every other part: is it a linear layer
(quantized ones included), how wide is it, which modules are the model's own (not hookdelta's
store), what a site key names. No selectors, no hooks: the bottom layer above errors."""

from __future__ import annotations

from typing import Any, TypeAlias

import torch.nn as nn

from .errors import UnsupportedModuleError
from .quantized import is_quantized

STORE_NAME = "_hookdelta"  # the reserved child that holds a model's deltas

# A layer of the model, of any class. hookdelta reads what each kind defines (a conv's `groups`,
# an embedding's `padding_idx`, a quantized layer's state); `nn.Module`'s typing would give every
# such attribute as `Tensor | Module`, so where those are read the layer is typed by this name.
Layer: TypeAlias = Any


def host(model: Any) -> Any:
    """The module a model's deltas live in: the model itself, or for a sentence-transformers
    SentenceTransformer (an nn.Sequential of its Transformer module, pooling, normalization)
    the transformers model inside it, so the container stays untouched."""
    if isinstance(model, nn.Sequential) and len(model) and isinstance(getattr(model[0], "auto_model", None), nn.Module):
        return model[0].auto_model
    return model


def is_internal(path: str) -> bool:
    """True for paths inside hookdelta's own store; selection never sees those."""
    return STORE_NAME in path.split(".")


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (module path, module, name) holding it, outside hookdelta's store:
    tied weights have several. One scan of the model (a scan per site would be quadratic)."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules():
        if not is_internal(path):
            for name, param in module._parameters.items():
                if param is not None:
                    holders.setdefault(id(param), []).append((path, module, name))
    return holders


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes and torchao layers included), transformers Conv1D, and other
    quantized linear layers (HQQ) that say their in_features / out_features."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and is_quantized(module)
    )


def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden width from its config (hidden_size / d_model / n_embd / dim), if any."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def layer_dims(model: nn.Module, module: Layer, path: str) -> tuple[int, int]:
    """(input width, output width) of a layer: from its weight when it is linear, from its
    first and last linear layers for a block (an MLP), else the model's hidden size."""
    if isinstance(module, nn.Linear) or is_linear_like(module) and not is_conv1d(module):
        return module.in_features, module.out_features  # the logical shape, never a packed one
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    inner = [m for m in module.modules() if m is not module and is_linear_like(m)]
    if inner and (
        any(n.rpartition(".")[2] == "experts" for n, _ in module.named_modules())
        or any(p.dim() == 3 for p in module.parameters())
    ):
        # a mixture-of-experts block writes what it reads (its last linear layer may be a shared
        # expert's scalar gate or an expert's input projection): its first one reads the width
        first = layer_dims(model, inner[0], path)[0]
        return first, first
    if inner:  # a block (an MLP): what its first linear layer reads and its last one writes
        return layer_dims(model, inner[0], path)[0], layer_dims(model, inner[-1], path)[1]
    width = hidden_size(model)
    if width is None:
        raise UnsupportedModuleError(
            f"cannot tell the width of {path!r} ({type(module).__name__}): it is not a linear layer and "
            "the model has no config.hidden_size; target its linear layers instead"
        )
    return width, width


def block_index(path: str) -> int | None:
    """The index of the repeated block a path lies in: its first integer component."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module of the model except the root and hookdelta's own store."""
    return [(n, m) for n, m in model.named_modules() if n and not is_internal(n)]


def exists(model: nn.Module, path: str) -> bool:
    """Whether `path` names a module, or a parameter of a module, of the model."""
    try:
        resolve_site(model, path)
        return True
    except UnsupportedModuleError:
        return False


def resolve_site(model: nn.Module, key: str) -> tuple[nn.Module, str | None]:
    """A site key names a module (its path) or one of its parameters (module path + '.' + name):
    (module, None) or (owner module, parameter name)."""
    try:
        return model.get_submodule(key), None
    except AttributeError:
        owner, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            module = None
        if module is None or name not in module._parameters:
            raise UnsupportedModuleError(f"{key!r} is neither a module nor a parameter of the model") from None
        return module, name


def module_path(model: nn.Module, key: str) -> str:
    """The module a site key belongs to: the key itself, or a parameter key's owner."""
    return key if resolve_site(model, key)[1] is None else key.rpartition(".")[0]


def linear_layer(model: nn.Module, key: str, method: str, what: str) -> nn.Module:
    """The linear layer at `key` (nn.Linear, Conv1D, quantized linear), or an
    UnsupportedModuleError saying that `method` `what` (e.g. "rotates the input of") such layers."""
    module = model.get_submodule(key)
    if not is_linear_like(module):
        raise UnsupportedModuleError(
            f"{method} {what} linear layers; {key!r} is a {type(module).__name__}. Narrow the targets."
        )
    return module
