"""A LoRA on fused expert tensors in the per-expert layout servers read (vLLM's MoE LoRA).

transformers 5 keeps a mixture-of-experts layer's experts fused (`mlp.experts.gate_up_proj`
[E, 2F, D]), while the checkpoints on the hub, and vLLM, name one matrix per expert and
projection (`block_sparse_moe.experts.3.w1`, `mlp.experts.3.gate_proj`). transformers converts
the one into the other when it loads a checkpoint, and says how in its conversion mapping
(`transformers.conversion_mapping.get_checkpoint_conversion_mapping`): which per-expert names
were stacked, concatenated along which dim, and which module names were renamed. This file runs
that recipe backwards for a LoRA's factors: expert e of a tensor that concatenates k projections
gets A_e and the k row blocks of B_e (ΔW_e = B_e·A_e, so each block is that projection's update).
Where the recipe is not a plain stack-and-concatenate, or a renaming is not a plain substring,
the export is refused rather than guessed.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from .errors import UnsupportedModuleError
from .roles import experts_transposed

_LITERAL = re.compile(r"^[\w.]+$")  # a renaming we can undo: a dotted name, no regex


def _recipe(model: nn.Module) -> list[Any]:
    """transformers' conversion mapping for the model (empty where there is none: transformers 4)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(get_checkpoint_conversion_mapping(model_type) or []) if model_type else []


def _patterns(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def checkpoint_name(model: nn.Module, path: str) -> str:
    """A module path of the loaded model under the checkpoint's names: transformers' plain
    renamings (Mixtral's `.block_sparse_moe.` -> `.mlp.`) undone, last first."""
    for step in reversed(_recipe(model)):
        if type(step).__name__ != "WeightRenaming":
            continue
        sources, targets = _patterns(step.source_patterns), _patterns(step.target_patterns)
        if len(sources) == len(targets) == 1 and _LITERAL.match(sources[0]) and _LITERAL.match(targets[0]):
            padded = f".{path}."
            if targets[0].strip(".") and f".{targets[0].strip('.')}." in padded:
                path = padded.replace(f".{targets[0].strip('.')}.", f".{sources[0].strip('.')}.", 1).strip(".")
    return path


def split_factors(
    model: nn.Module, key: str, a: torch.Tensor, b: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{per-expert module path (checkpoint names): (A [r, in], B [out, r])} for a LoRA with factors
    A [E, r, n], B [E, m, r] on the fused tensor `key` [E, m, n]; an UnsupportedModuleError where
    transformers' mapping does not say how the checkpoint splits it."""
    why = (
        f"{key!r} has no per-expert layout hookdelta can derive: transformers' conversion mapping for "
        f"model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}"
    )
    if experts_transposed(model, key):
        raise UnsupportedModuleError(
            f"{why} would need a transposition ({key!r} is stored [experts, in, out]). "
            "Servers that read fused experts (vLLM's 3-D MoE models) take save_peft()'s "
            "default layout"
        )
    for step in _recipe(model):
        if type(step).__name__ != "WeightConverter":
            continue
        for target in _patterns(step.target_patterns):
            bare = target.strip(".")
            if not (key == bare or key.endswith("." + bare)):
                continue
            ops = [type(op).__name__ for op in getattr(step, "operations", [])]
            concat = [op for op in getattr(step, "operations", []) if type(op).__name__ == "Concatenate"]
            sources = _patterns(step.source_patterns)
            if (
                not ops
                or ops[0] != "MergeModulelist"
                or any(o not in ("MergeModulelist", "Concatenate") for o in ops)
                or len(concat) > 1
                or (concat and getattr(concat[0], "dim", None) != 1)
                or any(s.count("*") != 1 or not s.endswith(".weight") for s in sources)
            ):
                raise UnsupportedModuleError(
                    f"{why} builds it with {ops}, not a stack of per-expert weights concatenated along their outputs"
                )
            prefix = key[: len(key) - len(bare)].rstrip(".")
            chunks = len(sources)
            if b.shape[1] % chunks:
                raise UnsupportedModuleError(
                    f"{why} concatenates {chunks} projections, which do not divide {key!r}'s {b.shape[1]} outputs"
                )
            out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for e in range(a.shape[0]):
                for source, rows in zip(sources, b[e].chunk(chunks, dim=0), strict=True):
                    name = source.strip(".")[: -len(".weight")].replace("*", str(e))
                    path = checkpoint_name(model, f"{prefix}.{name}" if prefix else name)
                    out[path] = (a[e], rows)
            return out
    raise UnsupportedModuleError(
        f"{why} does not name per-expert weights for it. Servers that read fused experts "
        "(vLLM's 3-D MoE models) take save_peft()'s default layout"
    )
