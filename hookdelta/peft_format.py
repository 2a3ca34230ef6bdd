"""PEFT's adapter files, both ways: `load_peft` attaches an adapter saved by PEFT (or by
diffusers' `save_lora_adapter`) as a hookdelta delta; `save_peft` writes a delta so
`PeftModel.from_pretrained` loads it.

This module handles the files and what every PEFT file shares: the JSON config (every field
is understood, known to be harmless for loading, or refused by name), the key prefix, module
paths that differ only by a wrapper prefix (resolved with a warning; paths that fit nowhere
are refused, never loaded as zeros), modules_to_save, atomic writes. What a method's tensors
and fields are called is its own business: the `PeftCodec` beside each method (LoRA, IA3,
prompt tuning) in hookdelta/methods/.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from . import untrusted
from .also_train import TiedCopy
from .config import DeltaConfig, PeftCodec, exact
from .delta import install
from .errors import ConfigError, DeltaFileError, HookdeltaError, UnsupportedModuleError
from .persistence import read_json, write_files
from .selection import fit_paths
from .sharding import full, whole, writes_files
from .store import check_model, unique_name

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
DIFFUSERS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_adapter: the config in its metadata

# fields that only matter when PEFT creates or trains an adapter, or describe the file itself
_HARMLESS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "init_lora_weights",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
    "target_modules",
    "exclude_modules",
    "loftq_config",
    "lora_dropout",
    "ensure_weight_tying",
}


_int, _number = untrusted.is_int, untrusted.is_number


def _names(v: Any) -> bool:
    return v is None or isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)


def _patterns(v: Any) -> bool:  # {regex: number}, or AdaLoRA's {name: [kept, ...]}
    return (
        v is None
        or isinstance(v, dict)
        and all(
            isinstance(k, str) and (_number(x) or isinstance(x, list) and all(isinstance(b, bool) for b in x))
            for k, x in v.items()
        )
    )


# the types of the fields PEFT's configs share (the file is untrusted: untrusted.py); a codec
# checks the values of its own fields
FIELD_TYPES: dict[str, Any] = {
    "peft_type": lambda v: isinstance(v, str),
    "task_type": lambda v: v is None or isinstance(v, str),
    "r": _int,
    "lora_alpha": _number,
    "alpha": _number,
    "rank_pattern": _patterns,
    "alpha_pattern": _patterns,
    "target_modules": _names,
    "exclude_modules": _names,
    "modules_to_save": _names,
    "layers_pattern": _names,
    "layers_to_transform": lambda v: v is None or _int(v) or isinstance(v, list) and all(_int(x) for x in v),
    "lora_dropout": _number,
    "use_rslora": lambda v: isinstance(v, bool),
    "use_dora": lambda v: isinstance(v, bool),
    "bias": lambda v: isinstance(v, str),
    "fan_in_fan_out": lambda v: isinstance(v, bool),
    "base_model_name_or_path": lambda v: v is None or isinstance(v, str),
    "init_lora_weights": lambda v: isinstance(v, (bool, str)),
    "inference_mode": lambda v: isinstance(v, bool),
}


def codecs() -> dict[str, PeftCodec]:
    """peft_type -> the codec of the method that reads and writes it."""
    return {cls.peft_codec.peft_type: cls.peft_codec for cls in DeltaConfig.registered().values() if cls.peft_codec}


# -- reading ------------------------------------------------------------------------------------


def is_diffusers_file(directory: str | os.PathLike) -> bool:
    """A diffusers LoRA file (save_lora_adapter, save_lora_weights) with no PEFT config beside it."""
    return not (Path(directory) / CONFIG).is_file() and (Path(directory) / DIFFUSERS).is_file()


def read_peft_config(
    directory: str | os.PathLike, prefix: str = "", tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The adapter's PEFT config, checked. For a diffusers file, `prefix` is the pipeline
    component ("unet", "text_encoder", ...) its keys and metadata are under ("" for a model's own
    file), and `tensors` (already without the prefix) give the ranks when it has no metadata."""
    path = Path(directory) / CONFIG
    if is_diffusers_file(directory):
        config, path = _diffusers_config(Path(directory) / DIFFUSERS, prefix, tensors), Path(directory) / DIFFUSERS
    else:
        config = read_json(directory, CONFIG, "PEFT adapter")
    return check_peft_config(config, path)


