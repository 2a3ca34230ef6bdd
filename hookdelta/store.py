"""A model's deltas, as one piece of state: the reserved child module that holds them, the
sites (hooked modules) their pieces sit on, the backbone's requires_grad flags, and the hooks
on the model's root. The only code that registers a delta on a model or takes it off again.

- `store_of(model)` finds the store (no side effects); `open_store(model)` creates it with its
  root hooks; the store closes itself when its last delta goes.
- `store.add(model, delta, freeze)` puts a built delta on the model: registers it, stamps its
  pieces, puts each on its site, freezes the backbone; on any error it takes all of it back.
- `store.remove(model, delta)` takes a delta's pieces off their sites, gives the backbone's
  flags back when the last freezing delta goes, and closes the store when it is empty.

Its tensors stay out of the model's `state_dict()` and out of `load_state_dict`'s missing keys
(invariant 1); deltas still move with `model.to()`, show in `model.parameters()` and survive
`copy.deepcopy`, because the store is an ordinary child module.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import MutableMapping
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn

from .engine import ForwardGuard, Site, checkpointing, forget_compiled_code, hook_clock
from .errors import ConfigError, DeltaStateError, RoutingError, UnsupportedModuleError
from .modules import STORE_NAME, host, is_internal
from .quantized import bnb_4bit_layers, hold_packing, release_packing, unpack_for_training
from .routing import Router, build_router
from .sharding import tensor_parallel_message, tensor_parallel_sites
from .shared_input import new_forward

if TYPE_CHECKING:
    from .delta import Delta


class DeltaStore(nn.Module):
    """The reserved child (`model._hookdelta`) that holds every delta of one model."""

    if TYPE_CHECKING:  # (for the type checker only: the tensors and layers it registers, typed as they are used)

        def __getattr__(self, name: str) -> Any: ...

    hookdelta_internal = True  # its root hooks are hookdelta's own (engine.is_ours)

    def __init__(self) -> None:
        super().__init__()
        # a ModuleDict (the deltas are child modules: they move, copy and show with the model),
        # typed by what it holds
        self.deltas = cast("MutableMapping[str, Delta]", nn.ModuleDict())
        self.sites: dict[str, Site] = {}
        self.saved_flags: dict[str, tuple[nn.Parameter, bool]] = {}  # before the first freezing delta
        self.freezers: list[str] = []  # names of the deltas that froze the backbone
        self.include_in_state_dict = False
        self.guard = ForwardGuard()
        self.guard.owner = weakref.ref(self)
        self.root_hooks: list[Any] = []
        self.packed: list[nn.Module] = []  # bitsandbytes 4-bit layers (see quantized.py)
        self.packing: list[Any] = []  # their repacking switches, given back when the store closes
        self.input_grads: Any = None  # (embeddings, hook handle) that makes their output require grad
        self.router: Router | None = None  # while hd.route(...) (or a call with adapter_names=) runs
        self.router_handles: list[Any] = []
        self.keyword_call: FrameType | None = None
        # plain functions (they get the store as `module`), so copies of the model stay consistent
        self.register_state_dict_post_hook(_hide_from_state_dict)
        self.register_load_state_dict_post_hook(_hide_missing_keys)

    def __setstate__(self, state: dict[str, Any]) -> None:  # deepcopy / pickle: the new guard's owner
        super().__setstate__(state)
        self.guard.owner = weakref.ref(self)

    def extra_repr(self) -> str:
        return f"deltas={list(self.deltas)}"

    # -- registering deltas ----------------------------------------------------------------

    def add(self, model: nn.Module, delta: Any, freeze: bool) -> None:
        """Register a built delta and hook its pieces in; all or nothing."""
        self.check_stacking(delta)
        tensor_parallel = tensor_parallel_sites(
            model,
            ((p.site_path, model.get_submodule(p.site_path)) for p in delta.pieces.values() if not p.tensor_parallel),
        )
        if tensor_parallel:
            raise UnsupportedModuleError(tensor_parallel_message(tensor_parallel[0]))
        try:
            self.deltas[delta.name] = delta
            delta.attached = True
            stamp = hook_clock()  # every hook registered from now on counts as registered after this delta
            for piece in delta.pieces.values():
                piece.stamp = stamp
                piece.set_live(True)
            self.guard.probe_next = True  # the next forward is watched for layers whose hooks never run
            self.guard.bypassed = []  # (and judged anew)
            for piece in delta.pieces.values():
                self.site(model, piece.site_path).add(piece)
            if freeze:
                self.freeze(model, delta.name)
        except BaseException:
            self.remove(model, delta)
            raise
        forget_compiled_code()

    def check_stacking(self, delta: Any) -> None:
        """An input rewrite (OFT, BOFT, IA3 on inputs) acts before every delta at its layer: they
        all see the rewritten input. Merged into the weight it no longer rewrites the input a new
        delta would read, so a delta is refused at a layer whose input rewrite is merged (IA3 on
        IA3 excepted: rescalings commute)."""
        for piece in delta.pieces.values():
            site = self.sites.get(piece.site_path)
            below = [p for p, _ in (site.merged if site else []) if p.rewrites_input_of(piece)]
            if below:
                owner = next((d.name for d in self.deltas.values() if below[0] in d.pieces.values()), "?")
                raise UnsupportedModuleError(
                    f"delta {owner!r} rewrites the input of {piece.site_path!r} ({below[0].describe()}) and is merged "
                    "into the weight, so a new delta there would not see the rewritten input as every other delta "
                    f"there does. Unmerge {owner!r} first, or target other layers"
                )

    def remove(self, model: nn.Module, delta: Any) -> None:
        """Take a delta's (unmerged) pieces off their sites and unregister it; close when empty."""
        for piece in delta.pieces.values():
            piece.set_live(False)
            site = self.sites.get(piece.site_path)
            if site is None:
                continue
            site.discard(piece)
            piece._buffers.clear()  # merge copies, if any were left
            if not site.pieces:
                del self.sites[piece.site_path]
        if delta.name in self.freezers:
            self.unfreeze(model, delta.name)
        if delta.name in self.deltas and self.deltas[delta.name] is delta:
            del self.deltas[delta.name]
        delta.attached = False
        if not len(self.deltas):
            close_store(model)
        forget_compiled_code()

    def site(self, model: nn.Module, path: str) -> Site:
        if path not in self.sites:
            owner = path.rpartition(".")[0]
            parent = (model.get_submodule(owner) if owner else model) if path else None
            self.sites[path] = Site(model.get_submodule(path), path, parent)
        return self.sites[path]

    def refresh(self, paths: Any = None) -> None:
        """Re-hook these sites (all of them by default) after their pieces' live flags changed."""
        for path in self.sites if paths is None else paths:
            self.sites[path].refresh()
        forget_compiled_code()

    def check_sites(self, action: str) -> None:
        """Refuse a change when a hooked module was replaced after attach (a wrapper, a converter)."""
        replaced = [s.path for s in self.sites.values() if s.replaced()]
        if replaced:
            raise DeltaStateError(
                f"cannot {action}(): the module at {replaced[0]!r} was replaced after the delta was attached (by a "
                "wrapper, a converter or resize_token_embeddings), so the delta's hooks sit on a module the model "
                "no longer calls there. "
                "detach() the delta and attach it again to the model as it is now"
            )

    # -- the backbone's flags --------------------------------------------------------------------

    def freeze(self, model: nn.Module, name: str) -> None:
        if not self.freezers:
            self.saved_flags = {n: (p, p.requires_grad) for n, p in base_parameters(model)}
        self.freezers.append(name)
        for _, p in base_parameters(model):
            p.requires_grad_(False)

    def unfreeze(self, model: nn.Module, name: str) -> None:
        """Give every parameter frozen at attach its flag back: the same tensor (also where a
        module was swapped out meanwhile) and whatever tensor now sits under its name."""
        self.freezers.remove(name)
        if not self.freezers:
            for param, flag in self.saved_flags.values():
                param.requires_grad_(flag)
            for n, p in base_parameters(model):
                if n in self.saved_flags:
                    p.requires_grad_(self.saved_flags[n][1])
            self.saved_flags = {}

    # -- per-row routing (routing.py) ------------------------------------------------------------

    def start_routing(
        self, model: nn.Module, names: Any, keep: Any, how: str = "hd.route(...)", root: bool = True
    ) -> Router:
        """Run each row of the model's batch with its own delta until stop_routing(). With `root`
        off the caller notes the model's own calls (a hook cannot be added to a running call)."""
        if self.router is not None:
            raise RoutingError(f"{how} inside another routing block: they do not nest")
        self.check_sites("route")
        router = build_router(dict(self.deltas.items()), self.sites, names, keep)
        callers = [model] if root else []
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        encoder = model.get_encoder() if encoder_decoder else None  # type: ignore[operator]  # transformers' method
        if isinstance(encoder, nn.Module) and encoder is not model:
            callers.append(encoder)  # generate() calls the encoder on its own
        for m in callers:
            self.router_handles += [
                m.register_forward_pre_hook(router.enter, with_kwargs=True),
                m.register_forward_hook(router.leave, with_kwargs=True, always_call=True),
            ]
        for site in self.sites.values():
            site.router = router
        self.router = router
        self.guard.holding = how
        forget_compiled_code()
        return router

    def stop_routing(self) -> None:
        for handle in self.router_handles:
            handle.remove()
        for site in self.sites.values():
            site.router = None
        self.router, self.router_handles, self.guard.holding = None, [], None
        forget_compiled_code()

    def keyword_start(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Root pre-hook: PEFT's spelling, `model(**inputs, adapter_names=[...])`, routes this call;
        and a delta that acts on token positions (hd.split) refuses a call continuing a KV cache."""
        for name in ("cache", "past_key_values", "cache_params"):  # (transformers 5.2x renamed it "cache")
            if kwargs.get(name) is not None:
                self._check_full_sequence(kwargs[name])
        if "adapter_names" not in kwargs:
            return None
        kwargs = dict(kwargs)
        names = kwargs.pop("adapter_names")
        router = self.start_routing(model, names, None, how="a call with adapter_names=[...]", root=False)
        try:
            router.enter(model, args, kwargs)
        except BaseException:
            self.stop_routing()
            raise
        self.keyword_call = sys._getframe(1)  # the call's frame (see ForwardGuard.calls)
        return args, kwargs

    def _check_full_sequence(self, cache: Any) -> None:
        positional = [d.name for d in self.deltas.values() if d.enabled and getattr(d.config, "full_sequence", False)]
        if not positional:
            return
        length = (
            cache.get_seq_length()
            if hasattr(cache, "get_seq_length")
            else len(cache)
            if isinstance(cache, (tuple, list))
            else 1
        )  # unknown kind: assume filled
        if length:
            raise UnsupportedModuleError(
                f"delta {positional[0]!r} acts on token positions of a whole sequence, but this call continues "
                f"from a KV cache of {length} tokens, so its positions would shift; call generate(use_cache=False) "
                "or run full sequences"
            )

    def which_run(self) -> tuple:
        """Which deltas run now, and how: what a checkpointed forward's recompute must see again."""
        return tuple((n, d.enabled, d.merged) for n, d in self.deltas.items())

    def interrupted(self, frames: list[Any]) -> None:
        """Forwards that a KeyboardInterrupt ended: a routing their call set up ends with them."""
        if self.keyword_call is not None and any(f is self.keyword_call for f in frames):
            self.keyword_call = None
            self.stop_routing()

    def keyword_stop(self, model: nn.Module, args: tuple, output: Any) -> None:
        if self.keyword_call is not None and self.router is not None:
            self.keyword_call = None
            self.router.leave(model)
            self.stop_routing()

    # -- called by the root hooks ----------------------------------------------------------------

    def before_forward(self, model: nn.Module) -> None:
        """Checks at the start of each forward of the model: the deltas still hold real tensors and
        sit on the modules the model calls, bitsandbytes' CPU inference packing is undone where
        gradients are wanted, and under checkpointing the input embeddings' output requires grad."""
        self.check_alive()
        self.check_sites("forward")  # (a replaced layer would silently run without its delta)
        tensor_parallel = tensor_parallel_sites(
            model, ((s.path, s.module) for s in self.sites.values() if not all(p.tensor_parallel for p in s.pieces))
        )
        if tensor_parallel:
            raise UnsupportedModuleError(tensor_parallel_message(tensor_parallel[0]))
        new_forward()
        if self.packed and torch.is_grad_enabled():
            unpack_for_training(self.packed)
        if torch.is_grad_enabled() and checkpointing(model):
            self.input_grads = require_input_grads(model, self.input_grads)

    def check_alive(self) -> None:
        """Refuse a forward when the deltas' tensors were moved to meta after attach (accelerate's
        cpu_offload / dispatch_model offload every module with tensors, a delta's too, and their
        values are gone): they would run as garbage. One tensor per delta is looked at."""
        for delta in self.deltas.values():
            first = next((t for p in delta.pieces.values() for t in p._parameters.values() if t is not None), None)
            if first is not None and first.is_meta:
                raise DeltaStateError(
                    f"the tensors of delta {delta.name!r} were moved to the meta device after it was attached "
                    "(accelerate's cpu_offload / disk_offload / dispatch_model offload every module, the "
                    "delta's too), so its values are gone. Offload the model first, then attach or hd.load "
                    "the delta: hookdelta keeps it on the device the layers compute on"
                )

    def acting(self, paths: tuple[str, ...], names: list[str]) -> bool:
        """Whether any of the named deltas still acts, by its hooks, on one of these layers."""
        return any(
            p.live and not p.through and p.site_path in paths
            for n in names
            if n in self.deltas
            for p in self.deltas[n].pieces.values()
        )

    def watch(self) -> dict[int, tuple[torch.Tensor, tuple[str, ...], list[str]]]:
        """id(weight) -> (weight, the layers holding it, delta names) for every layer a live piece
        hooks directly: what the first-forward probe watches (offloaded weights, on meta and
        replaced per call, not). A tied weight has several layers."""
        owners: dict[str, list[str]] = {}
        for name, delta in self.deltas.items():
            for piece in delta.pieces.values():
                if piece.live and not piece.through:
                    owners.setdefault(piece.site_path, []).append(name)
        watch: dict[int, tuple[torch.Tensor, tuple[str, ...], list[str]]] = {}
        for path, names in owners.items():
            site = self.sites.get(path)
            for param in site.module._parameters.values() if site is not None and path else ():
                if param is not None and not param.is_meta:
                    _, paths, before = watch.get(id(param), (param, (), []))
                    watch[id(param)] = (param, paths + (path,), sorted(set(before + names)))
        return watch


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


def store_of(model: nn.Module) -> DeltaStore | None:
    """The model's store, or None; changes nothing."""
    return cast("DeltaStore | None", model._modules.get(STORE_NAME))


def open_store(model: nn.Module) -> DeltaStore:
    """The model's store, created with its root hooks (the thread guard and the forward checks)
    and bitsandbytes' CPU repacking held off (see quantized.py) when there is none yet."""
    store = store_of(model)
    if store is None:
        store = DeltaStore()
        store.train(model.training)
        model.add_module(STORE_NAME, store)
        store.packed = bnb_4bit_layers(model)
        store.packing = hold_packing(store.packed)
        store.root_hooks = [
            model.register_forward_pre_hook(store.guard.enter),
            model.register_forward_hook(store.guard.leave, always_call=True),
            model.register_forward_pre_hook(store.keyword_start, with_kwargs=True),
            model.register_forward_hook(store.keyword_stop, always_call=True),
        ]
    return store


def close_store(model: nn.Module) -> None:
    store: Any = model._modules.pop(STORE_NAME, None)
    for handle in getattr(store, "root_hooks", []):
        handle.remove()
    release_packing(getattr(store, "packing", []))
    if getattr(store, "input_grads", None) is not None:
        store.input_grads[1].remove()


class _RequireGrad:
    """Forward hook on the input embeddings: their output requires grad (as transformers'
    `enable_input_require_grads`), so reentrant checkpointing over a frozen base passes the
    gradient on to the deltas inside the checkpointed blocks (else they get none, silently)."""

    hookdelta_internal = True  # (engine.is_ours)

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
            output.requires_grad_(True)


def require_input_grads(model: nn.Module, held: tuple[nn.Module, Any] | None) -> tuple[nn.Module, Any] | None:
    """`_RequireGrad` on the model's current input embeddings (moved there if they were replaced,
    e.g. by resize_token_embeddings); returns (embeddings, handle), or None where the model has
    none. (transformers 5 hooks them itself on `gradient_checkpointing_enable()`; 4.x only for its
    own PEFT integration.)"""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except NotImplementedError:
        embeddings = None
    if held is not None and held[0] is embeddings:
        return held
    if held is not None:
        held[1].remove()
    if not isinstance(embeddings, nn.Module):
        return None
    return embeddings, embeddings.register_forward_hook(_RequireGrad().hook)


def base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The backbone's own parameters (tied ones once), never the deltas'."""
    return [(n, p) for n, p in model.named_parameters() if not is_internal(n)]


def deltas_of(model: nn.Module) -> dict[str, Any]:
    """The deltas attached to `model`, by name, in attach order."""
    store = store_of(host(model))
    return dict(store.deltas.items()) if store is not None else {}


def unique_name(model: nn.Module, name: str | None, method: str) -> str:
    """`name` checked (non-empty, no dots, not taken), or a fresh one from the method's name."""
    taken = set(deltas_of(model))
    if name is None:
        name, i = method, 2
        while name in taken:
            name, i = f"{method}_{i}", i + 1
        return name
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"a delta name must be a non-empty string without dots, got {name!r}")
    if name in taken:
        raise DeltaStateError(f"model already has a delta named {name!r}; pick another name or detach that one")
    return name


def check_model(model: Any) -> nn.Module:
    """The module the deltas go on (see modules.host), or a clear refusal."""
    model = host(model)
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"hookdelta works on torch.nn.Module models, got {type(model).__name__}")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedModuleError(
            f"hookdelta keeps a model's deltas in one reserved child module, and a bare "
            f"{type(model).__name__} would iterate over it; wrap the container in your own nn.Module "
            "(or attach to the model that holds it)"
        )
    if type(model).__name__ == "OptimizedModule":
        raise UnsupportedModuleError(
            "this model was wrapped by torch.compile, which does not see hooks added afterwards; "
            "attach deltas to the original model (compiled._orig_mod) and compile after attaching"
        )
    return model


__all__ = [
    "DeltaStore",
    "base_parameters",
    "check_model",
    "close_store",
    "deltas_of",
    "open_store",
    "store_of",
    "unique_name",
]
