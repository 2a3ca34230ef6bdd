"""Saving and loading deltas: `delta.safetensors` (the delta's tensors only, keyed by
module path + tensor name) and `delta.json` (format version, config, sites, shapes and a
fingerprint of the base weights). No pickle anywhere; writes are atomic; a load checks
everything before it touches the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import untrusted
from .config import DeltaConfig
from .delta import deltas, install
from .errors import BaseWeightsMismatchWarning, ConfigError, DeltaFileError, HookdeltaError
from .hotswap import swap_in, swap_target
from .modules import resolve_site
from .placement import kept_name, real_weight
from .selection import fit_paths
from .sharding import full, shape, whole, writes_files
from .store import check_model, unique_name
from .version import VERSION

FORMAT_VERSION = 1
META_FIELDS = {
    "format",
    "format_version",
    "hookdelta_version",
    "name",
    "method",
    "config",
    "sites",
    "also_train",
    "backbone",
    "base_shapes",
    "fingerprint",
    "tensors",
    "save_id",
    "delta_id",
}
CONFIG_FILE = "delta.json"
TENSOR_FILE = "delta.safetensors"


# -- saving ---------------------------------------------------------------------------------


def save_delta(delta: Any, directory: str | os.PathLike, overwrite: bool = False) -> None:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DeltaFileError(f"cannot save delta {delta.name!r}: {directory} exists and is not a directory")
    existing = directory / CONFIG_FILE
    if existing.exists() and not overwrite:
        try:
            other = json.loads(existing.read_text())
        except (OSError, ValueError):
            other = {}
        other = other if isinstance(other, dict) else {}
        if other.get("delta_id") != delta.uid:  # saving again (a checkpoint loop) is fine; another delta is not
            raise DeltaFileError(
                f"{directory} already holds another delta ({other.get('name', '?')!r}, saved by a different delta "
                "than this one, even if the names match); pass overwrite=True to replace it, or choose another "
                "directory"
            )
    model = delta.model
    meta = {
        "format": "hookdelta",
        "format_version": FORMAT_VERSION,
        "hookdelta_version": VERSION,
        "name": delta.name,
        "delta_id": delta.uid,
        "method": delta.method,
        "config": delta.config.portable(delta),
        "sites": delta.sites,
        "also_train": delta.also_train,
        "backbone": type(model).__name__,
        "base_shapes": {},
        "fingerprint": {},
    }
    for key in delta.sites:  # (one base weight gathered at a time where it is sharded)
        base = _base_tensor(delta, model, key)
        meta["base_shapes"][key], meta["fingerprint"][key] = list(shape(base)), _whole_fingerprint(base)
    tensors = delta.tensors()
    if not writes_files(delta.parameters()):
        return  # a collective save of sharded tensors: rank 0 writes
    meta["tensors"] = {
        k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for k, t in tensors.items()
    }
    meta["save_id"] = uuid.uuid4().hex  # ties the two files of one save together
    write_files(
        directory,
        [
            (
                TENSOR_FILE,
                lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "save_id": meta["save_id"]}),
            ),
            (CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2))),
        ],
    )


def write_files(directory: Path, files: list[tuple[str, Callable[[Path], Any]]]) -> None:
    """Write a set of files so a crash at any point leaves the previous complete set or the new
    one, never a mix: every file is written in full to a temporary name first (a failure there
    changes nothing), the old files are kept as hard-linked `.NAME.prev` backups, then the files
    are renamed into place; the last one (the config) is the commit point. A failure the
    filesystem reports (read-only, full, a path through a file) is a DeltaFileError."""
    try:
        _write_files(directory, files)
    except (OSError, SafetensorError) as exc:
        raise DeltaFileError(
            f"cannot write to {directory}: {exc} ({type(exc).__name__}); the files that were there are unchanged"
        ) from exc


def _write_files(directory: Path, files: list[tuple[str, Callable[[Path], Any]]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = {name: directory / f".{name}.tmp-{os.getpid()}" for name, _ in files}
    backups: list[Path] = []
    renamed = 0
    try:
        for name, write in files:
            write(tmp[name])
        for name, _ in files[:-1]:
            if (directory / name).exists():
                backup = directory / f".{name}.prev"
                backup.unlink(missing_ok=True)
                try:
                    os.link(directory / name, backup)  # no copy: the old bytes get a second name
                except OSError:  # a filesystem without hard links
                    shutil.copy2(directory / name, backup)
                backups.append(backup)
        for name, _ in files:
            os.replace(tmp[name], directory / name)
            renamed += 1
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if renamed in (0, len(files)):  # nothing replaced, or all: the backups are not needed
            for backup in backups:
                backup.unlink(missing_ok=True)


def _base_tensor(delta: Any, model: nn.Module, key: str) -> torch.Tensor:
    """The base weight a site adapts, as it was before any merge of this delta (empty when
    the site has no weight of its own, e.g. a whole MLP block)."""
    name = resolve_site(model, key)[1] or "weight"
    piece = delta.piece(key)
    original = piece._buffers.get(kept_name(name))
    weight = _weight(model, key)
    return original if original is not None and original.shape == weight.shape else weight


def fingerprint(tensor: torch.Tensor) -> float:
    """A cheap summary of a weight: the sum of a strided sample of at most 4096 entries."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    return float(flat[::step].double().sum())


