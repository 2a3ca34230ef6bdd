"""PEFT's adapter files, both ways: `load_peft` attaches a LoRA / rsLoRA / DoRA or IA3
adapter saved by PEFT (`adapter_config.json` + `adapter_model.safetensors`) as a hookdelta
delta; `save_peft` writes a hookdelta LoRA or IA3 delta so `PeftModel.from_pretrained` loads it.

Tensor layouts are the same on both sides (hookdelta's LoRA follows PEFT's), so the work is
in the names: PEFT keys look like `base_model.model.<module path>.lora_A.weight`. Every
config field PEFT writes is either understood, known to be harmless for loading, or
reported by name; module paths that differ only by a wrapper prefix (an adapter trained on
`LlamaForCausalLM` loaded on `LlamaModel`, or the reverse) are resolved with a warning,
and paths that fit nowhere are refused, never loaded as zeros.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DeltaFileError, HookdeltaError, UnsupportedModuleError
from .methods.ia3 import IA3Config
from .methods.lora import LoRAConfig, LoRAParameter, LoRASlices, TiedLoRA, TiedParameter
from .methods.soft_prompt import SoftPromptConfig
from .model_inputs import attention_shape, input_embeddings_path, is_encoder_decoder
from .persistence import read_json, write_files
from .also_train import TiedCopy
from .delta import install
from .store import check_model, unique_name
from .modules import is_conv1d
from .selection import fit_paths

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
DIFFUSERS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_adapter: the config in its metadata
PREFIX = "base_model.model."  # PEFT's key prefix (a tuner wraps the model)
PROMPT_PREFIX = "base_model."  # ... and for prompt learning, where the model is held directly

# fields that only matter when PEFT creates or trains an adapter, or describe the file itself
_HARMLESS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "init_lora_weights", "megatron_core", "qalora_group_size", "layers_pattern",
    "target_modules", "exclude_modules", "loftq_config", "lora_dropout", "ensure_weight_tying",
}
_UNDERSTOOD = {"r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
               "layers_to_transform", "modules_to_save", "bias"}
_PROMPT_UNDERSTOOD = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                      "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                      "tokenizer_kwargs", "modules_to_save"}
_IA3_UNDERSTOOD = {"feedforward_modules", "fan_in_fan_out", "modules_to_save", "init_ia3_weights"}
_SUFFIXES = {  # PEFT tensor name -> hookdelta tensor name
    ".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B", ".lora_magnitude_vector": "magnitude", ".ia3_l": "ia3_l",
}


# -- reading ------------------------------------------------------------------------------------


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file() and (Path(directory) / DIFFUSERS).is_file():
        config, path = _diffusers_config(Path(directory) / DIFFUSERS), Path(directory) / DIFFUSERS
    else:
        config = read_json(directory, CONFIG, "PEFT adapter")
    if not isinstance(config, dict):
        raise DeltaFileError(f"{path} is not a PEFT adapter config")
    understood = {"LORA": _UNDERSTOOD, "IA3": _IA3_UNDERSTOOD, "PROMPT_TUNING": _PROMPT_UNDERSTOOD}.get(
        config.get("peft_type"))
    if understood is None:
        raise DeltaFileError(
            f"{path} holds a {config.get('peft_type')!r} adapter; hookdelta reads PEFT's LORA (LoRA, rsLoRA, "
            "DoRA), IA3 and PROMPT_TUNING adapters"
        )
    unsupported = sorted(k for k, v in config.items()
                         if k not in _HARMLESS | understood and v not in (None, False, {}, [], ""))
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
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
            except Exception as exc:
                raise DeltaFileError(f"{directory / name} is corrupt or truncated ({exc})") from None
    if (directory / PICKLED).is_file():
        try:
            tensors = torch.load(directory / PICKLED, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DeltaFileError(
                f"{directory / PICKLED} cannot be read without unpickling arbitrary objects ({type(exc).__name__}); "
                "re-save the adapter with safetensors (PEFT's default)"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise DeltaFileError(f"{directory / PICKLED} does not hold a flat dict of tensors")
        return tensors
    raise DeltaFileError(f"no adapter weights in {directory}: neither {WEIGHTS} nor {PICKLED}")


def _diffusers_config(path: Path) -> dict[str, Any]:
    """diffusers' `save_lora_adapter` writes PEFT's LoRA config into the safetensors metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("lora_adapter_metadata")
    except Exception as exc:
        raise DeltaFileError(f"{path} is corrupt or truncated ({exc})") from None
    if not text:
        raise DeltaFileError(f"{path} carries no LoRA config (no adapter_config.json beside it, no "
                             "lora_adapter_metadata inside it), so its rank and alpha are unknown; save it with "
                             "diffusers' save_lora_adapter or PEFT's save_pretrained")
    try:
        config = json.loads(text)
    except ValueError:
        raise DeltaFileError(f"{path}: its lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise DeltaFileError(f"{path}: its lora_adapter_metadata is not a PEFT config")
    config.setdefault("peft_type", "LORA")
    return config


def _split(key: str) -> tuple[str, str] | None:
    for suffix, ours in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], ours
    return None


