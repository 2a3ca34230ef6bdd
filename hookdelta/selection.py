"""Turning selectors into module (or parameter) paths: `hd.match` and its helpers.

A selector is a dotted-name suffix ("q_proj", "attention.self.query"), a glob over dotted
paths ("layers.*.mlp.*_proj"), a regex ("re:.*\\.(q|v)_proj"), a module type (nn.Linear),
"all-linear", a semantic layer name ("attn.q", "ffn.out", "norm"; see roles.py), a
callable (name, module) -> bool, or a list of these.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.nn as nn

from .errors import ConfigError, DeltaFileError, PathPrefixWarning, SelectorError, UnsupportedModuleError
from .modules import block_index, exists, host, is_internal, is_linear_like, named_modules, resolve_site
from .roles import discover, expand, is_semantic

# children of a model that are its task head (excluded from "all-linear", like the output embedding)
HEAD_NAMES = ("classifier", "score", "head", "heads", "fc", "lm_head", "qa_outputs")
# packages whose layers wrap a model's own (another adapter library): never selected by type
FOREIGN_PACKAGES = ("peft.", "adapters.")


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head, of linear layers whose weight is tied to an embedding, and of
    the linear layers in a task head (a child named classifier / score / head / fc / ... of the
    model or of a transformers model inside it)."""
    heads: set[str] = set()
    roots = [("", model)] + [(n, m) for n, m in named_modules(model) if hasattr(m, "base_model_prefix")]
    for root, module in roots:
        for child in HEAD_NAMES:
            found = module._modules.get(child)
            if found is not None:
                top = f"{root}.{child}" if root else child
                heads.update(n for n, m in found.named_modules(prefix=top) if is_linear_like(m))
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 (models raise NotImplementedError, AttributeError, ... here)
            head = None
    embedding_weights = {id(m.weight) for _, m in named_modules(model) if isinstance(m, nn.Embedding)}
    for name, module in named_modules(model):
        if module is head or (is_linear_like(module) and id(getattr(module, "weight", None)) in embedding_weights):
            heads.add(name)
    return heads


def _hits(selector: Any, name: str, module: nn.Module | None, heads: set[str]) -> bool:
    if isinstance(selector, str):
        if selector == "all-linear":
            return module is not None and is_linear_like(module) and name not in heads
        if selector.startswith("re:"):
            return re.fullmatch(selector[3:], name) is not None
        if any(c in selector for c in "*?["):
            return fnmatch.fnmatchcase(name, selector) or fnmatch.fnmatchcase(name, "*." + selector)
        return name == selector or name.endswith("." + selector)
    if isinstance(selector, type):
        return module is not None and isinstance(module, selector)
    try:
        return bool(selector(name, module))
    except Exception as exc:
        raise SelectorError(f"the selector callable {selector!r} raised on {name!r}: {exc!r}") from exc


def _as_list(selectors: Any) -> list[Any]:
    if selectors is None:
        return []
    if isinstance(selectors, (list, tuple, set, frozenset)):
        return list(selectors)
    return [selectors]


def _describe(selector: Any) -> str:
    if isinstance(selector, type) or callable(selector):
        return getattr(selector, "__name__", repr(selector))
    return repr(selector)


def _suggest(selector: Any, names: Sequence[str]) -> str:
    if not isinstance(selector, str):
        return ""
    key = selector[3:] if selector.startswith("re:") else selector
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    close += [c for c in difflib.get_close_matches(key, names, n=3, cutoff=0.5) if c not in close]
    if not close:
        close = leaves[:8]
    return " Closest module names: " + ", ".join(close) + "."


def foreign_layers(model: nn.Module) -> dict[str, str]:
    """Paths inside another adapter library's layers (PEFT's LoRA wrappers, AdapterHub modules)
    -> the wrapping layer's path. Their `base_layer` is the model's own layer, not theirs."""
    out: dict[str, str] = {}
    roots: list[str] = []
    for path, module in named_modules(model):
        inside = next((r for r in roots if path.startswith(r + ".")), None)
        if inside is not None and not path.startswith(inside + ".base_layer"):
            out[path] = inside
        elif inside is None and type(module).__module__.startswith(FOREIGN_PACKAGES):
            out[path] = path
            roots.append(path)
    return out