def check_peft_config(config: Any, path: Any) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise DeltaFileError(f"{path} is not a PEFT adapter config")
    wrong = [k for k, ok in FIELD_TYPES.items() if k in config and not ok(config[k])]
    if wrong:
        raise DeltaFileError(
            f"{path}: {wrong[0]!r} holds {str(config[wrong[0]])[:80]!r}, not a value PEFT writes "
            "there; the file was edited or damaged"
        )
    peft_type = config.get("peft_type")
    codec = codecs().get(peft_type) if isinstance(peft_type, str) else None
    if codec is None:
        raise DeltaFileError(
            f"{path} holds a {config.get('peft_type')!r} adapter; hookdelta reads PEFT's {sorted(codecs())} adapters"
        )
    unsupported = sorted(
        k for k, v in config.items() if k not in _HARMLESS | codec.understood and v not in (None, False, {}, [], "")
    )
    unsupported += codec.refuse(config)
    if unsupported:
        raise DeltaFileError(f"{path} uses PEFT features hookdelta does not load: {', '.join(unsupported)}")
    return config


def read_peft_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors, or from a .bin only through torch's restricted
    (weights-only) unpickler, which refuses anything but tensors and plain containers."""
    directory = Path(directory)
    for name in (WEIGHTS, DIFFUSERS):
        if (directory / name).is_file():
            try:
                with safe_open(str(directory / name), framework="pt") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}
            except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for bad files)
                raise DeltaFileError(f"{directory / name} is corrupt or truncated ({exc})") from None
    if (directory / PICKLED).is_file():
        try:
            tensors = torch.load(directory / PICKLED, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 (the restricted unpickler raises many types; all mean "not plain tensors")
            raise DeltaFileError(
                f"{directory / PICKLED} cannot be read without unpickling arbitrary objects ({type(exc).__name__}); "
                "re-save the adapter with safetensors (PEFT's default)"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise DeltaFileError(f"{directory / PICKLED} does not hold a flat dict of tensors")
        return tensors
    raise DeltaFileError(f"no adapter weights in {directory}: neither {WEIGHTS} nor {PICKLED}")


def _diffusers_config(path: Path, prefix: str = "", tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """diffusers writes PEFT's LoRA config into the safetensors metadata: as is (a model's
    `save_lora_adapter`) or with each key under its pipeline component (`save_lora_weights(...,
    unet_lora_adapter_metadata=...)`: "unet.r", "unet.lora_alpha", ...). A file without it
    (older training scripts) means what diffusers makes of it: each layer's rank from its
    tensors and alpha equal to the rank (scale 1)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("lora_adapter_metadata")
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for bad files)
        raise DeltaFileError(f"{path} is corrupt or truncated ({exc})") from None
    if not text:
        return _config_from_ranks(path, tensors)
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        raise DeltaFileError(f"{path}: its lora_adapter_metadata is not valid JSON") from None
    if untrusted.depth(config) > untrusted.MAX_DEPTH:
        raise DeltaFileError(f"{path}: its lora_adapter_metadata nests too deeply; it was damaged or crafted")
    untrusted.screen(config, f"{path}'s lora_adapter_metadata")
    if not isinstance(config, dict):
        raise DeltaFileError(f"{path}: its lora_adapter_metadata is not a PEFT config")
    if prefix and any(k.startswith(prefix + ".") for k in config):
        config = {k[len(prefix) + 1 :]: v for k, v in config.items() if k.startswith(prefix + ".")}
    elif prefix and all("." in k for k in config):
        return _config_from_ranks(path, tensors)  # metadata for other components only
    config.setdefault("peft_type", "LORA")
    return config


