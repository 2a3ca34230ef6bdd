"""The lifecycle: `attach` a config to a model, then enable / disable / merge / unmerge /
detach the resulting `Delta`. Method-agnostic: pieces come from the config, their hooks from
the engine's sites, their registration on the model from the store (store.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import uuid
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.nn as nn

from . import inits
from .also_train import also_train_paths, build_copies
from .config import DeltaConfig
from .engine import Piece
from .errors import ConfigError, DeltaFileError, DeltaStateError, MergeError, SelectorError, UnsupportedModuleError
from .modules import host, module_path
from .placement import bypassing_parent, meta_message, offload_source
from .quantized import dequantize_model
from .sharding import assign, full, is_sharded, shape, whole
from .store import DeltaStore, check_model, close_store, deltas_of, open_store, store_of, unique_name

F = TypeVar("F", bound=Callable[..., Any])


def _changes(action: str) -> Callable[[F], F]:
    """A lifecycle call: refused while another thread is in a forward pass of the model or a
    checkpointed forward awaits its backward; forwards starting meanwhile wait for it."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(self: Delta, *args: Any, **kwargs: Any) -> Any:
            self._check_attached(action)
            store = self._store()
            if action != "detach":
                store.check_sites(action)
            # a delta's tensors stay normal (trainable, writable) tensors under torch.inference_mode()
            with store.guard.changing(action), torch.inference_mode(False):
                return fn(self, *args, **kwargs)

        return run  # type: ignore[return-value]  # (fn's own signature)

    return wrap


def slot(key: str) -> str:
    """A piece's key in the delta's ModuleDict (module-dict keys cannot contain dots)."""
    return key.replace(".", "-")