def _foreign_error(model: nn.Module, path: str, layer: str) -> UnsupportedModuleError:
    kind = type(model.get_submodule(layer))
    inner = (
        f" (the model's own layer is at {layer + '.base_layer'!r})"
        if hasattr(model.get_submodule(layer), "base_layer")
        else ""
    )
    return UnsupportedModuleError(
        f"{path!r} belongs to a {kind.__module__}.{kind.__qualname__} layer of another adapter library "
        f"at {layer!r}: the model already carries that library's adapter{inner}. hookdelta does not adapt another "
        "library's internals; target the model's own layer, or remove the other adapter first (PEFT: "
        "merge_and_unload() or unload(); transformers: delete_adapter())"
    )


def _select(
    entries: list[tuple[str, nn.Module | None]],
    targets: Any,
    exclude: Any,
    layers: Iterable[int] | None,
    heads: set[str],
    what: str,
    model: nn.Module,
) -> list[str]:
    names = [n for n, _ in entries]
    selectors = _as_list(targets)
    if not selectors:
        raise ConfigError(f"no targets given: name the {what}s to adapt (e.g. targets=['q_proj', 'v_proj'])")
    foreign = (
        foreign_layers(model)
        if any(type(m).__module__.startswith(FOREIGN_PACKAGES) for _, m in entries if m is not None)
        else {}
    )
    chosen: dict[str, None] = {}
    known = set(names)
    for sel in selectors:
        alternatives = expand(model, sel) if is_semantic(sel) else [sel]
        hit = [n for n, m in entries if any(_hits(s, n, m, heads) for s in alternatives)]
        if is_semantic(sel) and what == "module":  # fused experts: a role may name parameters (roles.py)
            hit += [a for a in alternatives if isinstance(a, str) and a not in known and exists(model, a)]
        if foreign:
            named = [
                n for n in hit if n in foreign and any(isinstance(s, str) and s != "all-linear" for s in alternatives)
            ]
            if named:
                raise _foreign_error(model, named[0], foreign[named[0]])
            hit = [n for n in hit if n not in foreign]
        if not hit:
            meaning = f" (on this model: {[_describe(s) for s in alternatives]})" if is_semantic(sel) else ""
            raise SelectorError(
                f"target selector {_describe(sel)}{meaning} matched no {what} of {type(model).__name__}."
                + _suggest(sel, names)
                + " Use hd.match(model, targets) to try selectors without attaching."
            )
        chosen.update(dict.fromkeys(hit))
    excluded = [s for e in _as_list(exclude) for s in (expand(model, e) if is_semantic(e) else [e])]
    if excluded:
        by_name = dict(entries)
        chosen = {n: None for n in chosen if not any(_hits(s, n, by_name.get(n), heads) for s in excluded)}
    if layers is not None:
        wanted = set(layers)
        chosen = {n: None for n in chosen if block_index(n) in wanted}
    chosen = dict.fromkeys(model_order(model, chosen, names))  # model order, not selector order
    if not chosen:
        raise SelectorError(
            f"targets {_describe(targets)} matched {what}s, but exclude={_describe(exclude)} and "
            f"layers={list(layers) if layers is not None else None} removed them all; loosen one of them"
        )
    return list(chosen)


def match(model: nn.Module, targets: Any, exclude: Any = None, layers: Iterable[int] | None = None) -> list[str]:
    """Dry run: the module paths that `targets` selects (minus `exclude`, within `layers`).

    Raises SelectorError naming the selector and the closest module names when one matches nothing.
    """
    model = host(model)
    entries: list[tuple[str, nn.Module | None]] = list(named_modules(model))
    layers = list(layers) if layers is not None else None
    return _select(entries, targets, exclude, layers, output_head_paths(model), "module", model)


def match_defaults(
    model: nn.Module,
    selectors: Any,
    exclude: Any = None,
    layers: Iterable[int] | None = None,
    owner: str = "the method",
) -> list[str]:
    """A method's default positions: each selector that matches counts (a mixture-of-experts
    model has no feed-forward layer modules, a conv net no linear layer but its head); only
    none matching at all is an error, which names what each one said."""
    found: dict[str, None] = {}
    why: list[str] = []
    for selector in _as_list(selectors):
        try:
            found.update(dict.fromkeys(match(model, selector, exclude, layers)))
        except SelectorError as exc:
            why.append(str(exc))
    if not found:
        raise SelectorError(
            f"{owner}'s default positions {list(_as_list(selectors))} matched nothing in "
            f"{type(model).__name__}: " + " / ".join(dict.fromkeys(why))
        )
    return model_order(model, found)


