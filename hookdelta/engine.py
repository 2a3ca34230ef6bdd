"""The hook engine: the only code in hookdelta that registers or removes hooks.

It knows nothing about delta methods. A method hands it `Piece`s (one per site); the
engine keeps one `Site` dispatcher per hooked module that runs that site's live pieces in
attach order from at most one forward-pre hook and one forward hook, and takes those
hooks off entirely when no piece there is live (merged or disabled deltas cost nothing).

All of a model's deltas live in one reserved child module, the `DeltaStore`, so they move
with `model.to()`, follow `train()/eval()`, appear in `model.parameters()` and survive
`copy.deepcopy`, while state-dict hooks keep them out of the model's own `state_dict()`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import DeltaStateError, MergeError
from .selection import STORE_NAME, is_internal


class Piece(nn.Module):
    """One delta's part at one module. A method overrides only the hooks it needs.

    - `pre_forward` may rewrite the module's inputs;
    - `post_forward` may rewrite its output (never in place);
    - `swap` returns a stand-in for each parameter named in `swaps`, used for one call;
    - `delta_weights` returns additive fp32 deltas of the module's parameters for merge().
    """

    swaps: tuple[str, ...] = ()
    mergeable: bool = True
    additive: bool = False  # only adds a term that depends on the layer's input (commutes with its kind)
    reads_weight: bool = False  # its output depends on the host's weight (so a merge below it changes it)
    exact_unmerge_needs_copy: bool = False  # True where subtracting the delta cannot undo a merge

    def __init__(self, site_path: str, key: str | None = None) -> None:
        super().__init__()
        self.site_path = site_path  # the module the hooks go on
        self.key = key or site_path  # unique within the delta; prefixes its saved tensors
        self.live = False  # set by the delta: enabled and not merged

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Additive deltas of the module's parameters, in float32, for merge()."""
        return {}

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters' new values after merge() (any float dtype; rounded once on write)."""
        return {n: module._parameters[n].detach().float() + d.to(module._parameters[n].device, torch.float32)
                for n, d in self.delta_weights(module).items()}

    def delta_from_merged(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """delta_weights for pieces that define merged_weights (multiplicative ones: IA3, DoRA)."""
        return {n: v - module._parameters[n].detach().float() for n, v in self.merged_weights(module).items()}

    def describe(self) -> str:
        """A few words for the tree printer (e.g. the layer kind)."""
        return ""

    def set_live(self, live: bool) -> None:
        object.__setattr__(self, "live", live)  # skips nn.Module.__setattr__: switching is hot

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Piece, name)


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module's main input, whether it was passed positionally or by keyword."""
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def map_output(output: Any, fn: Any) -> Any:
    """Apply `fn` to the main tensor of a module output: a tensor, tuple, dict or ModelOutput."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output:
        return (map_output(output[0], fn),) + tuple(output[1:])
    if isinstance(output, list) and output:
        return [map_output(output[0], fn)] + list(output[1:])
    if isinstance(output, dict) and output:
        out = output.copy()  # ModelOutput.copy() keeps its class
        key = next(iter(out))
        out[key] = map_output(out[key], fn)
        return out
    return output


class Site:
    """The dispatcher for one hooked module: one pre-hook and one post-hook for all its pieces."""

    def __init__(self, module: nn.Module, path: str) -> None:
        self.module = module
        self.path = path
        self.pieces: list[Piece] = []  # attach order
        self.merged: list[tuple[Piece, bool]] = []  # (piece, kept original) in merge order
        self.handles: list[Any] = []
        self.hooked = (False, False, False)  # (pre hook, post hook, post hook always called)
        self.pre_pieces: tuple[Piece, ...] = ()
        self.post_pieces: tuple[Piece, ...] = ()
        self.swap_pieces: tuple[Piece, ...] = ()
        self.swapped: list[dict[str, Any]] = []  # stack: nested or re-entrant calls
        # swapping writes the module's parameter dict for the length of one call, so calls of
        # this module from several threads take turns (only at sites with swap pieces)
        self.swap_lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a fresh lock, not the held one
        return {k: v for k, v in self.__dict__.items() if k != "swap_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, swap_lock=threading.RLock())

    # -- hook lifecycle ------------------------------------------------------------------

    def refresh(self) -> None:
        """Install exactly the hooks the live pieces need, or none at all. Handles that are
        already the right ones stay (switching deltas at a layer only swaps the piece lists)."""
        live = [p for p in self.pieces if p.live]
        self.pre_pieces = tuple(p for p in live if p._overrides("pre_forward"))
        self.post_pieces = tuple(p for p in live if p._overrides("post_forward"))
        self.swap_pieces = tuple(p for p in live if p.swaps)
        wanted = (bool(self.pre_pieces or self.swap_pieces), bool(self.post_pieces or self.swap_pieces),
                  bool(self.swap_pieces))
        if wanted == self.hooked:
            return
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.hooked = wanted
        if wanted[0]:
            self.handles.append(self.module.register_forward_pre_hook(self.pre_hook, with_kwargs=True))
        if wanted[1]:
            # always_call: a swapped weight is put back even when forward raises
            self.handles.append(self.module.register_forward_hook(
                self.post_hook, with_kwargs=True, always_call=wanted[2]))

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for piece in self.pre_pieces:
            args, kwargs = piece.pre_forward(module, args, kwargs)
        if self.swap_pieces:
            self.swap_lock.acquire()  # released in post_hook, which always runs for swap sites
            params = module._parameters
            saved: dict[str, Any] = {}
            self.swapped.append(saved)
            for piece in self.swap_pieces:
                for name in piece.swaps:
                    saved.setdefault(name, params[name])
                    params[name] = piece.swap(module, name, params[name])
        return args, kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.swap_pieces and self.swapped:
            module._parameters.update(self.swapped.pop())
            self.swap_lock.release()
        if output is None:  # forward raised; always_call only had to put the weights back
            return None
        for piece in self.post_pieces:
            output = piece.post_forward(module, args, kwargs, output)
        return output

    # -- merging ---------------------------------------------------------------------------

    def merged_values(self, piece: Piece) -> dict[str, torch.Tensor]:
        """What merging `piece` would write, rounded to each parameter's dtype; checks finiteness."""
        out = {}
        for name, value in piece.merged_weights(self.module).items():
            weight = self.module._parameters[name]
            new = value.detach().to(weight.device, weight.dtype)
            if not all_finite(new):
                raise MergeError(self._not_finite(piece, name))
            out[name] = new
        return out

    def merge(self, piece: Piece, keep_original: bool = True) -> None:
        """Write the piece into the module's weights in place (same tensor, same address)."""
        keep_original = keep_original or piece.exact_unmerge_needs_copy
        params = self.module._parameters
        if keep_original and not piece._overrides("merged_weights"):
            # additive piece: copy, add in place (rounded once), check; the copy undoes a bad write
            deltas = piece.delta_weights(self.module)
            with torch.no_grad():
                for name, delta in deltas.items():
                    piece.register_buffer(f"_original_{name}", params[name].detach().clone(), persistent=False)
                    params[name].add_(delta.to(params[name].device))
            bad = [name for name in deltas if not all_finite(params[name])]
            if bad:
                self._restore(piece, kept=True)
                raise MergeError(self._not_finite(piece, bad[0]))
        else:
            for name, new in self.merged_values(piece).items():
                if keep_original:
                    piece.register_buffer(f"_original_{name}", params[name].detach().clone(), persistent=False)
                with torch.no_grad():
                    params[name].copy_(new)
        self.merged.append((piece, keep_original))

    def _not_finite(self, piece: Piece, name: str) -> str:
        culprits = [f"{piece.key}.{n}" for n, t in piece.named_parameters() if not torch.isfinite(t).all()]
        why = (f"the delta's tensor(s) {culprits[:3]} hold NaN/Inf" if culprits
               else "the delta is too large for the weight's dtype")
        return f"merging would write NaN/Inf into {self.path}.{name}: {why}. Nothing was changed."

    def unmerge(self, piece: Piece) -> None:
        """Take a merged piece out again; later merges are undone and redone so it stays exact."""
        index = [p for p, _ in self.merged].index(piece)
        above = self.merged[index + 1:]
        for other, kept in reversed(above):
            self._restore(other, kept)
        self._restore(*self.merged[index])
        del self.merged[index:]
        for other, kept in above:
            self.merge(other, keep_original=kept)

    def _restore(self, piece: Piece, kept: bool) -> None:
        if kept:  # exact: copy the original back
            for name, weight in self.module._parameters.items():
                original = piece._buffers.pop(f"_original_{name}", None)
                if original is not None:
                    with torch.no_grad():
                        weight.copy_(original)
            return
        for name, delta in piece.delta_weights(self.module).items():  # no copy: subtract, not bit-exact
            weight = self.module._parameters[name]
            with torch.no_grad():
                weight.copy_((weight.float() - delta.to(weight.device, torch.float32)).to(weight.dtype))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. A float32 sum propagates any of them and only reads the tensor;
    the exact elementwise test runs only when the sum is not finite (it may just overflow)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def forget_compiled_code() -> None:
    """Make torch.compile'd code see a change of hooks: drop dynamo's caches when anything was
    compiled. Dynamo does not guard on hook dicts (skip_nnmodule_hook_guards), so a graph
    compiled with or without a delta's hooks would otherwise keep running after they change.
    The next call of a compiled model recompiles."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and dynamo.utils.counters["frames"]["ok"]:
        dynamo.reset()


class ForwardGuard:
    """Knows which threads are inside a forward pass of the model and which checkpointed
    training forwards still await their backward, so a delta change that would hit one of
    them is refused (not half-applied, not silently wrong). Changes hold its lock, so a
    forward that starts during a change waits for it to finish."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth: dict[int, int] = {}  # thread id -> nesting depth of forwards of the model
        self.pending: dict[int, weakref.ref] = {}  # outputs of checkpointed forwards awaiting backward

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a fresh, idle guard
        return {"fresh": True}  # (an empty state would skip __setstate__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def enter(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():  # traced code runs as one graph: nothing to watch there
            return
        me = threading.get_ident()
        with self.lock:
            self.depth[me] = self.depth.get(me, 0) + 1

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        me = threading.get_ident()
        with self.lock:
            left = self.depth.get(me, 1) - 1
            if left:
                self.depth[me] = left
            else:
                self.depth.pop(me, None)
        if output is not None and module.training and torch.is_grad_enabled() and _checkpointing(module):
            for t in _grad_tensors(output):  # its recompute will re-run the hooks during backward
                key = id(t)
                self.pending[key] = weakref.ref(t)
                t.register_hook(lambda grad, key=key: self.pending.pop(key, None) and None)

    @contextlib.contextmanager
    def changing(self, action: str) -> Iterator[None]:
        with self.lock:
            others = [t for t, d in self.depth.items() if d and t != threading.get_ident()]
            if others:
                raise DeltaStateError(
                    f"cannot {action}() while another thread runs a forward pass of this model; change "
                    "deltas between forward passes (forwards from several threads at once are fine)"
                )
            if any(ref() is not None for ref in self.pending.values()):
                raise DeltaStateError(
                    f"cannot {action}() between a forward and its backward under gradient checkpointing: "
                    "the backward re-runs the forward with the deltas as they are then, which would give "
                    "wrong gradients. Call backward() first, or drop the outputs (del out) if you do not need it"
                )
            self.pending.clear()
            yield


