"""The first forward after an attach is watched once for layers whose parent uses their
weights without calling their forward (as `nn.MultiheadAttention` does with `out_proj`):
a delta's hooks never run there, so it would be a silent no-op. Each such layer gets one
`BypassWarning` naming it and the module that read its weights. Afterwards nothing is
watched, so it costs nothing.

How: for that one forward, a global pre-hook marks each module whose call starts (global hooks
run before a module's own, so its pre-hooks count as inside it), a forward hook appended last
on each watched layer marks its call's end (after every other hook there, ours included), and
a TorchFunctionMode sees every torch function's tensor arguments: a watched weight used while
no module holding it is in a call is a bypass. A layer that does not run at all (an expert no
token was routed to) uses no weight and stays quiet.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .errors import BypassWarning

# tensor methods that read metadata only (shape, dtype, ...), not the values
_METADATA = frozenset({"__get__", "numel", "dim", "size", "stride", "is_contiguous", "data_ptr", "element_size",
                       "nelement", "ndimension", "is_floating_point", "is_complex", "storage_offset",
                       "untyped_storage", "__len__", "get_device", "__hash__", "__format__", "__repr__"})


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)


class _Watch(TorchFunctionMode):
    def __init__(self, probe: "Probe") -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") not in _METADATA:
            self.probe.seen(args, kwargs)
        return func(*args, **(kwargs or {}))


class Probe:
    """One watched forward. `watch`: id(weight) -> (the weight, its layer path, the deltas there);
    holding the weights keeps their ids from being reused by other tensors meanwhile."""

    def __init__(self, model: nn.Module, watch: dict[int, tuple[torch.Tensor, str, list[str]]]) -> None:
        self.watch = watch
        self.holders: dict[int, set[int]] = {}  # id(weight) -> ids of the modules holding it
        self.names: dict[int, str] = {}
        for path, module in model.named_modules():
            self.names[id(module)] = path or type(model).__name__
            for p in module._parameters.values():
                if p is not None and id(p) in watch:
                    self.holders.setdefault(id(p), set()).add(id(module))
        self.holder_modules = [m for m in model.modules()
                               if any(p is not None and id(p) in watch for p in m._parameters.values())]
        self.thread = threading.get_ident()
        self.stack: list[int] = [id(model)]  # modules whose forward is running, innermost last
        self.inside: dict[int, int] = {}  # id(watched module) -> calls of it under way
        self.found: dict[str, tuple[str, list[str]]] = {}  # layer -> (reader, deltas)
        self.handles: list[Any] = []
        self.mode = _Watch(self)

    def start(self) -> None:
        self.handles = [nn.modules.module.register_module_forward_pre_hook(self._enter),
                        nn.modules.module.register_module_forward_hook(self._leave, always_call=True)]
        self.handles += [m.register_forward_hook(self._done, always_call=True) for m in self.holder_modules]
        self.mode.__enter__()

    def finish(self) -> None:
        self.mode.__exit__(None, None, None)
        for handle in self.handles:
            handle.remove()
        for layer, (reader, owners) in self.found.items():
            warnings.warn(
                f"{reader!r} used the weights of {layer!r} without calling its forward, so the hooks of "
                f"delta(s) {owners} there never ran: they have no effect on this model. Exclude {layer!r} from "
                "the targets, or adapt the module that reads the weights instead", BypassWarning, stacklevel=4)

    def _enter(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() == self.thread:
            self.stack.append(id(module))
            self.inside[id(module)] = self.inside.get(id(module), 0) + 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self.thread and self.stack and self.stack[-1] == id(module):
            self.stack.pop()  # (the module's own forward hooks still run: see _done)

    def _done(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self.thread and self.inside.get(id(module)):
            self.inside[id(module)] -= 1

    def seen(self, args: tuple, kwargs: dict | None) -> None:
        if threading.get_ident() != self.thread:
            return
        for t in _tensors((args, kwargs)):
            entry = self.watch.get(id(t))
            if entry is None or any(self.inside.get(h) for h in self.holders.get(id(t), ())):
                continue
            reader = self.names.get(self.stack[-1], "?") if self.stack else "the caller"
            self.found.setdefault(entry[1], (reader, entry[2]))