def _config_from_ranks(path: Path, tensors: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    ranks = {k.rpartition(".lora_A")[0]: int(t.shape[0]) for k, t in (tensors or {}).items() if ".lora_A" in k}
    if not ranks:
        raise DeltaFileError(
            f"{path} carries no LoRA config (no adapter_config.json beside it, no "
            "lora_adapter_metadata inside it) and no lora_A tensors to read the ranks from"
        )
    values = list(ranks.values())
    r = max(values, key=values.count)
    odd = {re.escape(k): v for k, v in ranks.items() if v != r}
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": odd, "alpha_pattern": dict(odd)}


def diffusers_component(model: nn.Module, keys: list[str], directory: Any) -> str:
    """The pipeline component whose keys a diffusers file holds for this model: "" when its keys
    name the model's own modules, else the one prefix ("unet", "text_encoder", ...) under which
    they do. Several that fit, or none, is an error naming them."""
    names = {n for n, _ in model.named_modules()}

    def fits(strip: str) -> bool:
        mods = {k[len(strip) :].split(".lora_")[0] for k in keys if k.startswith(strip) and ".lora_" in k}
        return bool(mods) and mods <= names

    if fits(""):
        return ""
    prefixes = sorted({k.partition(".")[0] for k in keys})
    found = [p for p in prefixes if fits(p + ".")]
    if len(found) != 1:
        raise DeltaFileError(
            f"the diffusers LoRA file in {directory} holds the components {prefixes}; "
            + (f"several fit this model: {found}" if found else "none of them fits this model's modules")
            + ". Load it into the component it was saved for (pipe.unet, pipe.text_encoder, ...)"
        )
    return found[0]


def load_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    freeze_base: bool = True,
    max_bytes: int | None = None,
) -> Any:
    """Attach an adapter saved by PEFT (any method PEFT and hookdelta share). Checks the config
    against its tensors (a rank that is not the config's is refused, never fitted) and the
    delta it describes against the model before building it (untrusted.py); returns the Delta.
    `max_bytes` refuses a delta that would take more memory."""
    model = check_model(model)
    tensors = read_peft_tensors(directory)
    prefix = ""
    if is_diffusers_file(directory):  # a pipeline's file holds several components: take this model's
        prefix = diffusers_component(model, list(tensors), directory)
        tensors = (
            {k[len(prefix) + 1 :]: t for k, t in tensors.items() if k.startswith(prefix + ".")} if prefix else tensors
        )
    config = read_peft_config(directory, prefix, tensors)
    codec = codecs()[config["peft_type"]]
    named: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}  # modules_to_save: full copies under the modules' own names
    config = {**config, "__shared__": {k: tensors.pop(k) for k in codec.shared_keys if k in tensors}}
    for key, tensor in tensors.items():
        key = key[len(codec.prefix) :] if key.startswith(codec.prefix) else key
        placed = codec.place(model, key)
        if placed is None:
            rest[key] = tensor
        else:
            named.setdefault(placed[0], {})[placed[1]] = tensor
    if not named:
        raise DeltaFileError(f"the adapter in {directory} holds no {config['peft_type']} tensors")
    named = _parameter_targets(model, config, named, directory)
    # PEFT saves the whole embedding next to a LoRA on it (save_embedding_layers): checked below
    copies = {k: rest.pop(k) for k in list(rest) if k.endswith(".base_layer.weight")}
    unknown = sorted(
        k
        for k in rest
        if not any(k.startswith(m + ".") or ("." + m + ".") in "." + k for m in config.get("modules_to_save") or [])
    )
    if unknown:
        raise DeltaFileError(f"the adapter in {directory} holds tensors hookdelta cannot place: {unknown[:5]}")
    owners = sorted({k.rpartition(".")[0] for k in rest})
    paths = (list(named) if codec.fits_paths else []) + owners
    fix = fit_paths(model, paths, directory) if paths else str
    if codec.fits_paths:
        named = {fix(p): ts for p, ts in named.items()}
    train = [fix(o) for o in owners]
    _check_base_copies(model, copies, fix, directory)
    # PEFT's modules_to_save copies are used at the named module only, unless ensure_weight_tying
    common = {
        "also_train": [exact(t) for t in train] or None,
        "tie_also_train": bool(config.get("ensure_weight_tying")),
    }
    try:
        try:
            cfg, tensors = codec.to_config(model, config, named, common)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            if isinstance(exc, HookdeltaError):
                raise
            # a config value of the wrong type, a tensor of the wrong rank, a missing companion tensor
            raise DeltaFileError(f"the PEFT adapter in {directory} is malformed: {type(exc).__name__}: {exc}") from None
        tensors.update({fix(k.rpartition(".")[0]) + "." + k.rpartition(".")[2]: t for k, t in rest.items()})
        return install(
            model,
            cfg,
            unique_name(model, name, cfg.method),
            list(named),
            train,
            freeze_base,
            tensors,
            max_bytes=max_bytes,
        )
    except HookdeltaError as exc:
        raise DeltaFileError(f"the PEFT adapter in {directory} does not fit this model: {exc}") from None