# -- loading --------------------------------------------------------------------------------


def read_json(directory: str | os.PathLike, name: str, what: str) -> Any:
    """The JSON file `name` in `directory`, or a DeltaFileError saying what is missing or broken."""
    path = Path(directory) / name
    if not Path(directory).is_dir():
        raise DeltaFileError(f"no {what} at {directory}: not a directory")
    if not path.is_file():
        raise DeltaFileError(f"no {what} at {directory}: {name} is missing")
    return untrusted.read_json(path, what)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    meta = read_json(directory, CONFIG_FILE, "saved delta")
    if not isinstance(meta, dict) or meta.get("format") != "hookdelta":
        raise DeltaFileError(f"{path} is not a hookdelta delta description")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaFileError(
            f"{path} has format version {version!r}; this hookdelta ({VERSION}) reads version "
            f"{FORMAT_VERSION}. Upgrade hookdelta or re-save the delta."
        )
    for field in ("name", "config", "sites", "also_train", "tensors"):
        if field not in meta:
            raise DeltaFileError(f"{path} lacks the field {field!r}; the save is corrupt")
    unknown = sorted(set(meta) - META_FIELDS)
    if unknown:
        raise DeltaFileError(
            f"{path} has fields this hookdelta does not know: {unknown}; it was written by "
            "another tool or edited by hand. Remove them, or upgrade hookdelta."
        )
    _check_types(meta, path)
    return meta