def model_order(model: nn.Module, paths: Iterable[str], names: Sequence[str] | None = None) -> list[str]:
    """Module (and parameter) paths in the model's order (`names`, else its modules'), each
    parameter right after the module that holds it, in the order the module registered them."""
    order = {n: i for i, n in enumerate(names if names is not None else [n for n, _ in model.named_modules()])}

    def key(path: str) -> tuple[int, int]:
        if path in order:
            return order[path], -1
        owner, _, name = path.rpartition(".")
        return order.get(owner, len(order)), list(model.get_submodule(owner)._parameters).index(name)

    return sorted(dict.fromkeys(paths), key=key)


def place_expert_sites(model: nn.Module, sites: list[str], how: str, owner: str) -> list[str]:
    """What a method does with fused-experts tensors among its sites (roles such as ffn.out name
    them on mixture-of-experts layers): `how` = "parameter" keeps them (the method adapts each
    expert's matrix), "block" puts an ffn.out tensor's site on its mixture block (the method acts
    on outputs, and the feed-forward's output is the block's), "" refuses them, saying why."""
    if all(resolve_site(model, k)[1] is None for k in sites):
        return sites
    found = discover(model)
    mixtures = found.get("ffn", [])
    out: list[str] = []
    for key in sites:
        if resolve_site(model, key)[1] is None or how == "parameter":
            out.append(key)
            continue
        block = next((m for m in mixtures if key.startswith(m + ".")), None)
        if how == "block" and block is not None and key in found.get("ffn.out", []):
            out.append(block)
            continue
        raise UnsupportedModuleError(
            f"{key!r} is a fused experts tensor (every expert's matrix in one parameter, as transformers 5 keeps "
            f"mixture-of-experts layers); {owner} adapts layers, not such tensors. LoRA (also with use_dora=True) and "
            "IA3 adapt it per expert"
            + (f"; a method acting on outputs can take the whole mixture block {block!r} (role 'ffn')" if block else "")
            + ". Narrow the targets (exclude=...)"
        )
    return model_order(model, out)


def match_parameters(
    model: nn.Module, targets: Any, exclude: Any = None, layers: Iterable[int] | None = None
) -> list[str]:
    """Like `match`, over parameter paths ("mlp.experts.gate_up_proj"); tied copies appear once."""
    entries: list[tuple[str, nn.Module | None]] = [(n, None) for n, _ in model.named_parameters() if not is_internal(n)]
    layers = list(layers) if layers is not None else None
    return _select(entries, targets, exclude, layers, set(), "parameter", model)


def fit_paths(model: nn.Module, paths: list[str], source: Any) -> Callable[[str], str]:
    """A function mapping saved module/parameter paths onto this model: as they are, or
    without / with the model's wrapper prefix (a delta trained on `BertModel` loaded onto
    `BertForMaskedLM`, or the reverse), with a warning when a prefix was needed. Refuses
    (DeltaFileError naming the paths) when no mapping fits all of them."""
    candidates: list[tuple[str, Callable[[str], str | None]]] = [("as saved", lambda p: p)]
    prefix = getattr(model, "base_model_prefix", "") or ""
    first = {p.split(".", 1)[0] for p in paths}

    def without(cut: str) -> Callable[[str], str | None]:
        return lambda p: p[len(cut) + 1 :] if p.startswith(cut + ".") else None

    for cut in sorted(first | ({prefix} if prefix else set())):
        candidates.append((f"without the '{cut}.' prefix", without(cut)))
    if prefix:
        candidates.append((f"with the '{prefix}.' prefix", lambda p: f"{prefix}.{p}"))
    for how, fix in candidates:
        mapped = {p: fix(p) for p in paths}
        if all(m is not None and exists(model, m) for m in mapped.values()):
            if how != "as saved":
                warnings.warn(
                    f"the delta in {source} names modules of a differently wrapped model; "
                    f"matched them {how} (e.g. {paths[0]!r} -> {mapped[paths[0]]!r})",
                    PathPrefixWarning,
                    stacklevel=3,
                )
            found = fix
            return lambda p: found(p) or p
    missing = [p for p in paths if not exists(model, p)]
    raise DeltaFileError(
        f"the delta in {source} does not fit this {type(model).__name__}: no module at {missing[:5]}"
        + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        + "; nothing was attached"
    )
