"""Semantic layer names and the one table that maps them to each model family's modules.

`attn.q`, `attn.k`, `attn.v`, `attn.o`, `ffn.in`, `ffn.out` and `ffn` (the whole
feed-forward block, where the family has one module for it) work as selectors on every
family below and give each method its default positions. `norm` needs no table: it
selects normalization layers by type, on any model.

Each entry lists name selectors (suffixes, or `re:` regexes where a suffix is ambiguous);
a semantic name selects the union of what they match, so names from older and newer
transformers versions can sit side by side. Fused projections (GPT-2 `c_attn`, Phi-3
`qkv_proj`) appear under each of q, k and v; a module selected twice is adapted once.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .errors import SelectorError

SEMANTIC = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out", "ffn", "norm")

_BERT = {
    "attn.q": ("attention.self.query",), "attn.k": ("attention.self.key",),
    "attn.v": ("attention.self.value",), "attn.o": ("attention.output.dense",),
    "ffn.in": ("intermediate.dense",), "ffn.out": (r"re:.*layer\.\d+\.output\.dense",),
}
_LLAMA = {
    "attn.q": ("self_attn.q_proj",), "attn.k": ("self_attn.k_proj",), "attn.v": ("self_attn.v_proj",),
    "attn.o": ("self_attn.o_proj",), "ffn.in": ("mlp.gate_proj", "mlp.up_proj"),
    "ffn.out": ("mlp.down_proj",), "ffn": (r"re:.*layers\.\d+\.mlp",),
}
_PHI3 = {
    "attn.q": ("self_attn.qkv_proj",), "attn.k": ("self_attn.qkv_proj",), "attn.v": ("self_attn.qkv_proj",),
    "attn.o": ("self_attn.o_proj",), "ffn.in": ("mlp.gate_up_proj",), "ffn.out": ("mlp.down_proj",),
    "ffn": (r"re:.*layers\.\d+\.mlp",),
}
_GPT2 = {
    "attn.q": ("attn.c_attn",), "attn.k": ("attn.c_attn",), "attn.v": ("attn.c_attn",),
    "attn.o": ("attn.c_proj",), "ffn.in": ("mlp.c_fc",), "ffn.out": ("mlp.c_proj",), "ffn": ("mlp",),
}
_T5 = {  # self- and cross-attention alike, as PEFT's defaults do
    "attn.q": ("q",), "attn.k": ("k",), "attn.v": ("v",), "attn.o": ("o",),
    "ffn.in": ("wi", "wi_0", "wi_1"), "ffn.out": ("wo",), "ffn": ("DenseReluDense",),
}
_BART = {  # also OPT: self- and cross-attention alike
    "attn.q": ("q_proj",), "attn.k": ("k_proj",), "attn.v": ("v_proj",), "attn.o": ("out_proj",),
    "ffn.in": ("fc1",), "ffn.out": ("fc2",),
}
_DISTILBERT = {
    "attn.q": ("attention.q_lin",), "attn.k": ("attention.k_lin",), "attn.v": ("attention.v_lin",),
    "attn.o": ("attention.out_lin",), "ffn.in": ("ffn.lin1",), "ffn.out": ("ffn.lin2",), "ffn": ("ffn",),
}
_VIT = {  # transformers 5 names first, then 4.x names
    "attn.q": ("attention.q_proj", "attention.attention.query"),
    "attn.k": ("attention.k_proj", "attention.attention.key"),
    "attn.v": ("attention.v_proj", "attention.attention.value"),
    "attn.o": ("attention.o_proj", "attention.output.dense"),
    "ffn.in": ("mlp.fc1", "intermediate.dense"),
    "ffn.out": ("mlp.fc2", r"re:.*layer\.\d+\.output\.dense"), "ffn": (r"re:.*layers?\.\d+\.mlp",),
}
_MOE = {k: v for k, v in _LLAMA.items() if k.startswith("attn") or k == "ffn"}  # experts are fused parameters

# model_type (transformers' config.model_type) -> semantic name -> selectors
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT),
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "smollm3"), _LLAMA),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), _MOE),
    "phi3": _PHI3,
    **dict.fromkeys(("t5", "mt5"), _T5),
    **dict.fromkeys(("bart", "mbart", "opt"), _BART),
    "vit": _VIT,
}


def family(model: nn.Module) -> str | None:
    """The model's family key (its config's model_type), or None when it has no config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def is_semantic(selector: Any) -> bool:
    return isinstance(selector, str) and selector in SEMANTIC


def expand(model: nn.Module, name: str) -> list[Any]:
    """The concrete selectors a semantic name stands for on this model."""
    if name == "norm":
        return [is_norm]
    fam = family(model)
    table = FAMILIES.get(fam or "")
    if table is None:
        raise SelectorError(
            f"hookdelta has no table of layer names for {type(model).__name__} (model_type {fam!r}), so "
            f"{name!r} and the methods' default positions are unknown there; pass explicit targets, e.g. "
            "targets=['q_proj', 'v_proj'] (hd.match(model, ...) tries selectors without attaching)"
        )
    if name not in table:
        known = ", ".join(sorted(table))
        raise SelectorError(
            f"{type(model).__name__} has no single module for {name!r} (it has {known}); pass explicit targets"
        )
    return list(table[name])


def is_norm(name: str, module: nn.Module) -> bool:
    """Normalization layers with a weight: LayerNorm, RMSNorm, GroupNorm, BatchNorm (affine),
    InstanceNorm (affine) and look-alikes (T5LayerNorm, ...)."""
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    if isinstance(module, kinds) or type(module).__name__.endswith(("Norm", "LayerNorm")):
        return isinstance(getattr(module, "weight", None), nn.Parameter)
    return False
