"""Quantized layers: what a delta needs to know about them, and nothing more.

A delta's forward needs no per-backend code: it sees the layer's input and output and reads
the layer's logical shape (`in_features` / `out_features`); its tensors take the dtype of the
model's activations. Only three
things look inside the packed storage, each in a few lines per backend:

- `dequantize(module)`: the float weight [out, in] (DoRA's norm, merge, a full-precision copy);
- `requantize(module, weight)`: a new quantized weight of the same kind, for
  `merge(requantize=True)`; the original stays untouched so unmerge puts it back exactly;
- `full_precision(module, dtype)`: a plain `nn.Linear` in its place, for `merged_copy()`.

Backends: bitsandbytes 4-bit (`Linear4bit`, nf4/fp4) and 8-bit (`Linear8bitLt`), torchao
tensor subclasses (`quantize_(model, Int8WeightOnlyConfig())`), HQQ (`HQQLinear`); any
other weight with a `dequantize()` method reads and copies too.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .compat import bnb_cpu_unpack
from .errors import MergeError, UnsupportedModuleError
from .sharding import is_dtensor

if TYPE_CHECKING:
    from .modules import Layer  # (modules imports this module)


def quantized_weight(module: Layer) -> Any:
    """The module's quantized weight (bitsandbytes / torchao / HQQ packed storage), or None
    when its weight is a plain floating-point tensor (or it has none)."""
    if type(module).__name__ == "HQQLinear":
        return module.W_q
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if (type(weight) in (torch.Tensor, nn.Parameter) or is_dtensor(weight)) and weight.is_floating_point():
        return None  # (a DTensor of FSDP2 or tensor parallelism is a sharded float weight)
    return weight


def is_quantized(module: Layer) -> bool:
    return quantized_weight(module) is not None


def backend(module: Layer) -> str:
    """A short name for the error messages: 'bitsandbytes Params4bit', 'torchao Int8Tensor', ..."""
    weight = quantized_weight(module)
    kind = type(module) if type(module).__name__ == "HQQLinear" else type(weight)
    return f"{kind.__module__.split('.')[0]} {kind.__name__}" if weight is not None else "not quantized"


def dequantize(module: Layer) -> torch.Tensor:
    """The layer's weight as a float tensor [out, in] (one layer at a time: transient)."""
    weight = quantized_weight(module)
    name = type(weight).__name__
    if type(module).__name__ == "HQQLinear":
        return module.dequantize()
    if name == "Params4bit":
        import bitsandbytes as bnb

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # CPU inference layout: read a canonical copy
            data, state = canonical_4bit(data, state)
        return bnb.functional.dequantize_4bit(data, state)
    if name == "Int8Params":
        import bitsandbytes as bnb

        scb = weight.SCB if weight.SCB is not None else module.state.SCB  # bnb moves it to the state at first use
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    if callable(getattr(weight, "dequantize", None)):  # torchao tensor subclasses, torch quantized tensors
        return weight.dequantize()
    raise UnsupportedModuleError(
        f"cannot read the values of {backend(module)} weights; this quantization is unknown to hookdelta"
    )


def requantize(module: Layer, weight: torch.Tensor) -> dict[str, Any]:
    """Quantize `weight` the way the module's weight is quantized; returns what to install
    (see `install` / `swap_state`). Refuses (MergeError) backends it cannot rebuild."""
    old = quantized_weight(module)
    name = type(old).__name__
    if name == "Params4bit":
        import bitsandbytes as bnb

        state = old.quant_state
        new = bnb.nn.Params4bit(  # type: ignore[misc]  # (bitsandbytes' annotation of .to() is off)
            weight.to(old.device, torch.float32).contiguous(),
            requires_grad=False,
            quant_type=state.quant_type,
            blocksize=state.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
            module=module,
        ).to(old.device)
        return {"weight": new}
    if name == "Int8Params":
        import bitsandbytes as bnb

        new8 = bnb.nn.Int8Params(  # type: ignore[misc]  # (likewise)
            weight.to(torch.float16).contiguous(), requires_grad=False, has_fp16_weights=False
        ).to(old.device)
        return {"weight": new8, "state.CB": None, "state.SCB": None}  # bnb fills the state from it at first use
    if name == "Int8Tensor":
        from torchao.quantization.granularity import PerRow, PerTensor

        block = list(old.block_size)
        granularity = PerTensor() if block == list(old.shape) else PerRow() if block == [1, old.shape[-1]] else None
        if granularity is not None:
            new = type(old).from_hp(weight.to(old.dtype), granularity)
            return {"weight": nn.Parameter(new, requires_grad=False)}
    hint = (
        " (torchao 0.18 and later store int8 weights as Int8Tensor, which it can rebuild)"
        if name == "AffineQuantizedTensor"
        else ""
    )
    raise MergeError(
        f"merge(requantize=True) cannot rebuild {backend(module)} weights{hint}; keep the delta unmerged, "
        "or use delta.merged_copy(dtype=...) for a full-precision model with the delta baked in"
    )