def _parameter_targets(
    model: nn.Module, config: dict[str, Any], named: dict[str, dict[str, torch.Tensor]], directory: Any
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's target_parameters: a module with k targeted parameters is wrapped k times, in the
    order the module holds them, the first one deepest, so a key's `.base_layer` count says
    which parameter its factors adapt. Returns the placed tensors under parameter paths."""
    targets = config.get("target_parameters") or []
    if not targets:
        return named
    stripped: dict[str, tuple[str, int]] = {}
    for path in named:
        owner, depth = path, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner[: -len(".base_layer")], depth + 1
        stripped[path] = owner, depth
    fix = fit_paths(model, sorted({o for o, _ in stripped.values()}), directory)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, tensors in named.items():
        owner, depth = stripped[path]
        module = model.get_submodule(fix(owner))
        own = [
            n
            for n in module._parameters
            if any(f"{owner}.{n}" == t or f"{owner}.{n}".endswith("." + t) for t in targets if isinstance(t, str))
        ]
        if not own and not depth:
            out[path] = tensors  # a target module beside the parameters
            continue
        if not 0 <= len(own) - 1 - depth < len(own):
            raise DeltaFileError(
                f"the adapter in {directory} holds {path!r}, but its target_parameters {targets} "
                f"name {len(own)} parameter(s) of {owner!r}: the nesting does not fit"
            )
        out[f"{owner}.{own[len(own) - 1 - depth]}"] = tensors
    return out


def _check_base_copies(model: nn.Module, copies: dict[str, torch.Tensor], fix: Any, directory: Any) -> None:
    """A base weight saved beside the adapter must be the model's own: hookdelta never replaces
    base weights, so a different one (a resized or trained embedding) is refused, not ignored."""
    for key, saved in copies.items():
        path = fix(key[: -len(".base_layer.weight")])
        try:
            weight = cast(torch.Tensor, model.get_submodule(path).weight)
        except AttributeError:
            raise DeltaFileError(f"the adapter in {directory} holds {key!r} but the model has no {path!r}") from None
        if weight.shape != saved.shape or not torch.equal(weight.detach().cpu(), saved.to(weight.dtype)):
            raise DeltaFileError(
                f"the adapter in {directory} carries its own {path}.weight ({tuple(saved.shape)}), which differs "
                f"from the model's ({tuple(weight.shape)}): it was saved from a model whose embedding was resized "
                "or trained. Load that model (resize_token_embeddings, then its weights) before the adapter"
            )


# -- writing ------------------------------------------------------------------------------------


def save_peft(
    delta: Any,
    directory: str | os.PathLike,
    overwrite: bool = False,
    diffusers: str | bool = False,
    split_experts: bool = False,
) -> None:
    """Write a delta as a PEFT adapter directory (atomically, safetensors only); with
    `diffusers=True` as diffusers writes a model's LoRA (`save_lora_adapter`: one
    pytorch_lora_weights.safetensors, the config in its metadata), with `diffusers="unet"` (or
    another component) as a pipeline's (`save_lora_weights`: keys and config under "unet.").
    `split_experts=True` writes a LoRA on fused experts one expert and projection at a time,
    under the checkpoint's names (experts.py): the layout vLLM reads for MoE models whose
    checkpoints keep experts apart."""
    if not (isinstance(diffusers, bool) or isinstance(diffusers, str) and diffusers.isidentifier()):
        raise ConfigError(
            f"save_peft(diffusers=...) takes True (a model's file) or a pipeline component name such "
            f"as 'unet' or 'text_encoder', got {diffusers!r}"
        )
    codec = type(delta.config).peft_codec
    if codec is None:
        raise UnsupportedModuleError(
            f"PEFT's adapter files hold {sorted(codecs())} adapters; {delta.name!r} is a {delta.method} delta. "
            "Save it with delta.save()."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DeltaFileError(f"cannot save delta {delta.name!r}: {directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite and _saved_by(directory) != delta.uid:
        raise DeltaFileError(
            f"{directory} exists and holds files this delta did not write; pass overwrite=True to "
            "replace them, or choose an empty directory"
        )
    tied = [p.key for p in delta.pieces.values() if isinstance(p, TiedCopy)]
    if tied:
        raise UnsupportedModuleError(
            f"delta {delta.name!r} trains one copy of a tied tensor for all its holders ({tied[0]}); PEFT's "
            "modules_to_save cannot express that. Save it with delta.save(), or attach with tie_also_train=False"
        )
    train = set(delta.also_train)
    tensors: dict[str, torch.Tensor] = {}
    with whole(delta.parameters()):  # (ZeRO-3 partitions hold their values only inside: so the clones)
        for piece in delta.pieces.values():
            if piece.key in train:  # modules_to_save: the trained copies under the module's own names
                for n, t in piece.named_parameters(recurse=False):
                    tensors[f"{codec.prefix}{piece.key}.{n}"] = full(t).detach().contiguous().clone()
        pieces = [p for p in delta.pieces.values() if p.key not in train]
        fused = _fused_experts(delta, pieces) if split_experts else []
        fields, own = codec.from_delta(delta, [p for p in pieces if p not in fused])
        if fused:
            own, fields = _split_experts(delta, fused, own, fields)
        tensors.update({codec.file_key(k): full(t).detach().contiguous().clone() for k, t in own.items()})
    if not writes_files(delta.parameters()):
        return  # a collective save of sharded tensors: rank 0 writes
    model = delta.model
    config = {
        "task_type": None,
        "inference_mode": True,
        "modules_to_save": sorted(train) or None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        **fields,
    }
    if diffusers:
        _write_diffusers(directory, tensors, config, delta, "" if diffusers is True else str(diffusers))
        return
    _write(directory, tensors, config, delta.uid)


def _fused_experts(delta: Any, pieces: list[Any]) -> list[Any]:
    """The plain LoRA pieces on fused expert tensors, which split_experts writes per expert."""
    from .methods.lora_layers import LoRAParameter

    fused = [p for p in pieces if type(p) is LoRAParameter and p.lora_A.dim() == 3]
    if delta.method != "lora" or not fused:
        raise UnsupportedModuleError(
            f"save_peft(split_experts=True) writes a LoRA on fused expert tensors per expert; delta {delta.name!r} "
            f"({delta.method}) has no such tensors"
            + (
                " (DoRA on experts has no PEFT file)"
                if any(type(p).__name__ == "DoRAParameter" for p in pieces)
                else ""
            )
        )
    return fused


def _split_experts(
    delta: Any, fused: list[Any], own: dict[str, torch.Tensor], fields: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors and config with the fused pieces written one expert and projection at a
    time, every module under the checkpoint's names (experts.py)."""
    from .experts import checkpoint_name, split_factors

    cfg, model = delta.config, delta.model
    suffix = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB]|lora_magnitude_vector)$")
    out = {}
    for key, t in own.items():
        match = suffix.search(key)
        out[(checkpoint_name(model, key[: match.start()]) + key[match.start() :]) if match else key] = t
    ranks, alphas, targets = dict(fields.get("rank_pattern") or {}), dict(fields.get("alpha_pattern") or {}), []
    for piece in fused:
        for path, (a, b) in split_factors(model, piece.key, piece.lora_A.detach(), piece.lora_B.detach()).items():
            out[path + ".lora_A.weight"], out[path + ".lora_B.weight"] = a.contiguous(), b.contiguous()
            targets.append(path)
            if piece.r != cfg.r:
                ranks[re.escape(path)] = piece.r
            alpha = cfg.scale_for(piece.key) * (piece.r**0.5 if cfg.use_rslora else piece.r)
            if abs(alpha - cfg.alpha) > 1e-12 * max(1.0, abs(cfg.alpha)):
                alphas[re.escape(path)] = alpha
    modules = [checkpoint_name(model, m) for m in fields.get("target_modules") or []]
    fields = {k: v for k, v in fields.items() if k != "target_parameters"}
    fields.update(target_modules=modules + targets, rank_pattern=ranks, alpha_pattern=alphas)
    return out, fields