class Delta(nn.Module):
    """One attached delta: its config, its pieces (one per site) and its state.

    It is an `nn.Module` living inside the host model, so `delta.parameters()` gives
    exactly its trainable tensors and it moves with the model. Use it as a context
    manager to detach on exit, even on error.
    """

    if TYPE_CHECKING:  # (for the type checker only: the tensors and layers it registers, typed as they are used)

        def __getattr__(self, name: str) -> Any: ...

    _model: nn.Module  # (set with object.__setattr__: the model is not a child)

    def __init__(
        self, name: str, config: DeltaConfig, pieces: list[Piece], sites: list[str], also_train: list[str]
    ) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.sites = list(sites)  # the method's site keys, as selected (saved with the delta)
        self.also_train = list(also_train)
        self.pieces = cast("MutableMapping[str, Piece]", nn.ModuleDict())  # (child modules: move and copy with it)
        for piece in pieces:
            if slot(piece.key) in self.pieces:
                raise SelectorError(f"{piece.key!r} is selected twice (as a target and in also_train?); select it once")
            self.pieces[slot(piece.key)] = piece
        self.enabled = True
        self.merged = False
        self.attached = False
        self.uid = uuid.uuid4().hex  # identity: a save only replaces a directory this delta wrote
        object.__setattr__(self, "_model", None)  # a plain reference: the model is not a child

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]  # (torch's, untyped)
        self.uid = uuid.uuid4().hex  # a copy (deepcopy, unpickling) is a delta of its own

    # -- state ---------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def model(self) -> nn.Module:
        self._check_attached("model")
        return self._model

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> str:
        """One line: trainable parameters of this delta against all of the model's."""
        total = sum(p.numel() for p in self._model.parameters()) if self.attached else self.num_trainable
        mine = self.num_trainable
        return (
            f"delta {self.name!r} ({self.method}): trainable params {mine:,} || all params {total:,} "
            f"|| trainable% {100.0 * mine / max(total, 1):.4f} || sites {len(self.sites) + len(self.also_train)}"
        )

    def print_trainable(self) -> None:
        print(self.summary())

    def extra_repr(self) -> str:
        state = (
            "detached"
            if not self.attached
            else ("merged" if self.merged else "enabled" if self.enabled else "disabled")
        )
        return f"name={self.name!r}, method={self.method!r}, sites={len(self.pieces)}, {state}"

    # -- lifecycle ---------------------------------------------------------------------

    @_changes("enable")
    def enable(self) -> None:
        """Run the delta again (puts its hooks back)."""
        self._check_attached("enable")
        self.enabled = True
        self._refresh()

    @_changes("disable")
    def disable(self) -> None:
        """Stop running the delta; its hooks come off, so it costs nothing while off."""
        self._check_attached("disable")
        if self.merged:
            raise DeltaStateError(f"delta {self.name!r} is merged into the weights; unmerge() it before disabling")
        self.enabled = False
        self._refresh()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[Delta]:
        """`with delta.disabled():` runs the model without this delta, then restores the state."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if was and self.attached:
                self.enable()

    @_changes("merge")
    def merge(self, keep_original: bool = True, requantize: bool = False) -> dict[str, float]:
        """Write the delta into the base weights in place and take its hooks off.

        With keep_original (default) a copy of each touched weight is kept so `unmerge()`
        is bit-exact; keep_original=False saves that memory and unmerge subtracts instead
        (off by float rounding). Quantized weights are refused (lossy) unless requantize:
        then each is dequantized, merged and quantized again the same way, and the result
        maps each such layer to the largest output change per unit input the rounding made
        (max row sum of |W_requantized - (W + ΔW)|); unmerge() puts the original bytes back.
        """
        self._check_attached("merge")
        if self.merged:
            raise DeltaStateError(f"delta {self.name!r} is already merged; call unmerge() first")
        if not self.enabled:
            raise DeltaStateError(f"delta {self.name!r} is disabled; enable() it before merging")
        blocked = [p.key for p in self._pieces() if not p.mergeable]
        if blocked:
            raise MergeError(
                f"the {self.method} delta {self.name!r} cannot be merged into the weights "
                f"(sites: {blocked[:3]}); keep it attached unmerged"
            )
        store = self._store()
        self._check_merge_order(store)
        if not keep_original:  # without copies a failed write could not be undone exactly: check first
            for piece in self._pieces():
                with whole(_site_tensors(store, piece)):
                    store.sites[piece.site_path].merged_values(piece)
        done: list[Piece] = []
        try:
            for piece in self._pieces():  # (one site's weights gathered at a time under ZeRO-3)
                with whole(_site_tensors(store, piece), modify=True):
                    store.sites[piece.site_path].merge(piece, keep_original, requantize)
                done.append(piece)
        except BaseException:
            for piece in reversed(done):
                with whole(_site_tensors(store, piece), modify=True):
                    store.sites[piece.site_path].unmerge(piece)
            raise
        self.merged = True
        self._refresh()
        return {k: v for p in self._pieces() for k, v in p.__dict__.get("_requantize_error", {}).items()}

    def _check_merge_order(self, store: DeltaStore) -> None:
        """Merging moves a piece inside every hook still running at its layer. That keeps the
        result only if the pieces attached before it that stay unmerged commute with it (both
        add a term to the output), no unmerged piece there reads the weight (DoRA), and no
        other code's hook sits between it and the layer."""
        blocked = self._merge_blocker(store)
        if blocked is None:
            return
        piece, other, owner = blocked
        where = store.sites[piece.site_path].host_path(piece)
        if other is None:
            raise MergeError(
                f"merging {self.name!r} at {where!r} would change the result: {owner}. Remove that "
                "hook before merging (or merge before registering it); nothing was changed."
            )
        theirs = store.deltas[owner]
        if theirs._merge_blocker(store, only=self) is not None:
            advice = (
                "each would change what the other computes, so neither can be merged while the other is "
                "unmerged there. Detach one of them, or keep both unmerged"
            )
        elif theirs.mergeable() and theirs._merge_blocker(store) is None:
            advice = f"{'Enable and merge' if not theirs.enabled else 'Merge'} {owner!r} first, or detach it"
        else:
            advice = f"Detach {owner!r} first (it cannot be merged itself)"
        raise MergeError(
            f"merging {self.name!r} at {where!r} would change the result: delta {owner!r} "
            f"({other.describe() or type(other).__name__}) runs at the same layer and does not commute "
            f"with it; {advice}. Nothing was changed."
        )

    def mergeable(self) -> bool:
        """Whether every piece can be written into the weights (adapters and prompts cannot)."""
        return all(p.mergeable for p in self._pieces())

    def _merge_blocker(self, store: DeltaStore, only: Delta | None = None) -> tuple[Piece, Piece | None, str] | None:
        """(my piece, the piece in the way, its delta's name) for the first unmerged piece that
        would not commute with a merge of this delta; (piece, None, why) for another code's
        hook in the way. `only` restricts the check to the pieces of that delta."""
        mine = {id(p) for p in self._pieces()}
        theirs = {id(p) for p in only._pieces()} if only is not None else None
        for piece in self._pieces():
            site = store.sites[piece.site_path]
            if only is None:
                why = site.foreign_clash(piece)
                if why is not None:
                    return piece, None, why
            merged = {id(p) for p, _ in site.merged}
            before = True
            for other in site.pieces:
                if other is piece:
                    before = False
                    continue
                if id(other) in mine or id(other) in merged:
                    continue
                if theirs is not None and id(other) not in theirs:
                    continue
                # an input rewrite merged into the weight stops feeding the others its input
                if (
                    (before and not (piece.additive and other.additive))
                    or other.reads_weight
                    or piece.rewrites_input_of(other)
                ):
                    owner = next((d.name for d in store.deltas.values() if other in d._pieces()), "?")
                    return piece, other, owner
        return None

    @_changes("unmerge")
    def unmerge(self) -> None:
        """Take the delta back out of the weights (bit-exact by default) and put its hooks back."""
        self._check_attached("unmerge")
        if not self.merged:
            raise DeltaStateError(f"delta {self.name!r} is not merged")
        store = self._store()
        self._check_unmerge_order(store)
        for piece in reversed(self._pieces()):
            site = store.sites[piece.site_path]
            if any(p is piece for p, _ in site.merged):
                with whole(_site_tensors(store, piece), modify=True):
                    site.unmerge(piece)
        self.merged = False
        self._refresh()

    def _check_unmerge_order(self, store: DeltaStore) -> None:
        """Unmerging puts a piece back as a hook in front of everything still merged at its layer
        and takes its term out of the weight. That keeps the result only where (1) the deltas
        merged there and attached after it commute with it (both add a term), (2) it does not
        read a weight (DoRA) that later merges changed, and (3) no unmerged delta there reads
        the weight (DoRA): the mirror image of what merge() checks."""
        mine = {id(p) for p in self._pieces()}
        for piece in self._pieces():
            site = store.sites[piece.site_path]
            merged = [p for p, _ in site.merged]
            if not any(p is piece for p in merged):
                continue
            attached = {id(p): i for i, p in enumerate(site.pieces)}
            mine_at = merged.index(piece)
            for other in site.pieces:
                if id(other) in mine:
                    continue
                if not any(p is other for p in merged):
                    why = "reads the weight there" if other.reads_weight else None
                    if piece.rewrites_input_of(other):
                        why = "reads the layer's input there, which the unmerged rewrite would change"
                elif attached[id(other)] > attached[id(piece)] and not (piece.additive and other.additive):
                    why = "is merged there after it and does not commute with it"
                elif piece.reads_weight and merged.index(other) > mine_at:
                    why = "was merged there after it, into the weight it reads"
                else:
                    why = None
                if why:
                    owner = next((d.name for d in store.deltas.values() if other in d._pieces()), "?")
                    advice = (
                        f"Unmerge {owner!r} first" if any(p is other for p in merged) else f"Detach {owner!r} first"
                    )
                    raise MergeError(
                        f"unmerging {self.name!r} at {site.host_path(piece)!r} would change the result: delta "
                        f"{owner!r} ({other.describe() or type(other).__name__}) {why}. {advice}; nothing was changed."
                    )

    def piece(self, key: str) -> Piece:
        """The piece at a site key (a module path, or a parameter path)."""
        return self.pieces[slot(key)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The delta's own tensors, keyed `<site key>.<tensor name>`, on CPU (merge copies excluded):
        what a save writes."""
        own = {f"{p.key}.{n}": t for p in self._pieces() for n, t in p.state_dict(keep_vars=True).items()}
        with whole(own.values()):  # (a ZeRO-3 partition holds its values only inside; so the clone)
            return {
                k: full(t).detach().to("cpu").contiguous().clone()
                if is_sharded(t)
                else t.detach().to("cpu").contiguous()
                for k, t in own.items()
            }

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into this delta's, checking every key and shape first (nothing is
        written unless all fit)."""
        expected = {f"{p.key}.{n}": t for p in self._pieces() for n, t in p.state_dict(keep_vars=True).items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise DeltaFileError(
                f"the saved tensors do not fit the delta: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        bad = [
            f"{k}: saved {tuple(tensors[k].shape)}, model needs {shape(t)}"
            for k, t in expected.items()
            if shape(t) != tuple(tensors[k].shape)
        ]
        if bad:
            raise DeltaFileError("shape mismatch between the saved delta and this model: " + "; ".join(bad[:5]))
        with torch.no_grad(), whole(expected.values(), modify=True):
            for key, target in expected.items():
                assign(target, tensors[key].to(target.device, target.dtype))

    def merged_copy(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A new full-precision model with this delta baked in; the model and the delta stay as
        they are. The usual QLoRA deployment: quantized layers of the copy become plain
        nn.Linear layers holding the dequantized weights, everything is cast to `dtype` (default:
        the dtype the delta computes in), and the delta is merged exactly. Other deltas on the
        model are left out of the copy."""
        self._check_attached("merged_copy")
        self._store().check_sites("merged_copy")
        dtype = dtype or next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        tensors = self.tensors()
        with torch.inference_mode(False):
            clone = copy.deepcopy(self._model)
            for other in list(deltas(clone).values())[::-1]:
                other._remove(restore_weights=True)
            dequantize_model(clone, dtype)
            twin = install(
                clone,
                self.config,
                self.name,
                self.sites,
                self.also_train,
                freeze_base=False,
                tensors={k: t.to(dtype) for k, t in tensors.items()},
                checked=True,  # (this delta's own tensors: no file to check against its config)
            )
            twin.merge_and_detach()
        return clone

    @_changes("merge_and_detach")
    def merge_and_detach(self) -> nn.Module:
        """Bake the delta into the weights for good (PEFT's merge_and_unload) and detach it.

        The model keeps the adapted weights and no trace of hookdelta's; returns the model.
        """
        self._check_attached("merge_and_detach")
        store = self._store()
        mine = set(map(id, self._pieces()))
        others = {p.key for p in self._pieces() for q, _ in store.sites[p.site_path].merged if id(q) not in mine}
        if others:
            raise DeltaStateError(
                f"other deltas are merged into the same layers ({sorted(others)[:3]}); unmerge them first "
                "so baking this one cannot be undone by theirs"
            )
        if not self.merged:
            self.merge(keep_original=False)
        model = self._model
        self._remove(restore_weights=False)
        return model

    @_changes("detach")
    def detach(self) -> None:
        """Remove the delta: weights, flags and hooks are exactly as before it was attached."""
        self._check_attached("detach")
        model = self._model
        self._remove(restore_weights=True)
        self.config.detached(model, self)

    def save(self, directory: Any, overwrite: bool = False) -> None:
        """Write the delta's tensors (safetensors) and description (JSON) to `directory`."""
        from .persistence import save_delta  # the facade's one call back up the layers (persistence imports delta)

        self._check_attached("save")
        self._store().check_sites("save")
        save_delta(self, directory, overwrite=overwrite)

    def save_peft(
        self, directory: Any, overwrite: bool = False, diffusers: str | bool = False, split_experts: bool = False
    ) -> None:
        """Write a LoRA or IA3 delta in PEFT's adapter format (`PeftModel.from_pretrained` loads it);
        a LoRA with `diffusers=True` as diffusers' `save_lora_adapter` writes it (`model.load_lora_adapter`
        loads it), with `diffusers="unet"` (a pipeline component) as `save_lora_weights` does
        (`pipe.load_lora_weights`). `split_experts=True`: a LoRA on fused experts one expert and
        projection at a time, under the checkpoint's names (the layout vLLM reads for Mixtral,
        Qwen3-MoE, OLMoE, ...)."""
        from .peft_format import save_peft  # the facade's one call back up the layers (peft_format imports delta)

        self._check_attached("save_peft")
        self._store().check_sites("save_peft")
        save_peft(self, directory, overwrite=overwrite, diffusers=diffusers, split_experts=split_experts)

    def as_lora(self, rank: int | None = None, tolerance: float | None = None, name: str | None = None) -> Delta:
        """This delta's weight change as a plain LoRA (truncated SVD per site, at `rank` or within
        `tolerance`), attached beside it; its `conversion` maps each site to (rank, relative error).
        See hookdelta/as_lora.py."""
        from .as_lora import as_lora  # (as_lora attaches: it sits above this module)

        self._check_attached("as_lora")
        return as_lora(self, rank=rank, tolerance=tolerance, name=name)

    def __enter__(self) -> Delta:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.attached:
            self.detach()

    # -- internals ---------------------------------------------------------------------

    def _pieces(self) -> list[Piece]:
        return list(self.pieces.values())

    def _store(self) -> DeltaStore:
        store = store_of(self._model)
        if store is None:
            raise DeltaStateError(f"delta {self.name!r} lost its model's store; was the model rebuilt?")
        return store

    def _check_attached(self, action: str) -> None:
        if not self.attached:
            raise DeltaStateError(
                f"delta {self.name!r} is detached; cannot {action}(). Attach a new one with hd.attach"
            )

    def _refresh(self) -> None:
        live = self.enabled and not self.merged
        for piece in self._pieces():
            piece.set_live(live)
        self._store().refresh(dict.fromkeys(p.site_path for p in self._pieces()))

    def _remove(self, restore_weights: bool) -> None:
        store = store_of(self._model)
        if store is None:
            self.attached = False
            return
        if restore_weights and self.merged:
            self.unmerge()
        store.remove(self._model, self)


# -- attach and friends -------------------------------------------------------------------


def attach(model: nn.Module, config: DeltaConfig, name: str | None = None, freeze_base: bool = True) -> Delta:
    """Attach a delta to `model` and return it, live. All or nothing: on any error the
    model is left exactly as it was.

    freeze_base sets requires_grad=False on the backbone (restored on detach).
    Use `with hd.attach(model, cfg) as d:` to detach again on exit. A sentence-transformers
    SentenceTransformer gets the delta on the transformers model inside it.
    """
    model = check_model(model)
    if not isinstance(config, DeltaConfig):
        raise ConfigError(f"attach() needs a delta config such as hd.LoRAConfig(...), got {type(config).__name__}")
    name = unique_name(model, name, config.method)
    train = also_train_paths(model, config.also_train) if config.also_train is not None else []
    sites = [k for k in config.select(model) if k not in set(train)]
    if not sites:
        raise SelectorError("every module the targets select is also in also_train; nothing is left to adapt")
    return install(model, config, name, sites, train, freeze_base)


def install(
    model: nn.Module,
    config: DeltaConfig,
    name: str,
    sites: list[str],
    train: list[str],
    freeze_base: bool,
    tensors: dict[str, Any] | None = None,
    uid: str | None = None,
    checked: bool = False,
    max_bytes: int | None = None,
) -> Delta:
    """Build the pieces for known sites, optionally fill in saved tensors, and hook them in.
    Saved tensors come from an untrusted file: unless `checked` (the caller compared the file's
    header already), the delta is first built on a meta copy of the model and its shapes compared
    with the tensors', so a config that disagrees with them allocates nothing (untrusted.Plan)."""
    if tensors is not None and not checked:
        from .untrusted import Plan

        Plan(model, config, sites, train).check(
            {k: tuple(t.shape) for k, t in tensors.items()}, "the saved delta", max_bytes
        )
    with torch.inference_mode(False):  # the delta's tensors must be normal, trainable tensors
        return _install(model, config, name, sites, train, freeze_base, tensors, uid)


def _install(
    model: nn.Module,
    config: DeltaConfig,
    name: str,
    sites: list[str],
    train: list[str],
    freeze_base: bool,
    tensors: dict[str, Any] | None,
    uid: str | None,
) -> Delta:
    _check_real(model, sites + train)
    # (a saved delta: data-driven inits make placeholders, the file holds the values)
    with inits.loading() if tensors is not None else contextlib.nullcontext():
        pieces = config.build(model, sites) + build_copies(model, train, tie=config.tie_also_train)
    for piece in pieces:
        _route(model, piece)
    delta = Delta(name, config, pieces, sites, train)
    if uid is not None:
        delta.uid = uid
    on_meta = [f"{p.key}.{n}" for p in pieces for n, t in p.state_dict(keep_vars=True).items() if t.is_meta]
    if on_meta:
        raise UnsupportedModuleError(
            f"the delta's tensors were created on the meta device ({on_meta[:3]}): attach() ran inside "
            "init_empty_weights() or a meta device context. Attach after the weights are loaded, outside it"
        )
    if tensors is not None:
        delta.load_tensors(tensors)
    delta.train(model.training)
    created = store_of(model) is None
    store = open_store(model)
    object.__setattr__(delta, "_model", model)
    try:
        with store.guard.changing("attach"):
            store.add(model, delta, freeze_base)
    except BaseException:
        if created and store_of(model) is store and not len(store.deltas):
            close_store(model)  # refused before anything was hooked in: leave no store behind
        raise
    config.attached(model, delta)
    return delta


def _check_real(model: nn.Module, keys: list[str]) -> None:
    """Refuse sites whose weights are on meta with no real values anywhere (not offloaded)."""
    for key in keys:
        path = module_path(model, key)
        module = model.get_submodule(path) if path else model
        if any(t.is_meta for t in module.parameters(recurse=False)) and offload_source(model, path) is None:
            raise UnsupportedModuleError(meta_message(path))


def _route(model: nn.Module, piece: Piece) -> None:
    """A piece on a layer whose weights an ancestor's code uses directly (nn.MultiheadAttention's
    out_proj, WavLM's attention) goes onto that ancestor and acts through the weights, swapped
    in for the ancestor's call: exact however the weights are used there. A piece that cannot
    act through weights is refused where the ancestor never calls the layer, and otherwise
    stays on the layer (the first forward then tells whether the weights were used without
    it, see probe.py). Weight-swapping pieces are refused on offloaded layers, whose weights
    accelerate replaces during the call."""
    bypass = bypassing_parent(model, piece.site_path)
    host_path = piece.site_path
    if bypass is not None:
        parent, child, always = bypass
        if piece.mergeable and piece.weight_path_exact and _weight_path_works(model, piece):
            piece.through, piece.site_path = child, parent
        elif always:
            why = (
                "its dropout acts on the layer's input, which never passes through the layer; set dropout=0"
                if piece.mergeable
                else "it is not a change of the weights"
            )
            raise UnsupportedModuleError(
                f"{piece.site_path!r} is the {child} of a {type(model.get_submodule(parent)).__name__}, which uses "
                f"its weights without calling its forward, so the delta can only act through the weights, and "
                f"{piece.describe() or type(piece).__name__} cannot: {why}, or exclude {piece.site_path!r}."
            )
    if piece.swapping() and offload_source(model, host_path) is not None:
        raise UnsupportedModuleError(
            f"{host_path!r} is offloaded by accelerate (its weights stay on meta and are copied in per call), so a "
            "delta that swaps its weights for the call cannot act there. Output-side deltas (LoRA on linear "
            "layers, adapters, IA3, BitFit) work on offloaded layers; load the model without offloading for this one"
        )


def _weight_path_works(model: nn.Module, piece: Piece) -> bool:
    """Whether the piece can be written as weights of its layer (BitFit cannot where the layer
    has no bias of its own)."""
    try:
        with torch.no_grad():
            piece.weight_values(model.get_submodule(piece.site_path))
        return True
    except MergeError:
        return False


def _site_tensors(store: DeltaStore, piece: Piece) -> list[torch.Tensor]:
    """The tensors a merge at the piece's site reads or writes: the layer's, and those of every
    piece there (an unmerge redoes later merges at the same site)."""
    site = store.sites[piece.site_path]
    return [*site.module.parameters(), *(t for p in site.pieces for t in p.parameters())]


def set_active(model: nn.Module, *names: str) -> None:
    """Run exactly the named deltas, like PEFT's set_adapter: enable them and disable every
    other unmerged delta, with one hook update per layer, so switching among loaded deltas
    costs microseconds per layer. Merged deltas must be among `names` (unmerge them first).
    PEFT's spelling, one list of names (`set_active(model, ["a", "b"])`), works too."""
    model = host(model)
    found = deltas(model)
    if len(names) == 1 and isinstance(names[0], (list, tuple)):
        names = tuple(names[0])
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise DeltaStateError(f"set_active takes delta names (strings), got {odd[0]!r}; its deltas are {list(found)}")
    unknown = [n for n in names if n not in found]
    if unknown:
        raise DeltaStateError(f"the model has no delta named {unknown}; its deltas are {list(found)}")
    merged = [n for n, d in found.items() if d.merged and n not in names]
    if merged:
        raise DeltaStateError(f"deltas {merged} are merged into the weights; unmerge() them before switching away")
    store = store_of(model)
    if store is None:
        return
    with store.guard.changing("set_active"):
        for name, delta in found.items():
            if not delta.merged:
                delta.enabled = name in names
                for piece in delta._pieces():
                    piece.set_live(delta.enabled)
        store.refresh()


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None], keep: Sequence[str] | str | None = None) -> Iterator[None]:
    """Run each row of the batch with its own delta: `names` has one delta name (or None for
    the base model) per row. Inside the block every forward and generate() routes (rows that
    generate() repeats for beams or returned sequences follow their row); deltas not named
    are off, except those in `keep`, which act on every row. Lifecycle changes wait until the
    block ends. `model(**inputs, adapter_names=[...])` routes a single call the same way."""
    model = check_model(model)
    store = store_of(model)
    if store is None:
        raise DeltaStateError("hd.route: the model has no deltas attached")
    store.start_routing(model, names, keep)
    try:
        yield
    finally:
        store.stop_routing()


def deltas(model: nn.Module) -> dict[str, Delta]:
    """The deltas attached to `model`, by name, in attach order."""
    return deltas_of(model)


class include_in_state_dict:
    """Opt in to the deltas in `model.state_dict()` / `load_state_dict()`, for frameworks that
    checkpoint through the state dict (Lightning, DeepSpeed, torch.distributed.checkpoint).

    `hd.include_in_state_dict(model)` switches it on for good; `with hd.include_in_state_dict(model):`
    only for the block. The deltas' tensors appear under the reserved `_hookdelta.` prefix, so
    a checkpoint written this way loads (strict) into a model with the same deltas attached.
    """

    def __init__(self, model: nn.Module, on: bool = True) -> None:
        store = store_of(host(model))
        if store is None:
            raise DeltaStateError("the model has no deltas attached; attach them before opting their tensors in")
        self.store, self.was = store, store.include_in_state_dict
        store.include_in_state_dict = on

    def __enter__(self) -> include_in_state_dict:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.store.include_in_state_dict = self.was
