"""The base of every delta config: a frozen, validated dataclass that round-trips through JSON.

A method's config subclasses `DeltaConfig`, sets `method`, validates its own fields in
`validate()` and builds its per-site pieces in `build()`. Configs hold data only; the
hook engine never sees them. A method also owns its formats: `portable()` writes the config
for `delta.json`, and a `PeftCodec` (the class attribute `peft_codec`) maps its deltas to and
from PEFT's adapter files; persistence.py and peft_format.py only dispatch to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .engine import Piece
from .errors import ConfigError, DeltaFileError, UnsupportedModuleError
from .modules import is_conv1d, resolve_site
from .selection import match, match_defaults, place_expert_sites

# A selector: a name suffix / glob / "re:" regex string, a module type, a predicate
# (name, module) -> bool, or a list of these.
Selector = str | type | Callable[[str, nn.Module], bool] | Sequence[Any]

_REGISTRY: dict[str, type[DeltaConfig]] = {}


@dataclass(frozen=True, kw_only=True)
class DeltaConfig:
    """Fields every delta method shares: where it goes and what else is trained in full."""

    targets: Selector | None = None
    exclude: Selector | None = None
    layers: Sequence[int] | None = None
    also_train: Selector | None = None
    # a parameter of an also_train module that another module shares (a tied output head): one
    # trained copy both use (True), or PEFT's modules_to_save behaviour, a copy used at the named
    # module only, which then cannot be merged into the shared tensor (False)
    tie_also_train: bool = True

    method: ClassVar[str] = ""
    # semantic layer names (see roles.py) used when `targets` is None
    default_targets: ClassVar[tuple[str, ...]] = ()
    # what a fused-experts tensor among the sites means to this method (selection.place_expert_sites):
    # "parameter" (adapted per expert), "block" (acts on outputs: the mixture block's) or "" (refused)
    expert_sites: ClassVar[str] = ""
    # how this method's deltas map to and from PEFT's adapter files (None: PEFT has no such file)
    peft_codec: ClassVar[PeftCodec | None] = None
    # fields a hot-swap (hd.load(into=...)) takes from the file besides the tensors: any other field
    # that differs between the file and the live delta is refused (where it goes is compared as sites)
    hot_swappable: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _REGISTRY[cls.method] = cls

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "also_train"):
            object.__setattr__(self, name, normalize_selector(name, getattr(self, name)))
        check_bool(self, "tie_also_train")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            try:
                layers = tuple(layers)
            except TypeError:
                raise ConfigError(f"layers must be a list or range of block indices, got {self.layers!r}") from None
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ConfigError(
                    f"layers must be a non-empty list of block indices >= 0 (e.g. [0, 1] or range(6, 12)), got {self.layers!r}"
                )
            object.__setattr__(self, "layers", layers)
        self.validate()

    def validate(self) -> None:
        """Check the method's own fields; raise ConfigError naming the field on a bad value."""

    def select(self, model: nn.Module) -> list[str]:
        """The site paths this config adapts on `model` (its targets, or the method's defaults)."""
        if self.targets is not None:
            sites = match(model, self.targets, self.exclude, self.layers)
        else:
            sites = match_defaults(model, self.target_selectors(model), self.exclude, self.layers, type(self).__name__)
        return place_expert_sites(model, sites, self.expert_sites, type(self).__name__)

    def target_selectors(self, model: nn.Module | None = None) -> Any:
        if self.targets is not None:
            return self.targets
        if not self.default_targets:
            raise ConfigError(f"{type(self).__name__} has no default positions; pass targets=[...]")
        return self.default_targets

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        """Create the method's pieces for the selected module paths (nothing is attached yet)."""
        raise NotImplementedError

    def attached(self, model: nn.Module, delta: Any) -> None:
        """Called once the delta is hooked in (composition blocks disable their sources here)."""

    def detached(self, model: nn.Module, delta: Any) -> None:
        """Called once the delta is removed (blocks enable their sources again)."""

    def portable(self, delta: Any) -> dict[str, Any]:
        """The config as `delta.json` stores it. Callable selectors cannot be written, so they
        become the exact sites the delta has (a method with selectors of its own, such as
        LoRA's target_parameters, extends this)."""
        data = self.to_dict()
        if has_callable(data):
            modules = [k for k in delta.sites if resolve_site(delta.model, k)[1] is None]
            data.update(
                targets=[exact(k) for k in modules] or None,
                exclude=None,
                layers=None,
                also_train=[exact(k) for k in delta.also_train] or None,
            )
        return data

    # -- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: `{"method": ..., field: value}`; types become import paths."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _to_json(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def registered() -> dict[str, type[DeltaConfig]]:
        """method name -> config class, for every method defined."""
        return dict(_REGISTRY)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DeltaConfig:
        """Rebuild a config saved by `to_dict`, validating every field again."""
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError("a saved config must be a JSON object with a 'method' field")
        method = data["method"]
        cls = _REGISTRY.get(method) if isinstance(method, str) else None
        if cls is None:
            raise ConfigError(f"unknown delta method {method!r}; known: {sorted(_REGISTRY)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"method"})
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(names)}")
        kwargs = {k: _from_json(v) for k, v in data.items() if k != "method"}
        return cls(**kwargs)

    @staticmethod
    def from_json(text: str) -> DeltaConfig:
        return DeltaConfig.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class PeftCodec:
    """How one PEFT `peft_type` maps to a hookdelta method and back. A method module defines a
    subclass and sets it as its config's `peft_codec`; peft_format.py reads and writes the
    files, fits module paths, handles modules_to_save, and asks the codec for the rest.

    Reading: `place` names the module path and our tensor name of each tensor key (after the
    prefix), `to_config` turns PEFT's config and the placed tensors into a config and our
    tensors. Writing: `from_delta` gives PEFT's config fields and tensors (keys without prefix).
    """

    peft_type: ClassVar[str] = ""
    understood: ClassVar[frozenset[str]] = frozenset()  # PEFT config fields it reads
    prefix: ClassVar[str] = "base_model.model."  # PEFT's key prefix: a tuner wraps the model
    suffixes: ClassVar[dict[str, str]] = {}  # PEFT tensor name at the end of a key -> ours
    fits_paths: ClassVar[bool] = True  # place() gives module paths as saved (to fit onto the model)

    # tensors of the whole adapter rather than of one site (VeRA's shared projections), as they
    # are keyed in the file: load_peft hands them to to_config in peft_config["__shared__"]
    shared_keys: ClassVar[frozenset[str]] = frozenset()

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        """Values of understood fields this method cannot load (named in the error)."""
        return []

    def place(self, model: nn.Module, key: str) -> tuple[str, str] | None:
        """(module path, our tensor name) of a tensor key, or None when it is not this method's."""
        for suffix, ours in self.suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], ours
        return None

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        """(config, tensors keyed `<site>.<name>`) for the sites in `named`; `common` holds the
        also_train fields every config takes."""
        raise NotImplementedError

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(PEFT config fields, tensors keyed as PEFT names them, without the prefix)."""
        raise NotImplementedError

    def file_key(self, key: str) -> str:
        """The key a tensor from `from_delta` gets in the file."""
        return self.prefix + key

    @staticmethod
    def flat(named: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Placed tensors {site: {name: t}} as a delta holds them: {"<site>.<name>": t}."""
        return {f"{s}.{n}": t for s, ts in named.items() for n, t in ts.items()}

    @staticmethod
    def piece_tensors(pieces: Sequence[Piece]) -> dict[str, torch.Tensor]:
        """The pieces' saved tensors keyed "<site>.<name>", where PEFT's names are the pieces'."""
        return {f"{p.key}.{n}": t.detach().contiguous() for p in pieces for n, t in p.state_dict().items()}

    @staticmethod
    def refuse_bias(peft_config: dict[str, Any]) -> list[str]:
        """PEFT's bias="all" / "<method>_only" trains the base layers' biases: not loaded."""
        return [f"bias={peft_config['bias']!r}"] if peft_config.get("bias", "none") != "none" else []

    @staticmethod
    def refuse_conv1d(delta: Any, pieces: list[Piece]) -> None:
        """Methods whose PEFT layers do not take transformers' Conv1D (GPT-2): PEFT could not
        load the file, so it is not written."""
        odd = [p.key for p in pieces if getattr(p, "conv1d", False)]
        if odd:
            raise UnsupportedModuleError(
                f"PEFT's {delta.config.method} cannot adapt transformers Conv1D layers such as {odd[0]!r}, so it "
                "could not load this file; save it with delta.save() instead"
            )

    @staticmethod
    def tuner_fields(delta: Any, pieces: Sequence[Piece], layout: bool = True) -> dict[str, Any]:
        """The fields PEFT tuner configs (LoRA, IA3) have: target modules and, unless `layout` is
        False (configs without the field), fan_in_fan_out."""
        fields: dict[str, Any] = {"target_modules": [p.key for p in pieces]}
        if layout:
            fields["fan_in_fan_out"] = any(is_conv1d(delta.model.get_submodule(p.key)) for p in pieces)
        return fields


