"""Saving and loading deltas: `delta.safetensors` (the delta's tensors only, keyed by
module path + tensor name) and `delta.json` (format version, config, sites, shapes and a
fingerprint of the base weights). No pickle anywhere; writes are atomic; a load checks
everything before it touches the model.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DeltaConfig
from .errors import BaseWeightsMismatchWarning, ConfigError, DeltaFileError, HookdeltaError

FORMAT_VERSION = 1
CONFIG_FILE = "delta.json"
TENSOR_FILE = "delta.safetensors"


# -- saving ---------------------------------------------------------------------------------


def delta_tensors(delta: Any) -> dict[str, torch.Tensor]:
    """The delta's own tensors, keyed `<site key>.<tensor name>` (merge copies excluded)."""
    out: dict[str, torch.Tensor] = {}
    for piece in delta._pieces():
        for name, tensor in piece.state_dict().items():
            out[f"{piece.key}.{name}"] = tensor.detach().to("cpu").contiguous()
    return out


def save_delta(delta: Any, directory: str | os.PathLike, overwrite: bool = False) -> None:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DeltaFileError(f"cannot save delta {delta.name!r}: {directory} exists and is not a directory")
    existing = directory / CONFIG_FILE
    if existing.exists() and not overwrite:
        try:
            other = json.loads(existing.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            other = "?"
        if other != delta.name:
            raise DeltaFileError(
                f"{directory} already holds another delta ({other!r}); pass overwrite=True to replace it, "
                "or choose an empty directory"
            )
    model = delta._model
    meta = {
        "format": "hookdelta",
        "format_version": FORMAT_VERSION,
        "hookdelta_version": _version(),
        "name": delta.name,
        "method": delta.method,
        "config": _portable_config(delta, model),
        "sites": delta.sites,
        "also_train": delta.also_train,
        "backbone": type(model).__name__,
        "base_shapes": {k: list(_base_tensor(delta, model, k).shape) for k in delta.sites},
        "fingerprint": {k: fingerprint(_base_tensor(delta, model, k)) for k in delta.sites},
    }
    tensors = delta_tensors(delta)
    meta["tensors"] = {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                       for k, t in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / TENSOR_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _version() -> str:
    from . import __version__

    return __version__


def _portable_config(delta: Any, model: nn.Module) -> dict[str, Any]:
    """The config as JSON; callable selectors (not serializable) become the exact site lists."""
    data = delta.config.to_dict()
    if _has_callable(data):
        modules = [k for k in delta.sites if _is_module(model, k)]
        params = [k for k in delta.sites if not _is_module(model, k)]
        data.update(targets=[f"re:{_escape(k)}" for k in modules] or None, exclude=None, layers=None,
                    also_train=[f"re:{_escape(k)}" for k in delta.also_train] or None)
        if "target_parameters" in data:
            data["target_parameters"] = [f"re:{_escape(k)}" for k in params] or None
        if "feedforward_targets" in data:  # IA3: the sites whose input is scaled
            ff = [p.key for p in delta.pieces.values() if getattr(p, "on_input", False)]
            data["feedforward_targets"] = [f"re:{_escape(k)}" for k in ff] or None
    return data


def _has_callable(data: dict[str, Any]) -> bool:
    values = [v for f in data.values() for v in (f if isinstance(f, list) else [f])]
    return any(isinstance(v, dict) and "callable" in v for v in values)


def _escape(path: str) -> str:
    import re

    return re.escape(path)


def _is_module(model: nn.Module, key: str) -> bool:
    try:
        model.get_submodule(key)
        return True
    except AttributeError:
        return False


def _base_tensor(delta: Any, model: nn.Module, key: str) -> torch.Tensor:
    """The base weight a site adapts, as it was before any merge of this delta (empty when
    the site has no weight of its own, e.g. a whole MLP block)."""
    from .delta import _slot

    name = "weight" if _is_module(model, key) else key.rpartition(".")[2]
    piece = delta.pieces[_slot(key)]
    original = piece._buffers.get(f"_original_{name}")
    return original if original is not None else _weight(model, key)


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
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeltaFileError(f"{path} is not valid JSON ({exc}); the save is corrupt or truncated") from None


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    meta = read_json(directory, CONFIG_FILE, "saved delta")
    if not isinstance(meta, dict) or meta.get("format") != "hookdelta":
        raise DeltaFileError(f"{path} is not a hookdelta delta description")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaFileError(
            f"{path} has format version {version!r}; this hookdelta ({_version()}) reads version "
            f"{FORMAT_VERSION}. Upgrade hookdelta or re-save the delta."
        )
    for field in ("name", "config", "sites", "also_train", "tensors"):
        if field not in meta:
            raise DeltaFileError(f"{path} lacks the field {field!r}; the save is corrupt")
    return meta


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / TENSOR_FILE
    if not path.is_file():
        raise DeltaFileError(f"{path} is missing; the delta's tensors were not saved")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and sizes
        raise DeltaFileError(f"{path} is corrupt or truncated ({exc}); re-save the delta") from None


def fill_tensors(delta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into a freshly built (not yet attached) delta, checking every key."""
    expected = {f"{p.key}.{n}": t for p in delta._pieces() for n, t in p.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DeltaFileError(f"the saved tensors do not fit the delta: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [f"{k}: saved {tuple(tensors[k].shape)}, model needs {tuple(t.shape)}"
           for k, t in expected.items() if tuple(t.shape) != tuple(tensors[k].shape)]
    if bad:
        raise DeltaFileError("shape mismatch between the saved delta and this model: " + "; ".join(bad[:5]))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.device, target.dtype))


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
         freeze_base: bool = True) -> Any:
    """Attach a delta saved with `delta.save(directory)`. Checks the files, the sites and
    every shape first; on any error the model is untouched. Returns the Delta."""
    from .delta import _new_name, check_model, deltas, install

    check_model(model)
    meta = read_meta(directory)
    try:
        config = DeltaConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise DeltaFileError(f"the config saved in {directory} is invalid: {exc}") from None
    sites, train = list(meta["sites"]), list(meta["also_train"])
    missing = [k for k in sites + train if not _exists(model, k)]
    if missing:
        raise DeltaFileError(
            f"the delta in {directory} was saved for a {meta.get('backbone')}; this "
            f"{type(model).__name__} has no {missing[:5]}" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    shapes = meta.get("base_shapes", {})
    bad = [f"{k}: saved for {shapes[k]}, model has {list(_weight(model, k).shape)}"
           for k in sites if k in shapes and list(_weight(model, k).shape) != shapes[k]]
    if bad:
        raise DeltaFileError("the base weights' shapes differ from the ones the delta was saved for: " + "; ".join(bad[:5]))
    tensors = read_tensors(directory)
    wanted = meta.get("name") if name is None else name
    if name is None and wanted in deltas(model):
        wanted = None  # saved name taken: pick a fresh one
    name = _new_name(model, wanted, config.method)
    prints = meta.get("fingerprint", {})
    differ = [k for k in sites if k in prints and not _close(prints[k], fingerprint(_weight(model, k)))]
    if differ:
        warnings.warn(
            f"the delta in {directory} was saved on different base weights ({len(differ)} of {len(sites)} "
            f"sites differ, e.g. {differ[0]!r}); its outputs will not match the ones it was trained with",
            BaseWeightsMismatchWarning, stacklevel=2)
    try:
        return install(model, config, name, sites, train, freeze_base, tensors)
    except HookdeltaError:
        raise
    except Exception as exc:
        raise DeltaFileError(f"the delta in {directory} does not fit this model: {exc}") from exc


def _exists(model: nn.Module, key: str) -> bool:
    if _is_module(model, key):
        return True
    owner, _, name = key.rpartition(".")
    return _is_module(model, owner) and name in model.get_submodule(owner)._parameters if owner else name in model._parameters


def _weight(model: nn.Module, key: str) -> torch.Tensor:
    if _is_module(model, key):
        module = model.get_submodule(key)
        weight = getattr(module, "weight", None)
        return weight if isinstance(weight, torch.Tensor) else torch.empty(0)
    owner, _, name = key.rpartition(".")
    return (model.get_submodule(owner) if owner else model)._parameters[name]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