def load_peft(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
              freeze_base: bool = True) -> Any:
    """Attach a LoRA (LoRA, rsLoRA, DoRA), IA3 or prompt-tuning adapter saved by PEFT. Checks the config,
    every key and every shape before touching the model; returns the Delta."""
    model = check_model(model)
    config = read_peft_config(directory)
    raw = read_peft_tensors(directory)
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    if config["peft_type"] == "PROMPT_TUNING":
        stripped = {k[len(PROMPT_PREFIX):] if k.startswith(PROMPT_PREFIX) else k: v for k, v in raw.items()}
        return _load_prompt(model, config, stripped, name, freeze_base, directory)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in stripped.items():
        split = _split(key)
        if split is None:
            rest[key] = tensor
        else:
            lora.setdefault(split[0], {})[split[1]] = tensor
    if not lora:
        raise DeltaFileError(f"the adapter in {directory} holds no {config['peft_type']} tensors")
    unknown = sorted(k for k in rest if not any(k.startswith(m + ".") or ("." + m + ".") in "." + k
                                                  for m in config.get("modules_to_save") or []))
    if unknown:
        raise DeltaFileError(f"the adapter in {directory} holds tensors hookdelta cannot place: {unknown[:5]}")
    owners = sorted({k.rpartition(".")[0] for k in rest})
    fix = fit_paths(model, list(lora) + owners, directory)
    paths = {p: fix(p) for p in list(lora) + owners}
    sites, train = [paths[p] for p in lora], [paths[p] for p in owners]

    tensors = {f"{paths[p]}.{n}": t for p, named in lora.items() for n, t in named.items()}
    tensors.update({paths[k.rpartition(".")[0]] + "." + k.rpartition(".")[2]: t for k, t in rest.items()})
    also_train = [f"re:{re.escape(t)}" for t in train] or None
    if config["peft_type"] == "IA3":
        # PEFT stores l as [out, 1] (outputs scaled) or [1, in] (inputs scaled: feedforward modules)
        feedforward = [s for s, named in zip(sites, lora.values()) if named["ia3_l"].shape[0] == 1]
        tensors = {k: t.reshape(-1) if k.endswith(".ia3_l") else t for k, t in tensors.items()}
        cfg: Any = IA3Config(targets=[f"re:{re.escape(s)}" for s in sites], also_train=also_train,
                             tie_also_train=_tied(config),
                             feedforward_targets=[f"re:{re.escape(s)}" for s in feedforward] or None)
        return _install(model, cfg, name, "ia3", sites, train, freeze_base, tensors, directory)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    ranks = {s: int(t["lora_A"].shape[0]) for s, t in zip(sites, lora.values()) if "lora_A" in t}
    alpha_pattern = config.get("alpha_pattern") or {}
    cfg = LoRAConfig(
        r=r, alpha=alpha, use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
        dropout=float(config.get("lora_dropout") or 0.0), tie_weights=True,
        targets=[f"re:{re.escape(s)}" for s in sites],
        rank_pattern={re.escape(s): k for s, k in ranks.items() if k != r} or None,
        alpha_pattern=_alphas_by_site(sites, alpha_pattern) or None,
        also_train=also_train, tie_also_train=_tied(config),
    )
    return _install(model, cfg, name, "lora", sites, train, freeze_base, tensors, directory)


