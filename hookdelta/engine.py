"""The hook engine: the only code in hookdelta that registers or removes hooks.

It knows nothing about delta methods. A method hands it `Piece`s (one per site); the
engine keeps one `Site` dispatcher per hooked module that runs that site's live pieces in
attach order from at most one forward-pre hook and one forward hook, and takes those
hooks off entirely when no piece there is live (merged or disabled deltas cost nothing).

Here: the `Piece` protocol, the `Site` dispatcher (the only code that edits a site's piece
lists), `ForwardGuard` and the compile-cache reset. The model-level state (which deltas a
model has, which sites exist, freezing) is `store.py`'s; a delta's lifecycle is `delta.py`'s.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .errors import BypassError, DeltaStateError, MergeError
from .modules import STORE_NAME, is_conv1d
from .placement import WeightSlot, kept_names, open_slot
from .probe import Probe, clean_up, quiet
from .quantized import dequantize, is_quantized

if TYPE_CHECKING:
    from .store import DeltaStore


class Piece(nn.Module):
    """One delta's part at one module: the protocol between a method and the engine.

    A piece declares which hooks it runs in, and the engine calls only those:

    - `hooks = {"pre"}`: `pre_forward` may rewrite the module's inputs (soft prompts, prefixes,
      IA3 on a layer's input);
    - `hooks = {"post"}`: `post_forward` may rewrite its output (LoRA, adapters, BitFit, IA3 on a
      layer's output), in place only where `owns_output(module)` says nothing else holds it;
    - `swaps = ("weight", ...)`: `swap` gives a stand-in for each named parameter for the length
      of one call, put back afterwards even when the call raises (LoRA on a parameter, LN
      tuning, also_train copies).

    What merge() may do with it is declared too, in these flags:

    | flag | meaning | e.g. |
    |---|---|---|
    | `mergeable = False` | it is not a change of the weights: merge() is refused | adapters, prompts |
    | `merges_by = "delta"` | merge adds `delta_weights()`; unmerge copies the kept original back (or subtracts, with keep_original=False) | LoRA, BitFit, LN tuning |
    | `merges_by = "value"` | merge writes `merged_weights()`; only the kept original can undo it, so it is always kept | IA3, DoRA, also_train |
    | `additive = True` | it adds a term that depends only on the layer's input, so it commutes with other additive pieces at the layer (a merge may move it inside them) | LoRA, BitFit |
    | `reads_weight = True` | its output depends on the layer's current weight, so a merge below it would change it | DoRA |
    | `weight_path_exact = False` | its merged weights do not reproduce it exactly | LoRA with input dropout |
    | `rewrites_input = True` | its pre hook changes the layer's input, which every post piece there then reads | OFT, BOFT, IA3 on inputs |
    | `rescales = True` | it only multiplies inputs or outputs elementwise: such pieces commute with each other | IA3 |
    | `tensor_parallel = True` | its tensors are sharded to match a tensor-parallel layer (sharding.py refuses other pieces there) | LoRA built on a parallelized nn.Linear |

    `merged_weights` / `delta_weights` stay differentiable in the piece's own tensors: where an
    enclosing module uses the layer's weights without calling it (`through`), the piece runs as
    the weights it would merge, swapped in for that module's call.

    Per-row routing (routing.py) runs a piece on its rows' slice of the batch; `routable = False`
    refuses that (prompts change the sequence length), and a piece whose effect is a low-rank
    term s·B·A·x says so in `lowrank()` so the rows of many deltas share one gathered matmul.
    """

    if TYPE_CHECKING:  # (for the type checker only: the tensors and layers it registers, typed as they are used)

        def __getattr__(self, name: str) -> Any: ...

        # a piece registers no None parameters: its own are read from this dict on hot paths
        _parameters: dict[str, torch.Tensor]  # type: ignore[assignment]  # (narrower than nn.Module's)

    hooks: frozenset[str] = frozenset()
    swaps: tuple[str, ...] = ()
    role: str = "delta"  # what the tree printer calls it ("also_train" for full copies)
    mergeable: bool = True
    merges_by: str = "delta"
    additive: bool = False
    reads_weight: bool = False
    tensor_parallel: bool = False  # matches a tensor-parallel layer's sharding (TensorParallelLoRALinear)
    weight_path_exact: bool = True
    routable: bool = True
    # why a piece is not routable, completing "delta 'x' (...) ..." in routing's refusal
    unroutable: str = "adds virtual tokens, so its rows would be longer than the others"
    rewrites_input: bool = False
    rescales: bool = False

    def __init__(self, site_path: str, key: str | None = None) -> None:
        super().__init__()
        self.site_path = site_path  # the module the hooks go on
        self.key = key or site_path  # unique within the delta; prefixes its saved tensors
        self.live = False  # set by the delta: enabled and not merged
        self.stamp = 0  # the hook clock when it was attached: orders it among other code's hooks
        self.through = ""  # child of the site whose weights it adapts, when the site uses them directly

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Rewrite the module's inputs (when "pre" is in `hooks`).

        Args:
            module: the hooked module. args, kwargs: its call's inputs.
        Returns:
            the (args, kwargs) the module is called with.
        """
        return args, kwargs

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Rewrite the module's output (when "post" is in `hooks`); never in place.

        Args:
            module: the hooked module. args, kwargs: its inputs. output: what it returned.
        Returns:
            the output the caller gets.
        """
        return output

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The stand-in for the parameter `name` (one of `swaps`) during this call.

        Args:
            module: the hooked module. name: the parameter. weight: its current value.
        Returns:
            the tensor the module's forward reads as `name`.
        """
        return weight

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """For merges_by="delta": what merge() adds to each of the module's parameters, float32.

        Args:
            module: the module whose weights it adapts.
        Returns:
            parameter name -> additive delta.
        """
        return {}

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters' new values after merge() (any float dtype; rounded once on write).
        merges_by="value" pieces define it; for "delta" ones it is the current value + delta.

        Args:
            module: the module whose weights it adapts.
        Returns:
            parameter name -> new value.
        """
        return {
            n: current(module, n).detach().float() + d.to(current(module, n).device, torch.float32)
            for n, d in self.delta_weights(module).items()
        }

    def delta_from_merged(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """delta_weights for merges_by="value" pieces (multiplicative ones: IA3, DoRA)."""
        return {n: v - current(module, n).detach().float() for n, v in self.merged_weights(module).items()}

    def weight_values(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The host's weights with this piece applied, differentiable, in their dtypes: the
        weight path, used where the host's own forward is not called."""
        if self.merges_by == "value":
            return {n: v.to(current(module, n).dtype) for n, v in self.merged_weights(module).items()}
        return {n: current(module, n) + d.to(current(module, n).dtype) for n, d in self.delta_weights(module).items()}

    def lowrank(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor] | None:
        """(A [r, in], B [out, r], s) when this call's post_forward is exactly output + s·B·A·x
        for the module's input x [..., in]; None otherwise (the default).

        Args:
            module: the hooked module (its mode decides whether dropout is on).
        """
        return None

    def describe(self) -> str:
        """A few words for the tree printer (e.g. the layer kind)."""
        return ""

    def set_live(self, live: bool) -> None:
        object.__setattr__(self, "live", live)  # skips nn.Module.__setattr__: switching is hot

    def swapping(self) -> bool:
        return bool(self.swaps or self.through)

    def needs(self) -> tuple[bool, bool, bool]:
        """(pre-hook, post-hook, weight swap) this piece runs with; fixed once it is attached.
        A piece acting through a child's weights (`through`) only swaps: its own hooks would
        see the enclosing module's inputs and outputs, not the child's."""
        needs = self.__dict__.get("_needs")
        if needs is None:
            through = bool(self.through)
            needs = ("pre" in self.hooks and not through, "post" in self.hooks and not through, self.swapping())
            object.__setattr__(self, "_needs", needs)
        return needs

    def rewrites_input_of(self, other: Piece) -> bool:
        """Whether this piece's input rewrite changes what `other` at the same layer computes
        (two rescalings commute, so neither changes the other): merging it, or a delta beside it
        merged, would then change the result."""
        return self.rewrites_input and not (self.rescales and other.rescales)


class TiedSwap(Piece):
    """The other holder of a tied weight (an output head tied to the embedding): swaps in what
    its primary piece swaps in there. It holds no tensors (they are saved once, with the
    primary) and merges nothing (the primary writes the shared weight once)."""

    def __init__(self, primary: Piece, site_path: str, key: str | None = None) -> None:
        super().__init__(site_path, key=key or site_path)
        object.__setattr__(self, "primary", primary)  # not a submodule: its tensors are the primary's
        self.swaps = primary.swaps

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.primary.swap(module, name, weight)

    def describe(self) -> str:
        return f"tied to {self.primary.key}"


def current(module: nn.Module, name: str) -> torch.Tensor:
    """A module's tensor as its forward sees it: a parameter, a parametrization's output, or a
    quantized layer's dequantized weight."""
    if name == "weight" and is_quantized(module):
        return dequantize(module)
    param = module._parameters.get(name)
    return param if param is not None else getattr(module, name)


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module's main input, whether it was passed positionally or by keyword."""
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def map_first_input(args: tuple, kwargs: dict, fn: Any) -> tuple[tuple, dict]:
    """(args, kwargs) with `fn` applied to the main input, wherever it was passed."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: fn(kwargs[name])}


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


def hook_clock() -> int:
    """The id the next hook registered anywhere will get: hook dicts are keyed by these
    increasing ids, so comparing a piece's stamp with another hook's key tells which came first."""
    return RemovableHandle.next_id


def is_ours(hook: Any) -> bool:
    """A hook hookdelta registered (dispatchers, the store's and the router's root hooks)."""
    return getattr(getattr(hook, "__self__", None), "hookdelta_internal", False) is True


def owns_output(module: nn.Module) -> bool:
    """Whether a post-forward piece may add into the module's output in place: no other code can
    hold that tensor yet. True when no global forward hooks exist, hookdelta's dispatcher is the
    module's first forward hook, and the module is a plain nn.Linear or transformers Conv1D
    (their forward keeps no reference to the output; autograd saves only their input). Under
    torch.compile always False: inductor fuses the add anyway, and dynamo before torch 2.12 cannot
    trace a test of a module's hook dict (a graph break at every site, 3-5x slower on an H200)."""
    return not torch.compiler.is_compiling() and first_hook_is_ours(module)


def first_hook_is_ours(module: nn.Module) -> bool:
    """owns_output outside compiled code (for callers that already know they are not compiling)."""
    if torch.nn.modules.module._global_forward_hooks or not (type(module) is nn.Linear or is_conv1d(module)):
        return False
    hooks = module._forward_hooks
    return bool(hooks) and is_ours(next(iter(hooks.values())))


class Dispatcher:
    """One forward-pre hook and one forward hook that run a run of a site's pieces in attach order."""

    hookdelta_internal = True

    def __init__(self, site: Site) -> None:
        self.site = site
        self.pre_pieces: tuple[Piece, ...] = ()
        self.post_pieces: tuple[Piece, ...] = ()
        self.swap_pieces: tuple[Piece, ...] = ()
        self.stamp = 0
        self.handles: list[Any] = []
        self.keys: tuple[int | None, int | None] = (None, None)  # (pre hook key, post hook key)
        self.hooked = (False, False, False)  # (pre hook, post hook, post hook always called)
        self.swapped: list[list[tuple[dict, str, Any]]] = []  # stack: nested or re-entrant calls

    def assign(self, pieces: list[Piece]) -> tuple[bool, bool, bool]:
        """Take these pieces; returns the hooks they need. (Hot: switching deltas runs it per site.)"""
        pre: list[Piece] = []
        post: list[Piece] = []
        swap: list[Piece] = []
        for p in pieces:
            needs = p.__dict__.get("_needs") or p.needs()
            if needs[0]:
                pre.append(p)
            if needs[1]:
                post.append(p)
            if needs[2]:
                swap.append(p)
        self.pre_pieces, self.post_pieces, self.swap_pieces = tuple(pre), tuple(post), tuple(swap)
        self.stamp = pieces[0].stamp if pieces else 0
        return bool(pre or swap), bool(post or swap), bool(swap)

    def hook(self, wanted: tuple[bool, bool, bool]) -> None:
        self.unhook()
        self.hooked = wanted
        module = self.site.module
        pre = post = None
        if wanted[0]:
            handle = module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
            self.handles.append(handle)
            pre = handle.id
        if wanted[1]:
            # always_call: a swapped weight is put back even when forward raises
            handle = module.register_forward_hook(self.post_hook, with_kwargs=True, always_call=wanted[2])
            self.handles.append(handle)
            post = handle.id
        self.keys = (pre, post)
        self.site.counts = (self.site.counts[0] + (pre is not None), self.site.counts[1] + (post is not None))

    def unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        pre, post = self.keys
        self.site.counts = (self.site.counts[0] - (pre is not None), self.site.counts[1] - (post is not None))
        self.handles, self.keys, self.hooked = [], (None, None), (False, False, False)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        router = self.site.router
        if router is not None:  # per-row routing (routing.py): each piece on its own rows
            if self.pre_pieces:
                args, kwargs = router.pre(self.site.path, module, args, kwargs, self.pre_pieces)
        else:
            for piece in self.pre_pieces:
                args, kwargs = piece.pre_forward(module, args, kwargs)
        if self.swap_pieces:
            self.site.swap_lock.acquire()  # released in post_hook, which always runs for swap sites
            saved: list[tuple[dict, str, Any]] = []
            self.swapped.append(saved)
            for piece in self.swap_pieces:
                if piece.through:  # the site bypasses this child's forward: swap its weights in
                    host = module.get_submodule(piece.through)
                    with quiet():  # (reading the weights here is ours, not a bypass)
                        values = piece.weight_values(host)
                    # a plain tensor stands in for the parameter for this call (typed as Parameters only)
                    held: dict[str, Any] = host._parameters
                    for name, value in values.items():
                        saved.append((held, name, held[name]))
                        held[name] = value
                    continue
                params: dict[str, Any] = module._parameters
                for name in piece.swaps:
                    saved.append((params, name, params[name]))
                    params[name] = piece.swap(module, name, params[name])
        return args, kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.swap_pieces and self.swapped:
            for params, name, value in reversed(self.swapped.pop()):
                params[name] = value
            self.site.swap_lock.release()
        if output is None:  # forward raised; always_call only had to put the weights back
            return None
        router = self.site.router
        if router is not None:
            return router.post(self.site.path, module, args, kwargs, output, self.post_pieces)
        for piece in self.post_pieces:
            output = piece.post_forward(module, args, kwargs, output)
        return output


class Site:
    """The hooks of one adapted module: its pieces in attach order, run by one dispatcher
    (one pre-hook, one post-hook) when no other code has hooks there.

    Where other code registered hooks on the same module, every piece keeps its place among
    them by its attach time (hook ids are a global clock): pieces attached on either side of
    another hook get a dispatcher each, placed on that hook's side, and re-registering
    (enable, unmerge) puts a dispatcher back where it was, never at the end.
    """

    def __init__(self, module: nn.Module, path: str, parent: nn.Module | None = None) -> None:
        self.module = module
        self.path = path
        self.parent = parent  # the module holding it (None for the root): to notice a replacement
        self.pieces: list[Piece] = []  # attach order
        self.merged: list[tuple[Piece, bool]] = []  # (piece, kept original) in merge order
        self.dispatchers: list[Dispatcher] = []
        self.counts = (0, 0)  # our registered (pre-hooks, forward hooks) at the module
        self.leaf = path.rpartition(".")[2]
        self.rows = getattr(module, "num_embeddings", None)  # resize_token_embeddings resizes some in place
        self.router: Any = None  # set while hd.route(...) is active: it runs the pieces per row
        # swapping writes the module's parameter dict for the length of one call, so calls of
        # this module from several threads take turns (only at sites with swap pieces)
        self.swap_lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a fresh lock, not the held one
        return {k: v for k, v in self.__dict__.items() if k not in ("swap_lock", "router")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, swap_lock=threading.RLock(), router=None)

    def add(self, piece: Piece) -> None:
        """A new piece, last in attach order."""
        self.pieces.append(piece)
        self.refresh()

    def discard(self, piece: Piece) -> None:
        """Take a piece away (unmerged, or merged for good), with its hooks."""
        self.pieces = [p for p in self.pieces if p is not piece]
        self.merged = [(p, k) for p, k in self.merged if p is not piece]
        self.refresh()

    def host(self, piece: Piece) -> nn.Module:
        """The module whose weights the piece adapts."""
        return self.module.get_submodule(piece.through) if piece.through else self.module

    def host_path(self, piece: Piece) -> str:
        return ".".join(p for p in (self.path, piece.through) if p)

    def replaced(self) -> bool:
        """The module is no longer at its path (a wrapper or a converter swapped it out), or an
        embedding no longer has the rows the deltas were built for (resized in place)."""
        return (self.parent is not None and self.parent._modules.get(self.leaf) is not self.module) or (
            self.rows is not None and self.module.num_embeddings != self.rows
        )

    # -- hook lifecycle ------------------------------------------------------------------

    def refresh(self) -> None:
        """Install exactly the hooks the live pieces need, or none at all. Handles that are
        already the right ones stay (switching deltas at a layer only swaps the piece lists)."""
        live = [p for p in self.pieces if p.live]
        m = self.module
        alone = len(m._forward_pre_hooks) == self.counts[0] and len(m._forward_hooks) == self.counts[1]
        if alone and len(self.dispatchers) == 1 and live:  # the usual case: one dispatcher runs them all
            d = self.dispatchers[0]
            wanted = d.assign(live)
            if wanted != d.hooked:
                d.hook(wanted)
            return
        if alone:
            runs = [live] if live else []
        else:
            foreign = self.foreign_keys()
            runs = self._runs(live, foreign)
        while len(self.dispatchers) < len(runs):
            self.dispatchers.append(Dispatcher(self))
        wants = [d.assign(run) for d, run in zip(self.dispatchers, runs, strict=False)]  # (extras unhooked below)
        for d in self.dispatchers[len(runs) :]:
            d.unhook()
        del self.dispatchers[len(runs) :]
        for d, w in zip(self.dispatchers, wants, strict=True):
            if w != d.hooked:
                d.hook(w)
        if not alone:
            self._place()

    def foreign_keys(self) -> tuple[list[int], list[int]]:
        """Keys of the hooks other code registered on the module: (pre-hooks, forward hooks)."""
        m = self.module
        return (
            [k for k, h in m._forward_pre_hooks.items() if not is_ours(h)],
            [k for k, h in m._forward_hooks.items() if not is_ours(h)],
        )

    @staticmethod
    def _runs(live: list[Piece], foreign: tuple[list[int], list[int]]) -> list[list[Piece]]:
        """The live pieces in attach order, cut wherever another hook was registered between two
        attaches; weight-swapping pieces form one run of their own (their place among output
        hooks does not matter, and their swaps must be undone in reverse)."""
        keys = sorted(foreign[0] + foreign[1])
        runs: list[list[Piece]] = []
        for piece in (p for p in live if not p.swapping()):
            if runs and not any(runs[-1][-1].stamp < k < piece.stamp for k in keys):
                runs[-1].append(piece)
            else:
                runs.append([piece])
        swapping = [p for p in live if p.swapping()]
        return runs + ([swapping] if swapping else [])

    def _place(self) -> None:
        """Move each dispatcher's hooks behind the other hooks registered before its pieces."""
        for index, hooks in ((0, self.module._forward_pre_hooks), (1, self.module._forward_hooks)):
            ours = [(d.keys[index], d.stamp) for d in self.dispatchers if d.keys[index] is not None]
            mine = {k for k, _ in ours}
            others = [k for k in hooks if k not in mine]
            order = [k for k, stamp in ours if not any(o < stamp for o in others)]
            for i, other in enumerate(others):
                order.append(other)
                order += [k for k, stamp in ours if other < stamp and not any(o < stamp for o in others[i + 1 :])]
            for key in order:
                hooks.move_to_end(key)  # type: ignore[attr-defined]  # (an OrderedDict: typed as a dict)

    def foreign_clash(self, piece: Piece) -> str | None:
        """Why merging `piece` would change the result because of another code's hook at the
        module: a forward hook registered before it would then see its effect, or a pre-hook
        registered after it would then act before it. None when there is no such hook."""
        if piece.through or piece.swaps:
            return None
        m = self.module
        if "post" in piece.hooks:
            before = [
                h
                for k, h in m._forward_hooks.items()
                if not is_ours(h)
                and k < piece.stamp
                and not (piece.tensor_parallel and _name(h).startswith("distribute_module."))
            ]
            # (a tensor-parallel layout hook only converts the output's layout, which commutes with a
            # change of the weight; a renamed one is refused, as any unknown hook)
            if before:
                return f"a forward hook registered before it ({_name(before[0])}) would then see its effect"
        if "pre" in piece.hooks:
            after = [h for k, h in m._forward_pre_hooks.items() if not is_ours(h) and k > piece.stamp]
            if after:
                return f"a forward pre-hook registered after it ({_name(after[0])}) would then act before it"
        return None

    # -- merging ---------------------------------------------------------------------------

    def merged_values(self, piece: Piece) -> dict[str, torch.Tensor]:
        """What merging `piece` would write, rounded to each parameter's dtype; checks finiteness."""
        out = {}
        host = self.host(piece)
        with torch.no_grad():
            values = piece.merged_weights(host)
        for name, value in values.items():
            weight = current(host, name)
            new = value.detach().to(weight.device, weight.dtype)
            if not all_finite(new):
                raise MergeError(self._not_finite(piece, name))
            out[name] = new
        return out

    def merge(self, piece: Piece, keep_original: bool = True, requantize: bool = False) -> None:
        """Write the piece into the module's weights in place (same tensor, same address); a
        quantized weight only with requantize (a new quantized weight; the old one is kept)."""
        keep_original = keep_original or piece.merges_by == "value"  # only the original undoes those
        host, where = self.host(piece), self.host_path(piece)
        for name, param in host._parameters.items():  # offloaded or quantized weights: refused before any math
            if param is not None:
                open_slot(host, name, where, requantize)
        written: list[Any] = []
        try:
            if piece.merges_by == "delta":
                deltas = piece.delta_weights(host)
                slots = {name: open_slot(host, name, where, requantize) for name in deltas}
                keep_original = keep_original or any(s.needs_copy for s in slots.values())
            if keep_original and piece.merges_by == "delta":
                # additive piece: copy, add in place (rounded once), check; the copy undoes a bad write
                for name, delta in deltas.items():
                    slots[name].keep(piece)
                    written.append(slots[name])
                    if isinstance(slots[name], WeightSlot):
                        slots[name].add_(delta)
                    else:
                        slots[name].write(slots[name].value().float() + delta.float(), piece)
                bad = [name for name in deltas if not all_finite(slots[name].value())]
                if bad:
                    raise MergeError(self._not_finite(piece, bad[0]))
            else:
                values = self.merged_values(piece)
                slots = {name: open_slot(host, name, where, requantize) for name in values}
                keep_original = keep_original or any(s.needs_copy for s in slots.values())
                for name, new in values.items():
                    if keep_original:
                        slots[name].keep(piece)
                        written.append(slots[name])
                    slots[name].write(new, piece)
        except BaseException:
            for slot in written:
                slot.restore(piece)
            raise
        self.merged.append((piece, keep_original))

    def _not_finite(self, piece: Piece, name: str) -> str:
        culprits = [f"{piece.key}.{n}" for n, t in piece.named_parameters() if not torch.isfinite(t).all()]
        why = (
            f"the delta's tensor(s) {culprits[:3]} hold NaN/Inf"
            if culprits
            else "the delta is too large for the weight's dtype"
        )
        return f"merging would write NaN/Inf into {self.host_path(piece)}.{name}: {why}. Nothing was changed."

    def unmerge(self, piece: Piece) -> None:
        """Take a merged piece out again; later merges are undone and redone so it stays exact."""
        index = [p for p, _ in self.merged].index(piece)
        above = self.merged[index + 1 :]
        for other, kept in reversed(above):
            self._restore(other, kept)
        self._restore(*self.merged[index])
        del self.merged[index:]
        for other, kept in above:
            self.merge(other, keep_original=kept, requantize=True)  # it was merged before: redo it the same way

    def _restore(self, piece: Piece, kept: bool) -> None:
        host, where = self.host(piece), self.host_path(piece)
        if kept:  # exact: copy the original back
            for name in kept_names(piece):
                open_slot(host, name, where, requantize=True).restore(piece)
            return
        for name, delta in piece.delta_weights(host).items():  # no copy: subtract, not bit-exact
            slot = WeightSlot(host, name, where)
            value = slot.value()
            slot.write((value.float() - delta.to(value.device, torch.float32)).to(value.dtype))


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


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

    hookdelta_internal = True

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # thread id -> the frames that called the root pre-hook of each forward of the model under way
        # (innermost last). A frame is on its thread's stack exactly while its call runs, so a
        # forward that a KeyboardInterrupt left (no forward hook runs then, always_call or not) is
        # told from a live one by looking (see _drop_stale), not trusted to have said goodbye.
        self.calls: dict[int, list[Any]] = {}
        self.pending: dict[int, weakref.ref] = {}  # outputs of checkpointed forwards awaiting backward
        self.probe_next = False  # watch the next forward for bypassed layers (set by attach)
        self.watching: Probe | None = None
        self.holding: str | None = None  # a block that needs the deltas to stay as they are (hd.route)
        self.owner: Any = None  # weakref to the store: told of the forwards a BaseException ended
        self.forward: Any = None  # the model's forward (class's, instance's) when last called
        # what a probe found bypassed: (layers, deltas, message), refused while those deltas act there
        self.bypassed: list[tuple[tuple[str, ...], list[str], str]] = []

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a fresh, idle guard
        return {"fresh": True}  # (an empty state would skip __setstate__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]  # (a fresh guard in place)

    def enter(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():  # traced code runs as one graph: nothing to watch there
            return
        me = threading.get_ident()
        frame = sys._getframe(1)  # the module call's own frame: on the stack until the call ends
        clean_up()
        with self.lock:
            if self.calls.get(me):  # a nested forward, or one interrupted earlier: which?
                self._drop_stale(me, frame)
        store = cast("DeltaStore", module._modules[STORE_NAME])
        store.before_forward(module)
        # a forward replaced after attach (TRL's fused loss patches the instance's, Liger the
        # class's) may read weights without calling their layers: watch its next call again
        forward = (type(module).forward, module.__dict__.get("forward"))
        with self.lock:
            if forward != self.forward:
                self.probe_next = self.probe_next or self.forward is not None
                self.forward = forward
                self.bypassed = []  # (the new forward is judged on its own)
            acting = [message for layers, names, message in self.bypassed if store.acting(layers, names)]
            if acting:
                raise BypassError(acting[0])
            calls = self.calls.setdefault(me, [])
            calls.append(frame)
            start = self.probe_next and self.watching is None and len(calls) == 1
            if start:
                self.probe_next = False
                self.watching = probe = Probe(module, store.watch(), frame)
        if start:
            probe.start()

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        me = threading.get_ident()
        frame = sys._getframe(1)
        with self.lock:
            calls = self.calls.get(me, [])
            if frame in calls:  # (identity: frames compare by identity)
                del calls[len(calls) - 1 - calls[::-1].index(frame) :]
            if not calls:
                self.calls.pop(me, None)
            probe = self.watching if not calls and self.watching is not None and self.watching.thread == me else None
            if probe is not None:
                self.watching = None
        if probe is not None:
            found = probe.finish()
            if found:
                with self.lock:
                    self.bypassed = found
                raise BypassError(found[0][2])
        if output is not None and module.training and torch.is_grad_enabled() and checkpointing(module):
            store = cast("DeltaStore", module._modules[STORE_NAME])
            which = store.which_run()
            for t in _grad_tensors(output):  # its recompute will re-run the hooks during backward
                key = id(t)
                self.pending[key] = weakref.ref(t)
                t.register_hook(lambda grad, key=key: self._backward(key, store, which))

    def _backward(self, key: int, store: Any, which: Any) -> None:
        """A checkpointed forward's backward begins: its recompute re-runs the hooks now, so the
        deltas that run must be those that ran in the forward (a disable() undone in between is
        fine: `with delta.disabled():` around a reference model's forward)."""
        self.pending.pop(key, None)
        now = store.which_run()
        if now != which:
            raise DeltaStateError(
                "the deltas that run changed between a forward under gradient checkpointing and its backward "
                f"(then {list(which)}, now {list(now)}), so the recompute would use other deltas and give wrong "
                "gradients; undo the change (enable/disable/set_active) before backward()"
            )

    def _drop_stale(self, thread: int, top: Any) -> None:
        """Forget the forwards of `thread` whose frames are no longer on its stack (from `top`
        up): a KeyboardInterrupt (or another BaseException) ended them without any forward hook.
        Their probe, if any, is abandoned and its next forward is watched again. Holds the lock."""
        live: set[int] = set()
        while top is not None:
            live.add(id(top))
            top = top.f_back
        calls = self.calls.get(thread, [])
        kept = [f for f in calls if id(f) in live]
        if len(kept) == len(calls):
            return
        if kept:
            self.calls[thread] = kept
        else:
            self.calls.pop(thread, None)
        store = self.owner() if self.owner is not None else None
        if store is not None:
            store.interrupted([f for f in calls if id(f) not in live])
        probe = self.watching
        if probe is not None and probe.thread == thread and all(f is not probe.frame for f in kept):
            self.watching = None
            self.probe_next = True
            probe.abandon()

    def busy_threads(self) -> list[int]:
        """Other threads inside a forward of the model now, after forgetting every thread's
        ended forwards (this one's too). Holds the lock."""
        frames = sys._current_frames()
        for thread in list(self.calls):
            self._drop_stale(thread, frames.get(thread))  # (a finished thread has no frame: all stale)
        return [t for t, calls in self.calls.items() if calls and t != threading.get_ident()]

    # changes that only switch which deltas run: allowed between a checkpointed forward and its
    # backward, because the backward checks they were undone (see _backward)
    SWITCHES = frozenset({"enable", "disable", "set_active"})

    @contextlib.contextmanager
    def changing(self, action: str) -> Iterator[None]:
        with self.lock:
            clean_up()
            busy = self.busy_threads()  # (first: a call with adapter_names= that Ctrl-C ended holds no more)
            if self.holding:
                raise DeltaStateError(
                    f"cannot {action}() inside {self.holding}: it was set up for the deltas as "
                    "they are; leave the block first"
                )
            if busy:
                raise DeltaStateError(
                    f"cannot {action}() while another thread runs a forward pass of this model; change "
                    "deltas between forward passes (forwards from several threads at once are fine)"
                )
            if action not in self.SWITCHES and any(ref() is not None for ref in self.pending.values()):
                raise DeltaStateError(
                    f"cannot {action}() between a forward and its backward under gradient checkpointing: "
                    "the backward re-runs the forward with the deltas as they are then, which would give "
                    "wrong gradients. Call backward() first, or drop the outputs (del out) if you do not need it"
                )
            if action not in self.SWITCHES:
                self.pending.clear()
            yield


def checkpointing(model: nn.Module) -> bool:
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


@contextlib.contextmanager
def watching_inputs(model: nn.Module, paths: list[str], see: Any) -> Iterator[None]:
    """For the length of the block, `see(path, input)` is called with the main input of every call
    of the modules at `paths` (data-driven initialisations read activations this way). The hooks
    are this block's only: removed on exit, even when the block raises."""
    handles: list[RemovableHandle] = []
    try:
        for path in paths:

            def pre(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
                see(path, first_input(args, kwargs))

            handles.append(model.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
