"""The first forward after an attach is watched once for layers whose parent uses their
weights without calling their forward (as `nn.MultiheadAttention` does with `out_proj`):
a delta's hooks never run there, so it would be a silent no-op. Such a forward raises a
`BypassError` naming the layer, its deltas and the module that read its weights, and so does every
later forward while those deltas act there. Afterwards nothing is watched, so it costs nothing.

How: for that one forward, a pre-hook on each of the model's modules marks its call's start (the
probe's pre-hooks go first, so a module's own pre-hooks count as inside it), a forward hook
appended last marks its end (after every other hook there, ours included), and a
TorchFunctionMode sees every torch function's tensor arguments: a watched weight used while no
module holding it is in a call is a bypass. A layer that does not run at all (an expert no
token was routed to) uses no weight and stays quiet.

Nothing outlives the forward: the hooks sit on this model's modules only (no global module
hooks), and the mode is this thread's. A KeyboardInterrupt runs no forward hook, always_call or
not, so the mode also checks on each call that the forward's frame is still on the stack: once
it is not, the probe removes its hooks and the mode passes everything through until the next
call of the model (or delta change) takes it off the thread's mode stack.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# tensor methods that read metadata only (shape, dtype, ...), not the values
_METADATA = frozenset(
    {
        "__get__",
        "numel",
        "dim",
        "size",
        "stride",
        "is_contiguous",
        "data_ptr",
        "element_size",
        "nelement",
        "ndimension",
        "is_floating_point",
        "is_complex",
        "storage_offset",
        "untyped_storage",
        "__len__",
        "get_device",
        "__hash__",
        "__format__",
        "__repr__",
    }
)


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)


_ours = threading.local()  # .depth > 0 while hookdelta's own hook code reads weights (see quiet())


class quiet:
    """Around hookdelta's own reads of a watched weight outside its layer's call (the weight path
    builds W + ΔW in the enclosing module's pre-hook): not a bypass."""

    def __enter__(self) -> None:
        _ours.depth = getattr(_ours, "depth", 0) + 1

    def __exit__(self, *exc: Any) -> None:
        _ours.depth -= 1


class _Watch(TorchFunctionMode):
    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        probe = self.probe
        if (
            probe.active
            and getattr(func, "__name__", "") not in _METADATA
            and threading.get_ident() == probe.thread
            and not getattr(_ours, "depth", 0)
        ):
            if probe.running():
                probe.seen(args, kwargs)
            else:  # the forward ended without its hooks (KeyboardInterrupt): stop watching now
                probe.abandon(inside_mode=True)
        return func(*args, **(kwargs or {}))


class Probe:
    """One watched forward, called from `frame`. `watch`: id(weight) -> (the weight, its layer
    path, the deltas there); holding the weights keeps their ids from being reused meanwhile."""

    def __init__(
        self, model: nn.Module, watch: dict[int, tuple[torch.Tensor, tuple[str, ...], list[str]]], frame: Any
    ) -> None:
        self.watch = watch
        self.frame = frame
        self.holders: dict[int, set[int]] = {}  # id(weight) -> ids of the modules holding it
        self.names: dict[int, str] = {}
        self.modules = [m for _, m in model.named_modules()]
        for path, module in model.named_modules():
            self.names[id(module)] = path or type(model).__name__
            for p in module._parameters.values():
                if p is not None and id(p) in watch:
                    self.holders.setdefault(id(p), set()).add(id(module))
        self.holder_modules = [
            m for m in self.modules if any(p is not None and id(p) in watch for p in m._parameters.values())
        ]
        self.root = self.names[id(model)]
        self.thread = threading.get_ident()
        self.stack: list[int] = [id(model)]  # modules whose forward is running, innermost last
        self.inside: dict[int, int] = {}  # id(watched module) -> calls of it under way
        self.found: dict[tuple[str, ...], tuple[str, list[str]]] = {}  # layers -> (reader, deltas)
        self.handles: list[Any] = []
        self.mode = _Watch(self)
        self.active = False

    def start(self) -> None:
        try:
            for m in self.modules:
                self.handles.append(m.register_forward_pre_hook(self._enter, prepend=True))
                self.handles.append(m.register_forward_hook(self._leave, always_call=True, prepend=True))
            self.handles += [m.register_forward_hook(self._done, always_call=True) for m in self.holder_modules]
            self.mode.__enter__()
            self.active = True
        except BaseException:
            self._remove()
            raise

    def running(self) -> bool:
        """Whether the watched forward is still under way: its frame is on this thread's stack."""
        f: FrameType | None = sys._getframe(2)
        target = self.frame
        while f is not None:
            if f is target:
                return True
            f = f.f_back
        return False

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pop_mode(self) -> bool:
        """Take the mode off this thread's stack if it is on top (it always is, unless someone
        pushed a mode inside the forward and was interrupted too)."""
        stack = _mode_stack()
        if not any(m is self.mode for m in stack):
            return True
        if stack[-1] is not self.mode:
            return False
        self.mode.__exit__(None, None, None)
        return True

    def abandon(self, inside_mode: bool = False) -> None:
        """The forward ended by a BaseException: drop everything, warn about nothing (it saw part
        of a forward only). Inside the mode's handler the mode is stashed off the stack and put
        back afterwards, so it is left to clean_up() (it passes everything through meanwhile)."""
        if not self.active:
            return
        self.active = False
        self._remove()
        self.frame = None
        if inside_mode or threading.get_ident() != self.thread or not self._pop_mode():
            _left_over.append(self.mode)

    def finish(self) -> list[tuple[tuple[str, ...], list[str], str]]:
        """End the watch; (layers, deltas, message) for each layer whose weights were used without
        its hooks, for the caller to refuse (see ForwardGuard.leave)."""
        self.active = False
        if not self._pop_mode():  # (a mode pushed inside the forward and left there: ours goes later)
            _left_over.append(self.mode)
        self._remove()
        self.frame = None
        found = []
        for layers, (reader, owners) in self.found.items():
            if len(layers) == 1:
                what, fix = f"the weight of {layers[0]!r} without calling its forward", f"exclude {layers[0]!r}"
            else:  # a tied weight: the reader bypassed every layer holding it
                held = " and ".join(repr(p) for p in layers)
                what, fix = f"the weight tied between {held} without calling their forward", "exclude them"
            how = (
                (
                    " (the model's forward computes from the weight itself, as the fused losses of TRL and Liger "
                    "do with the head's)"
                )
                if reader == self.root
                else ""
            )
            found.append(
                (
                    layers,
                    owners,
                    (
                        f"{reader!r} used {what}, so delta(s) {owners} on {layers[0]!r} had no effect on that use{how}. "
                        f"Refused, here and in every later forward while the delta acts there: {fix} from the targets (or "
                        "disable that delta), or adapt the module that reads the weight instead"
                    ),
                )
            )
        return found

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.active and threading.get_ident() == self.thread:
            self.stack.append(id(module))
            self.inside[id(module)] = self.inside.get(id(module), 0) + 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active and threading.get_ident() == self.thread and self.stack and self.stack[-1] == id(module):
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


# modes of abandoned probes that could not be popped where they were found (inside a torch
# function's dispatch, where the mode is stashed); they pass everything through meanwhile
_left_over: list[_Watch] = []


def _mode_stack() -> list[Any]:
    """This thread's torch-function modes, innermost last (torch has no public name for it)."""
    return torch.overrides._get_current_function_mode_stack()


def clean_up() -> None:
    """Pop this thread's modes of abandoned probes that are on top of its mode stack (called at
    the start of each forward of a model with deltas, and of each delta change)."""
    if _left_over:
        stack = _mode_stack()
        while stack and any(stack[-1] is m for m in _left_over):
            mode = stack[-1]
            mode.__exit__(None, None, None)
            _left_over.remove(mode)
            stack = _mode_stack()