def _load_prompt(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str | None,
                 freeze_base: bool, directory: Any) -> Any:
    """PEFT prompt tuning: `prompt_embeddings` [P, hidden] in front of the input, as SoftPromptConfig."""
    prompt = tensors.pop("prompt_embeddings", None)
    if prompt is None or prompt.dim() != 2:
        raise DeltaFileError(f"the prompt-tuning adapter in {directory} has no [tokens, hidden] prompt_embeddings")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise DeltaFileError(
            f"the prompt-tuning adapter in {directory} has prompts for {config['num_transformer_submodules']} "
            "submodules (an encoder-decoder file); hookdelta reads single-prompt files"
        )
    owners = sorted({k.rpartition(".")[0] for k in tensors})
    fix = fit_paths(model, owners, directory) if owners else str
    paths = {o: fix(o) for o in owners}
    train = [paths[o] for o in owners]
    site = input_embeddings_path(model)
    ours = {f"{site}.prompt": prompt}
    ours.update({paths[k.rpartition(".")[0]] + "." + k.rpartition(".")[2]: t for k, t in tensors.items()})
    cfg = SoftPromptConfig(num_virtual_tokens=prompt.shape[0], also_train=[f"re:{re.escape(t)}" for t in train] or None,
                           tie_also_train=_tied(config))
    return _install(model, cfg, name, "soft_prompt", [site], train, freeze_base, ours, directory)


def _install(model: nn.Module, cfg: Any, name: str | None, method: str, sites: list[str], train: list[str],
             freeze_base: bool, tensors: dict[str, torch.Tensor], directory: Any) -> Any:
    try:
        return install(model, cfg, unique_name(model, name, method), sites, train, freeze_base, tensors)
    except HookdeltaError as exc:
        raise DeltaFileError(f"the PEFT adapter in {directory} does not fit this model: {exc}") from None


def _tied(config: dict[str, Any]) -> bool:
    """PEFT's modules_to_save copies are used at the named module only, unless ensure_weight_tying."""
    return bool(config.get("ensure_weight_tying"))


def _alphas_by_site(sites: list[str], patterns: dict[str, Any]) -> dict[str, float]:
    out = {}
    for site in sites:
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", site):
                out[re.escape(site)] = float(value)
                break
    return out


# -- writing ------------------------------------------------------------------------------------


