"""Where a module's weights really are, and how merge() may write them.

A layer's `weight` is usually a plain `nn.Parameter` in `module._parameters`. Models built
and loaded the way people do it break that in three ways this module knows about:

- accelerate offloading (`cpu_offload`, `disk_offload`, a `device_map` with offloaded parts):
  the parameter stays on `meta` and an `AlignDevicesHook` copies the real tensor in from its
  `weights_map` for each call (on the hooked module or an ancestor with `place_submodules`);
- meta initialisation without such a hook (`init_empty_weights`, `device="meta"`): there is
  no real tensor anywhere yet;
- `torch.nn.utils.parametrize`: `weight` is a property computing `P(original)`.

`real_weight` reads the true values wherever they are; `execution_device` says where the
layer computes; `WeightSlot` is what merge() writes through, refusing with a `MergeError`
wherever an exact write is impossible.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .errors import MergeError, UnsupportedModuleError
from .modules import Layer
from .quantized import backend, dequantize, is_quantized, quantized_weight, requantize, swap_state
from .sharding import like

# inside dry_run(): meta tensors are taken as they are (a delta is built on a meta copy of the
# model to learn its shapes and size before anything is allocated: persistence.dry_build)
_DRY = contextvars.ContextVar("hookdelta_dry_run", default=False)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    token = _DRY.set(True)
    try:
        yield
    finally:
        _DRY.reset(token)


def _offload_hooks(module: nn.Module) -> list[Any]:
    """accelerate's AlignDevicesHook(s) on a module (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return [h for h in getattr(hook, "hooks", [hook]) if hasattr(h, "execution_device")]


def _chain(model: nn.Module, path: str) -> list[tuple[nn.Module, str]]:
    """(ancestor, path of the target relative to it) from the root down to the target itself."""
    parts = path.split(".") if path else []
    module: Layer = model
    out = [(module, path)]
    for i, part in enumerate(parts):
        module = module._modules[part]
        out.append((module, ".".join(parts[i + 1 :])))
    return out


def offload_source(model: nn.Module, path: str) -> tuple[Any, str] | None:
    """(hook, key prefix) when accelerate keeps the module's weights in a weights_map and
    copies them in per call; None when they live in the module itself."""
    for ancestor, rel in reversed(_chain(model, path)):
        for hook in _offload_hooks(ancestor):
            if (
                getattr(hook, "offload", False)
                and getattr(hook, "weights_map", None) is not None
                and (not rel or getattr(hook, "place_submodules", False))
            ):
                return hook, rel
    return None


def execution_device(model: nn.Module, path: str, fallback: torch.device) -> torch.device:
    """The device the module computes on: accelerate's hook says so where there is one."""
    for ancestor, _ in reversed(_chain(model, path)):
        for hook in _offload_hooks(ancestor):
            if hook.execution_device is not None:
                device = hook.execution_device
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return fallback


def is_offloaded(tensor: torch.Tensor | None) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_meta


def real_weight(model: nn.Module, path: str, name: str = "weight") -> torch.Tensor:
    """The true values of `path`'s tensor `name`, on the device the module computes on.

    Reads through accelerate's weights_map for offloaded modules and through a
    parametrization's property; refuses (UnsupportedModuleError) a meta tensor that has no
    real values anywhere (a model built on meta whose weights were never loaded)."""
    module = model.get_submodule(path) if path else model
    if name == "weight" and is_quantized(module):
        return dequantize(module)
    value = getattr(module, name)
    if not (isinstance(value, torch.Tensor) and value.is_meta) or _DRY.get():
        return value
    source = offload_source(model, path)
    if source is None:
        raise UnsupportedModuleError(meta_message(path))
    hook, rel = source
    stored = hook.weights_map[f"{rel}.{name}" if rel else name]
    return stored.to(execution_device(model, path, stored.device))


def meta_message(path: str) -> str:
    return (
        f"the weights of {path or 'the model'!r} are on the meta device with no real values anywhere "
        "(a model built with init_empty_weights() or device='meta' whose weights were never loaded). "
        "Load the weights first (load_checkpoint_and_dispatch, or to_empty() + load_state_dict(), or "
        "from_pretrained), then attach: a delta made on meta could never be initialised or trained"
    )