def _checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model re-runs its layers in backward (activation checkpointing)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name first
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _grad_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, dict, ModelOutput) that autograd tracks."""
    if isinstance(output, torch.Tensor):
        return [output] if output.requires_grad else []
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [t for t in values if isinstance(t, torch.Tensor) and t.requires_grad]


class DeltaStore(nn.Module):
    """The reserved child (`model._hookdelta`) that holds every delta of one model.

    Its tensors stay out of the parent's `state_dict()` and out of `load_state_dict`'s
    missing keys, so the model's checkpoint format is untouched (invariant 1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()
        self.sites: dict[str, Site] = {}
        self.saved_flags: dict[str, bool] = {}  # requires_grad before the first freezing delta
        self.freezers: list[str] = []  # names of the deltas that froze the backbone
        self.include_in_state_dict = False
        self.guard = ForwardGuard()
        self.root_hooks: list[Any] = []
        # plain functions (they get the store as `module`), so copies of the model stay consistent
        self.register_state_dict_post_hook(_hide_from_state_dict)
        self.register_load_state_dict_post_hook(_hide_missing_keys)

    def site(self, model: nn.Module, path: str) -> Site:
        if path not in self.sites:
            self.sites[path] = Site(model.get_submodule(path), path)
        return self.sites[path]

    def extra_repr(self) -> str:
        return f"deltas={list(self.deltas)}"


def _hide_from_state_dict(module: nn.Module, state_dict: dict, prefix: str, metadata: Any) -> None:
    if module.include_in_state_dict:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == prefix[:-1] or k.startswith(prefix)]:
            del meta[key]


def _hide_missing_keys(module: nn.Module, incompatible: Any) -> None:
    if not module.include_in_state_dict:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_internal(k)]


def get_store(model: nn.Module, create: bool = False) -> DeltaStore | None:
    store = model._modules.get(STORE_NAME)
    if store is None and create:
        store = DeltaStore()
        model.add_module(STORE_NAME, store)
        # the model's own forward is watched while it has deltas: see ForwardGuard
        store.root_hooks = [model.register_forward_pre_hook(store.guard.enter),
                            model.register_forward_hook(store.guard.leave, always_call=True)]
    return store  # type: ignore[return-value]


def remove_store(model: nn.Module) -> None:
    store = model._modules.pop(STORE_NAME, None)
    for handle in getattr(store, "root_hooks", []):
        handle.remove()


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The backbone's own parameters (tied ones once), never the deltas'."""
    return [(n, p) for n, p in model.named_parameters() if not is_internal(n)]