# -- field checks shared by the methods ---------------------------------------------------


def check_int(cfg: DeltaConfig, name: str, *, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


# the largest alpha a config takes: alpha / r scales the update, and far beyond this it overflows
# half precision (and float32 at 1e38) at the first forward instead of at the load
MAX_ALPHA = 1e6


def check_float(
    cfg: DeltaConfig, name: str, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True
) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{type(cfg).__name__}.{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


def check_bool(cfg: DeltaConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be True or False, got {value!r}")


def exact(path: str) -> str:
    """A selector that matches exactly this path."""
    return f"re:{re.escape(path)}"


def has_callable(data: dict[str, Any]) -> bool:
    """Whether a config's dict (to_dict) holds a callable selector, which JSON cannot hold."""
    values = [v for f in data.values() for v in (f if isinstance(f, list) else [f])]
    return any(isinstance(v, dict) and "callable" in v for v in values)


def pattern_value(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the value of the first regex the key's path
    ends with (a whole dotted component), else the default."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", key):
            return value
    return default


def file_rank(peft_config: dict[str, Any], ranks: dict[str, int], default: int) -> int:
    """A PEFT file's `r`, checked against the ranks its tensors have (`ranks`: site -> rank): each
    site's rank must be what `r` and the file's `rank_pattern` say (PEFT's rule). A file whose
    tensors say otherwise is refused, never fitted: its scale (alpha / r) would silently be wrong."""
    r = peft_config.get("r", default)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise DeltaFileError(f"adapter_config.json: r must be a whole number >= 1, got {r!r}")
    patterns = peft_config.get("rank_pattern")
    for site, rank in ranks.items():
        want = pattern_value(patterns, site, r)
        if rank != want:
            said = f"rank_pattern gives {want}" if want != r else f"r={r}"
            raise DeltaFileError(
                f"adapter_config.json says {said} for {site!r}, but its tensors have rank {rank}; "
                "the config and the tensors disagree (edited by hand?), so the adapter's scale "
                "would be wrong. Fix r (or rank_pattern) in the config"
            )
    return r


def after_dot_pattern(path: str) -> str:
    """A pattern key naming one layer under the rule of PEFT's FourierFT and C3A (a regex matched
    after a dot at the end of the path): the escaped path without its first component."""
    return re.escape(path.partition(".")[2] or path)


def check_patterns(
    cfg: DeltaConfig, fields: Sequence[tuple[str, bool]] = (("rank_pattern", True), ("alpha_pattern", False))
) -> None:
    """PEFT's per-layer pattern fields, {regex: positive int} (integer) or {regex: positive number}:
    rank_pattern and alpha_pattern unless `fields` names others (FourierFT's n_frequency_pattern)."""
    for name, integer in fields:
        patterns = getattr(cfg, name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ConfigError(f"{type(cfg).__name__}.{name} must be a dict {{regex: value}}, got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError):
                raise ConfigError(f"{type(cfg).__name__}.{name} key {pattern!r} is not a valid regex") from None
            ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
            if isinstance(value, bool) or not ok or value <= 0 or not integer and value > MAX_ALPHA:
                raise ConfigError(
                    f"{type(cfg).__name__}.{name}[{pattern!r}] must be a positive "
                    f"{'integer' if integer else f'number up to {MAX_ALPHA:g}'}, got {value!r}"
                )


def check_choice(cfg: DeltaConfig, name: str, choices: Sequence[Any]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{type(cfg).__name__}.{name} must be one of {list(choices)}, got {value!r}")


# -- selectors -----------------------------------------------------------------------------


def normalize_selector(field: str, value: Any) -> Any:
    """Lists become tuples (the dataclass is frozen); anything that is not a selector is refused."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
    if not items:
        raise ConfigError(f"{field} is an empty list; give at least one selector or leave it None")
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise ConfigError(f"{field} contains an empty string selector")
        elif not (isinstance(item, type) or callable(item)):
            raise ConfigError(
                f"{field} entry {item!r} is not a selector: use a name suffix, a glob, 're:<regex>', "
                "a module type, 'all-linear' or a callable (name, module) -> bool"
            )
    return tuple(items) if isinstance(value, (list, tuple, set, frozenset)) else value


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, type):
        return {"type": f"{value.__module__}.{value.__qualname__}"}
    if callable(value):
        return {"callable": getattr(value, "__qualname__", repr(value))}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict) and set(value) == {"type"}:
        # a module type named in a file: looked up among the modules already imported (a file must
        # not make Python import anything), and only a class of torch.nn.Module is taken
        where = value["type"]
        module, _, name = where.rpartition(".") if isinstance(where, str) else ("", "", "")
        obj: Any = sys.modules.get(module)
        for part in name.split(".") if obj is not None else []:
            obj = getattr(obj, part, None)
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise ConfigError(
                f"the saved config names the module type {str(where)[:80]!r}, which is not an "
                "nn.Module class of a module imported here; import the library that defines it first"
            )
        return obj
    if isinstance(value, dict) and set(value) == {"callable"}:
        raise ConfigError(
            f"the saved config used a callable selector ({value['callable']}), which cannot be "
            "restored from JSON; pass explicit targets instead"
        )
    return value