def like_tensor(model: nn.Module, path: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor with the dtype of `tensor` and the device the module computes on, for
    creating a delta's own tensors next to a (possibly offloaded) weight."""
    if not tensor.is_meta or _DRY.get():
        return tensor
    if offload_source(model, path) is None:
        raise UnsupportedModuleError(meta_message(path))
    device = execution_device(model, path, torch.device("cpu"))
    return torch.empty(0, dtype=tensor.dtype, device=device)


def layer_like(model: nn.Module, path: str, module: nn.Module) -> torch.Tensor:
    """An empty tensor with the dtype and device a delta on this layer computes in: its weight's,
    or for a quantized layer the dtype of the model's activations, which its input and output
    are in (never the packed storage's: bitsandbytes computes in bnb_4bit_compute_dtype inside
    the layer and hands back the input's dtype)."""
    weight = quantized_weight(module)
    if weight is not None:
        return like_tensor(model, path, torch.empty(0, dtype=float_dtype(model), device=weight.device))
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        weight = next(p for p in list(module.parameters()) + list(model.parameters()) if p.is_floating_point())
    return like_tensor(model, path, weight)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's floating-point parameters have."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.get_default_dtype()


# -- writing for merge() -------------------------------------------------------------------


def is_parametrized(module: nn.Module, name: str) -> bool:
    plist = getattr(module, "parametrizations", None)
    return plist is not None and name in plist


def kept_name(name: str, index: int = 0) -> str:
    """The buffer that keeps a merged tensor's original (":" cannot be in a parameter name)."""
    return f"_original_{name}" + (f":{index}" if index else "")


def kept_names(owner: nn.Module) -> list[str]:
    """The tensor names whose originals `owner` keeps (copies, or replaced quantized weights)."""
    names = [b[len("_original_") :].split(":")[0] for b in owner._buffers if b.startswith("_original_")]
    return list(dict.fromkeys(names + list(owner.__dict__.get("_requantized", {}))))


def open_slot(module: nn.Module, name: str, where: str, requantize: bool = False) -> WeightSlot | QuantizedSlot:
    """The slot merge() writes `module.name` through: a quantized weight only with requantize."""
    if name == "weight" and is_quantized(module):
        if not requantize:
            raise MergeError(
                f"{where}.weight is quantized ({backend(module)}), so merging into it would round the result to "
                "the quantization grid: lossy. merge(requantize=True) dequantizes, adds and requantizes (it reports "
                "the change and unmerge() puts the original bytes back exactly); delta.merged_copy(dtype=torch."
                "bfloat16) gives a full-precision model with the delta baked in; or keep the delta unmerged"
            )
        return QuantizedSlot(module, where)
    return WeightSlot(module, name, where)


class QuantizedSlot:
    """A quantized weight merge(requantize=True) writes: the merged float weight is quantized
    the same way into a new weight that takes the old one's place; the old weight (and the
    backend's state) is kept untouched on the piece, so unmerge puts the exact bytes back."""

    name = "weight"
    needs_copy = True

    def __init__(self, module: nn.Module, where: str) -> None:
        self.module, self.where = module, where
        if quantized_weight(module).is_meta:
            raise MergeError(f"{where}.weight is offloaded; keep the delta unmerged")

    def value(self) -> torch.Tensor:
        return dequantize(self.module)

    def keep(self, owner: nn.Module) -> None:
        pass  # write() keeps what it replaces

    def add_(self, delta: torch.Tensor) -> None:
        self.write(self.value().float() + delta.float().to(self.value().device))

    def write(self, new: torch.Tensor, owner: nn.Module | None = None) -> None:
        values = requantize(self.module, new)
        replaced = swap_state(self.module, values)
        if owner is not None:
            owner.__dict__.setdefault("_requantized", {})["weight"] = replaced
            err = (self.value().float() - new.float()).abs().sum(dim=-1).max()  # max row sum: per unit input
            owner.__dict__.setdefault("_requantize_error", {})[self.where] = float(err)

    def restore(self, owner: nn.Module) -> bool:
        replaced = owner.__dict__.get("_requantized", {}).pop("weight", None)
        if replaced is None:
            return False
        swap_state(self.module, replaced)
        owner.__dict__.get("_requantize_error", {}).pop(self.where, None)
        return True


class WeightSlot:
    """One tensor merge() writes, in place, with a kept copy for exact unmerge.

    A plain parameter is written directly. A parametrized one (`torch.nn.utils.parametrize`)
    is written through its `right_inverse` into `original`, and only when the
    parametrization then reproduces the merged value (weight_norm does; an orthogonal or
    spectral-norm constraint does not): otherwise MergeError. An offloaded (meta) tensor or a
    computed attribute that is no parameter cannot be written: MergeError."""

    def __init__(self, module: Layer, name: str, where: str) -> None:
        self.module, self.name, self.where = module, name, where
        self.param = module._parameters.get(name)
        self.needs_copy = self.param is None  # parametrized: only the kept tensors undo a merge exactly
        if self.param is None and not is_parametrized(module, name):
            raise MergeError(
                f"{where}.{name} is not a parameter of its own (it is computed, e.g. by an old-style "
                "weight_norm hook), so a delta cannot be merged into it; keep the delta unmerged"
            )
        stored = self.stored()
        if any(t.is_meta for t in stored):
            raise MergeError(
                f"{where}.{name} is offloaded (accelerate keeps it on meta and copies it in per call), so "
                "merging cannot write it in place; keep the delta unmerged, or load the model without "
                "offloading to merge"
            )

    def stored(self) -> list[torch.Tensor]:
        """The tensors that hold the value: the parameter, or every tensor of the
        parametrization (its originals, and state such as orthogonal's base)."""
        if self.param is not None:
            return [self.param]
        plist = self.module.parametrizations[self.name]
        return list(plist.parameters()) + list(plist.buffers())

    def value(self) -> torch.Tensor:
        return self.param if self.param is not None else getattr(self.module, self.name)

    def keep(self, owner: nn.Module) -> None:
        """Keep copies of the stored tensors on `owner` (buffers: they follow .to() and deepcopy)."""
        for i, t in enumerate(self.stored()):
            owner.register_buffer(kept_name(self.name, i), t.detach().clone(), persistent=False)

    def restore(self, owner: nn.Module) -> bool:
        """Copy the kept tensors back (bit-exact); False when none were kept."""
        found = False
        for i, t in enumerate(self.stored()):
            original = owner._buffers.pop(kept_name(self.name, i), None)
            if original is not None:
                with torch.inference_mode(t.is_inference()), torch.no_grad():
                    t.copy_(original)
                found = True
        return found

    def add_(self, delta: torch.Tensor) -> None:
        """value += delta, rounded once (plain parameters; parametrized ones go through write)."""
        if self.param is None:
            self.write(self.value().detach().float() + delta.float())
            return
        with torch.inference_mode(self.param.is_inference()), torch.no_grad():
            self.param.add_(like(delta.to(self.param.device), self.param))

    def write(self, new: torch.Tensor, owner: nn.Module | None = None) -> None:
        """value := new, in place (same tensors, same addresses)."""
        if self.param is not None:
            with torch.inference_mode(self.param.is_inference()), torch.no_grad():
                self.param.copy_(new.to(self.param.device, self.param.dtype))
            return
        # run the parametrization's right_inverse on a copy (it may set state of its own), check the
        # copy reproduces the merged weight, then copy its tensors into the real ones in place
        trial = copy.deepcopy(self.module.parametrizations[self.name])
        try:
            with torch.no_grad():
                trial.right_inverse(new.to(self.stored()[0].device, self.value().dtype))
                check = trial()
        except Exception as exc:  # no right_inverse, or one that refuses the value
            raise MergeError(
                f"the parametrization on {self.where}.{self.name} cannot take the merged weight "
                f"({exc}); keep the delta unmerged"
            ) from exc
        values = list(trial.parameters()) + list(trial.buffers())
        stored = self.stored()
        if not _close(check, new, self.value().dtype) or any(
            v.shape != s.shape for v, s in zip(values, stored, strict=True)
        ):
            raise MergeError(
                f"{self.where}.{self.name} is parametrized by "
                f"{[type(p).__name__ for p in self.module.parametrizations[self.name]]}, which cannot represent the "
                "merged weight (the constraint would change it); keep the delta unmerged"
            )
        with torch.no_grad():
            for s, v in zip(stored, values, strict=True):
                s.copy_(v)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    a, b = a.detach().float(), b.detach().float().to(a.device)
    if a.shape != b.shape:
        return False
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


# -- modules whose weights an ancestor uses without calling them ------------------------------

# modules that read their children's weights only where no hook is present (torch checks for
# hooks before its fused fast path), so a hook on the child does run
_HOOK_AWARE = {"TransformerEncoderLayer", "TransformerDecoderLayer"}
_METADATA = r"\s*\.\s*(?:dtype|device|shape|size|ndim|dim\(|is_\w+|requires_grad|data_ptr|numel|element_size|data\b)"
_READ = re.compile(rf"self\.([A-Za-z_][\w.]*?)\.(?:weight|bias)\b(?!{_METADATA})(?!\s*=[^=])")
_NOT_FORWARD = ("init", "reset", "fuse", "load", "tie", "prune", "resize", "convert", "set_")  # set-up methods
_TYPE_CHECK = re.compile(r"isinstance\(\s*self\.[\w.]+")  # isinstance(self.wo.weight, ...) reads no values
# parents that always read these children's weights themselves (torch's functional attention)
ALWAYS: dict[type, frozenset[str]] = {nn.MultiheadAttention: frozenset({"out_proj"})}


def _sources(cls: type) -> Iterator[str]:
    """The source of the class's own methods other than set-up ones (init, load, tie, ...)."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch.nn.modules.module"):
            continue
        for name, fn in vars(klass).items():
            if not callable(fn) or any(word in name for word in _NOT_FORWARD):
                continue
            try:
                yield inspect.getsource(fn)
            except (OSError, TypeError):
                continue


@functools.cache
def children_called(cls: type) -> frozenset[str]:
    """Sub-module paths the class's code calls by name (`self.out_proj(x)`)."""
    return frozenset(m for source in _sources(cls) for m in re.findall(r"self\.([A-Za-z_][\w.]*?)\s*\(", source))


@functools.cache
def weights_read(cls: type) -> frozenset[str]:
    """Sub-module paths whose `.weight` / `.bias` the class's own code passes to computations
    (`F.linear(x, self.proj.weight)`, `multi_head_attention_forward(..., self.out_proj.weight)`),
    found in the source of its methods other than initialisation; metadata reads (dtype,
    shape, ...) and assignments do not count."""
    if cls.__name__ in _HOOK_AWARE:
        return frozenset()
    return frozenset(m for source in _sources(cls) for m in _READ.findall(_TYPE_CHECK.sub("", source)))


def bypassing_parent(model: nn.Module, path: str) -> tuple[str, str, bool] | None:
    """(ancestor path, path from it, always) when an ancestor's code uses the module's weights
    directly (nn.MultiheadAttention and out_proj, WavLM's attention, DETR's mask head), so
    hooks on the module itself would not see those uses; the nearest such ancestor. `always`:
    the ancestor never calls the module (as opposed to code that may, in some branch)."""
    if not path:
        return None
    parts = path.split(".")
    module: Layer = model
    chain = [("", module)]
    for i, part in enumerate(parts[:-1]):
        module = module._modules[part]
        chain.append((".".join(parts[: i + 1]), module))
    for owner, ancestor in reversed(chain):
        rel = path[len(owner) + 1 :] if owner else path
        if rel in weights_read(type(ancestor)):  # type: ignore[arg-type]  # (mypy: a class is not Hashable)
            # always: torch's functional attention, or code that reads the weight and never calls the layer
            always = any(isinstance(ancestor, k) and rel in v for k, v in ALWAYS.items())
            return owner, rel, always or rel not in children_called(type(ancestor))  # type: ignore[arg-type]  # (mypy: a class is not Hashable)
    return None


def live_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A module's tensor as a hook of that module can use it: the tensor itself, for a quantized
    layer its dequantized weight (transient), or for a module accelerate offloads (meta outside
    its call, as in its own hooks), the real one."""
    if name == "weight" and is_quantized(module):
        return dequantize(module)
    value = getattr(module, name)
    if not value.is_meta or _DRY.get():
        return value
    for hook in _offload_hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            device = hook.execution_device
            device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
            return hook.weights_map[name].to(device)
    raise UnsupportedModuleError(meta_message(""))