# -- bitsandbytes' CPU inference packing --------------------------------------------------------
# bitsandbytes (0.50) repacks a 4-bit weight for AVX512-BF16 inference at the first eval forward
# without gradients: the block scales are rounded to bf16 and transposed, and from then on the
# layer computes with a kernel autograd cannot see through, so a delta below it silently gets no
# gradient, even in later training forwards. While deltas are attached, hookdelta turns that
# repacking off (and back on when the last delta goes); a layer packed before the attach is
# brought back to the standard layout, with the same values, when gradients are wanted.


def bnb_4bit_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m._parameters.get("weight")).__name__ == "Params4bit"]


def hold_packing(layers: list[Layer]) -> list[tuple[Layer, Any]]:
    """Turn bitsandbytes' CPU repacking off on these layers; returns what to give back."""
    saved = [
        (m, m.__dict__.get("support_avx512bf16_for_cpu")) for m in layers if "support_avx512bf16_for_cpu" in m.__dict__
    ]
    for m, _ in saved:
        m.support_avx512bf16_for_cpu = False
    return saved


def release_packing(saved: list[tuple[Layer, Any]]) -> None:
    for m, value in saved:
        m.support_avx512bf16_for_cpu = value


def unpack_for_training(layers: list[Layer]) -> None:
    """Bring packed layers back to the standard layout before a forward that needs gradients."""
    for layer in layers:
        weight = layer.weight  # (a bitsandbytes Params4bit)
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = canonical_4bit(weight.data, weight.quant_state)


def canonical_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """The standard-layout (data, quant_state) of a CPU-packed 4-bit weight, with the same
    values (the bf16 block scales as they are); the inputs are not changed. (bitsandbytes'
    own inverse leaves the scales transposed when there is no double quantization.)"""
    scales = state.absmax  # [K / blocksize, N] in bf16
    flat = copy.copy(state)
    flat.original_nested = False  # keep the scales as they are: no re-quantization of them
    qweight, flat = bnb_cpu_unpack()(data, flat)
    flat.absmax = scales.T.reshape(-1).float()
    flat.nested = False
    return qweight, flat


def swap_state(module: Layer, values: dict[str, Any]) -> dict[str, Any]:
    """Install `values` ("weight", "state.CB", ...) on the module; returns the ones it replaced."""
    old: dict[str, Any] = {}
    for key, value in values.items():
        if key == "weight":
            old[key] = module._parameters["weight"]
            module._parameters["weight"] = value
        else:
            owner, _, attr = key.partition(".")
            holder = getattr(module, owner)
            old[key] = getattr(holder, attr)
            setattr(holder, attr, value)
    return old


def full_precision(module: Layer, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear with the layer's dequantized weight (and bias), in `dtype`."""
    weight = dequantize(module)
    bias = module._parameters.get("bias") if type(module).__name__ != "HQQLinear" else getattr(module, "bias", None)
    layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(module.out_features, module.in_features))
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every quantized linear layer of `model` by a plain nn.Linear in `dtype`, cast the
    other parameters to `dtype`, and drop the quantization bookkeeping transformers keeps (in place)."""
    for path, module in list(model.named_modules()):
        if path and is_quantized(module):
            owner, _, child = path.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, child, full_precision(module, dtype))
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):  # (transformers refuses .to(dtype)
        if attr in model.__dict__:  # while they are there)
            delattr(model, attr)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if config is not None:  # (transformers 4.x keeps this dtype beside the quantization config and
        config.__dict__.pop("_pre_quantization_dtype", None)  # cannot write it without that)
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in model.__dict__:
            setattr(model, flag, False)
    with torch.no_grad():  # parameters only: buffers such as RoPE's inv_freq keep their precision, as
        for param in model.parameters():  # from_pretrained(dtype=...) leaves them
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model