def _check_types(meta: dict[str, Any], path: Any) -> None:
    """Every field of delta.json has the type a save writes (the file is untrusted)."""

    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) and x for x in v)

    def mapping(v: Any, ok: Callable[[Any], bool]) -> bool:
        return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())

    def tensor(v: Any) -> bool:
        return (
            isinstance(v, dict)
            and isinstance(v.get("dtype"), str)
            and isinstance(v.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"])
        )

    checks = {
        "name": lambda v: isinstance(v, str) and bool(v),
        "config": lambda v: isinstance(v, dict),
        "sites": names,
        "also_train": names,
        "tensors": lambda v: mapping(v, tensor),
        "base_shapes": lambda v: mapping(
            v, lambda x: isinstance(x, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in x)
        ),
        "fingerprint": lambda v: mapping(v, untrusted.is_number),
        "save_id": lambda v: isinstance(v, str),
        "delta_id": lambda v: isinstance(v, str),
        "backbone": lambda v: isinstance(v, str),
        "method": lambda v: isinstance(v, str),
        "hookdelta_version": lambda v: isinstance(v, str),
    }
    for field, ok in checks.items():
        if field in meta and not ok(meta[field]):
            raise DeltaFileError(
                f"{path}: the field {field!r} holds {str(meta[field])[:80]!r}, not what a save "
                "writes there; the file was edited or damaged"
            )


def check_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Any) -> None:
    """The tensors are the ones the description lists, of the dtypes it lists, and finite."""
    listed = meta["tensors"]
    extra, missing = sorted(set(tensors) - set(listed)), sorted(set(listed) - set(tensors))
    if extra or missing:
        raise DeltaFileError(
            f"{directory}: {TENSOR_FILE} does not hold the tensors {CONFIG_FILE} lists "
            f"(extra {extra[:5]}, missing {missing[:5]}); the save is corrupt"
        )
    for key, tensor in tensors.items():
        want = listed[key].get("dtype") if isinstance(listed[key], dict) else None
        got = str(tensor.dtype).replace("torch.", "")
        if got != want or not tensor.is_floating_point():
            raise DeltaFileError(
                f"{directory}: tensor {key!r} is {got}, but {CONFIG_FILE} says {want!r} "
                "(and a delta's tensors are floating point); the save is corrupt"
            )
        if not torch.isfinite(tensor).all():
            raise DeltaFileError(
                f"{directory}: tensor {key!r} holds NaN or Inf values; the delta diverged "
                "or the file is damaged, so it is not loaded"
            )