def _write_diffusers(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], delta: Any, component: str
) -> None:
    codec = type(delta.config).peft_codec
    if codec.peft_type != "LORA":
        raise UnsupportedModuleError(
            f"diffusers' LoRA files hold LoRA; {delta.name!r} is a {delta.method} delta. "
            "Use save_peft(dir) or delta.save(dir)"
        )
    if config.get("modules_to_save"):
        raise UnsupportedModuleError(
            f"diffusers' LoRA files hold no modules_to_save (also_train) copies; "
            f"{delta.name!r} has some. Use save_peft(dir) or delta.save(dir)"
        )
    lead = component + "." if component else ""
    own = {lead + k[len(codec.prefix) :]: t for k, t in tensors.items()}
    meta_config = {lead + k: v for k, v in config.items() if k != "base_model_name_or_path"}
    meta = {"format": "pt", "hookdelta_delta_id": delta.uid, "lora_adapter_metadata": json.dumps(meta_config)}
    write_files(directory, [(DIFFUSERS, lambda tmp: save_file(own, str(tmp), metadata=meta))])


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], uid: str) -> None:
    # the delta's identity goes into the safetensors metadata (PEFT ignores it; adapter_config.json
    # stays PEFT's own): saving again from the same delta is allowed without overwrite
    meta = {"format": "pt", "hookdelta_delta_id": uid}
    write_files(
        directory,
        [
            (WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=meta)),
            (CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2))),
        ],
    )


def _saved_by(directory: Path) -> str | None:
    """The hookdelta delta that wrote the PEFT adapter in `directory`, if one did."""
    for name in (WEIGHTS, DIFFUSERS):
        try:
            with safe_open(str(directory / name), framework="pt") as f:
                return (f.metadata() or {}).get("hookdelta_delta_id")
        except Exception:  # noqa: BLE001 (missing or unreadable, whatever safetensors raises: not ours)
            continue
    return None