def save_peft(delta: Any, directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Write a LoRA or IA3 delta as a PEFT adapter directory (atomically, safetensors only)."""
    if delta.method not in ("lora", "ia3", "soft_prompt"):
        raise UnsupportedModuleError(
            f"PEFT's adapter files hold LoRA, IA3 and soft-prompt deltas here; {delta.name!r} is a {delta.method} "
            "delta. Save it with delta.save()."
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DeltaFileError(f"cannot save delta {delta.name!r}: {directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite and _saved_by(directory) != delta.uid:
        raise DeltaFileError(f"{directory} exists and holds files this delta did not write; pass overwrite=True to "
                             "replace them, or choose an empty directory")
    tied = [p.key for p in delta.pieces.values() if isinstance(p, TiedCopy)]
    if tied:
        raise UnsupportedModuleError(
            f"delta {delta.name!r} trains one copy of a tied tensor for all its holders ({tied[0]}); PEFT's "
            "modules_to_save cannot express that. Save it with delta.save(), or attach with tie_also_train=False"
        )
    train = set(delta.also_train)
    tensors: dict[str, torch.Tensor] = {}
    prefix = PROMPT_PREFIX if delta.method == "soft_prompt" else PREFIX  # prompt models are not wrapped twice
    for piece in delta.pieces.values():
        if piece.key in train:  # modules_to_save: the trained copies under the module's own names
            for n, t in piece.named_parameters(recurse=False):
                tensors[f"{prefix}{piece.key}.{n}"] = t.detach().contiguous()
    adapted = [p for p in delta.pieces.values() if p.key not in train]
    model = delta.model
    config = {
        "task_type": None, "inference_mode": True, "target_modules": [p.key for p in adapted],
        "fan_in_fan_out": any(is_conv1d(model.get_submodule(p.key)) for p in adapted),
        "modules_to_save": sorted(train) or None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    if delta.method == "soft_prompt":
        if is_encoder_decoder(model):
            raise UnsupportedModuleError("hookdelta writes PEFT prompt-tuning files for decoder-only and encoder-only models")
        (piece,) = [p for p in adapted if hasattr(p, "prompt")]
        tensors["prompt_embeddings"] = piece.prompt.detach().contiguous()
        layers, _, _ = attention_shape(model)
        suffix = type(model).__name__
        task = ("CAUSAL_LM" if suffix.endswith("CausalLM") else "SEQ_CLS" if suffix.endswith("SequenceClassification")
                else "TOKEN_CLS" if suffix.endswith("TokenClassification") else "FEATURE_EXTRACTION")
        config.update(peft_type="PROMPT_TUNING", task_type=task, num_virtual_tokens=piece.length,
                      token_dim=piece.prompt.shape[1], num_transformer_submodules=1, num_layers=layers,
                      num_attention_heads=model.config.num_attention_heads, prompt_tuning_init="RANDOM")
        for field in ("target_modules", "fan_in_fan_out"):  # not prompt-tuning fields
            del config[field]
    elif delta.method == "ia3":
        for piece in adapted:  # PEFT's shapes: [1, in] when the input is scaled, [out, 1] otherwise
            shape = (1, -1) if piece.on_input else (-1, 1)
            tensors[PREFIX + piece.key + ".ia3_l"] = piece.ia3_l.detach().reshape(shape).contiguous()
        config.update(peft_type="IA3", init_ia3_weights=True,
                      feedforward_modules=[p.key for p in adapted if p.on_input])
    else:
        config.update(_lora_files(delta, adapted, tensors))
    _write(directory, tensors, config, delta.uid)


def _lora_files(delta: Any, pieces: list[Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Adds the LoRA tensors under PEFT's names; returns the LoRA part of the config."""
    cfg: LoRAConfig = delta.config
    odd = [p.key for p in pieces if isinstance(p, (TiedLoRA, TiedParameter, LoRAParameter, LoRASlices))
           or getattr(p, "lora_bias", None) is not None]
    if odd:
        raise UnsupportedModuleError(
            f"delta {delta.name!r} uses LoRA features PEFT's files cannot express here (tied weights, parameter "
            f"targets, fused_slices or bias='lora_only') at {odd[:3]}; save it with delta.save() instead"
        )
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for piece in pieces:
        embedding = isinstance(delta.model.get_submodule(piece.key), nn.Embedding)
        a, b = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
        tensors[PREFIX + piece.key + a] = piece.lora_A.detach().contiguous()
        tensors[PREFIX + piece.key + b] = piece.lora_B.detach().contiguous()
        if hasattr(piece, "magnitude"):
            tensors[PREFIX + piece.key + ".lora_magnitude_vector"] = piece.magnitude.detach().contiguous()
        r = cfg.rank_for(piece.key)
        if r != cfg.r:
            ranks[re.escape(piece.key)] = r
        alpha = cfg.scale_for(piece.key) * (r ** 0.5 if cfg.use_rslora else r)
        if abs(alpha - cfg.alpha) > 1e-12 * max(1.0, abs(cfg.alpha)):
            alphas[re.escape(piece.key)] = alpha
    return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "rank_pattern": ranks, "alpha_pattern": alphas, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
            "bias": "none", "init_lora_weights": True, "layers_to_transform": None}


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], uid: str) -> None:
    # the delta's identity goes into the safetensors metadata (PEFT ignores it; adapter_config.json
    # stays PEFT's own): saving again from the same delta is allowed without overwrite
    meta = {"format": "pt", "hookdelta_delta_id": uid}
    write_files(directory, [(WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=meta)),
                            (CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))])


def _saved_by(directory: Path) -> str | None:
    """The hookdelta delta that wrote the PEFT adapter in `directory`, if one did."""
    try:
        with safe_open(str(directory / WEIGHTS), framework="pt") as f:
            return (f.metadata() or {}).get("hookdelta_delta_id")
    except Exception:  # missing or unreadable: not ours
        return None