def read_tensors(directory: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors saved with the description `meta` (checked against it): `delta.safetensors`,
    or its `.prev` backup when a save was cut off between renaming its two files."""
    tensors = _read_save(directory, meta.get("save_id"))
    check_tensors(meta, tensors, directory)
    return tensors


def _read_save(directory: str | os.PathLike, save_id: str | None) -> dict[str, torch.Tensor]:
    candidate = _tensor_file(directory, save_id)
    try:
        with safe_open(str(candidate), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for bad headers and sizes)
        raise DeltaFileError(f"{candidate} is corrupt or truncated ({exc}); re-save the delta") from None


def _tensor_file(directory: str | os.PathLike, save_id: str | None) -> Path:
    """`delta.safetensors`, or its `.prev` backup when a save was cut off between its renames."""
    path = Path(directory) / TENSOR_FILE
    if not path.is_file():
        raise DeltaFileError(f"{path} is missing; the delta's tensors were not saved")
    for candidate in (path, path.with_name(f".{TENSOR_FILE}.prev")):
        if not candidate.is_file():
            continue
        try:
            with safe_open(str(candidate), framework="pt") as f:
                found = (f.metadata() or {}).get("save_id")
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for bad headers and sizes)
            raise DeltaFileError(f"{candidate} is corrupt or truncated ({exc}); re-save the delta") from None
        if save_id is None or found is None or found == save_id:
            return candidate  # (else written by another save, one cut off between its renames)
    raise DeltaFileError(f"{path} belongs to another save than {CONFIG_FILE} (an interrupted save?); re-save the delta")


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    freeze_base: bool = True,
    into: str | None = None,
    max_bytes: int | None = None,
) -> Any:
    """Attach a delta saved with `delta.save(directory)`. Checks the files, the sites and
    every shape first, before allocating anything (the file is untrusted: untrusted.py); on
    any error the model is untouched. Returns the Delta. With `into`, the saved values go into
    that attached delta in place instead (a hot-swap: hotswap.py). `max_bytes` refuses a delta
    that would take more memory."""
    model = check_model(model)
    if into is not None:
        if name is not None:
            raise ConfigError("hd.load: give name= (attach a new delta) or into= (hot-swap an attached one), not both")
        target = swap_target(model, into)
        return swap_in(target, *_read(model, directory, max_bytes)[1:], directory)
    meta, config, sites, train, tensors = _read(model, directory, max_bytes)
    wanted = meta.get("name") if name is None else name
    if name is None and wanted in deltas(model):
        wanted = None  # saved name taken: pick a fresh one
    name = unique_name(model, wanted, config.method)
    uid = meta.get("delta_id") if isinstance(meta.get("delta_id"), str) else None
    try:
        return install(model, config, name, sites, train, freeze_base, tensors, uid=uid, checked=True)
    except HookdeltaError:
        raise
    except Exception as exc:
        raise DeltaFileError(f"the delta in {directory} does not fit this model: {exc}") from exc


def _read(
    model: nn.Module, directory: str | os.PathLike, max_bytes: int | None = None
) -> tuple[dict[str, Any], DeltaConfig, list[str], list[str], dict[str, torch.Tensor]]:
    """A saved delta, checked against the model: (meta, config, sites, also_train, tensors),
    paths fitted to the model's (a wrapper's prefix added or dropped). The tensors are read
    last, once the header's names and shapes are the ones the config builds (a hot-swap, which
    takes r and alpha from the file, needs that agreement as much as a new delta does)."""
    meta = read_meta(directory)
    try:
        config = DeltaConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise DeltaFileError(f"the config saved in {directory} is invalid: {exc}") from None
    sites, train = list(meta["sites"]), list(meta["also_train"])
    limit = sum(1 for _ in model.named_parameters()) + sum(1 for _ in model.named_modules())
    if len(sites) + len(train) > limit or len(meta["tensors"]) > 64 * limit:
        raise DeltaFileError(
            f"{directory}: {len(sites) + len(train)} sites and {len(meta['tensors'])} tensors "
            f"listed for a model of {limit} modules and parameters; the file was damaged or crafted"
        )
    try:
        fix = fit_paths(model, sites + train, directory)
    except DeltaFileError as exc:
        raise DeltaFileError(f"the delta in {directory} was saved for a {meta.get('backbone')}: {exc}") from None
    sites, train = [fix(k) for k in sites], [fix(k) for k in train]
    meta = {
        **meta,
        **{
            field: {fix(k): v for k, v in meta.get(field, {}).items()}
            for field in ("base_shapes", "fingerprint", "tensors")
        },
    }
    shapes = meta.get("base_shapes", {})
    bad = [
        f"{k}: saved for {shapes[k]}, model has {list(shape(_weight(model, k)))}"
        for k in sites
        if k in shapes and list(shape(_weight(model, k))) != shapes[k]
    ]
    if bad:
        raise DeltaFileError(
            "the base weights' shapes differ from the ones the delta was saved for: " + "; ".join(bad[:5])
        )
    # header first: the names and shapes, against the delta the config builds (nothing allocated)
    found = {fix(k): v for k, v in untrusted.header(_tensor_file(directory, meta.get("save_id"))).items()}
    untrusted.Plan(model, config, sites, train).check(found, directory, max_bytes)  # (errors as install's)
    tensors = {fix(k): t for k, t in _read_save(directory, meta.get("save_id")).items()}
    check_tensors(meta, tensors, directory)
    prints = meta.get("fingerprint", {})
    differ = [k for k in sites if k in prints and not _close(prints[k], _whole_fingerprint(_weight(model, k)))]
    if differ:
        warnings.warn(
            f"the delta in {directory} was saved on different base weights ({len(differ)} of {len(sites)} "
            f"sites differ, e.g. {differ[0]!r}); its outputs will not match the ones it was trained with",
            BaseWeightsMismatchWarning,
            stacklevel=3,
        )
    return meta, config, sites, train, tensors


def _whole_fingerprint(tensor: torch.Tensor) -> float:
    with whole([tensor]):  # (a sharded weight gathered for the read: every rank loads)
        return fingerprint(full(tensor))


def _weight(model: nn.Module, key: str) -> torch.Tensor:
    """The base tensor a site adapts, with its real values (read through accelerate's offload map)."""
    module, name = resolve_site(model, key)
    if name is not None:
        return real_weight(model, key.rpartition(".")[0], name)
    return real_weight(model, key) if isinstance(getattr(module, "weight", None), torch.Tensor) else torch.empty(0)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
