"""LLaMA-Adapter (Zhang et al. 2023; PEFT's adaption_prompt): in each of the top `adapter_layers`
attention layers, `adapter_len` learned prompt tokens that every query also attends to, in a
softmax of their own scaled by a gate that starts at zero (a fresh adapter changes nothing):
out + o_proj(g · softmax(q·kₚᵀ/√d)·vₚ), with kₚ, vₚ the layer's own k/v projections of the prompt
(no rotary position) and q the layer's rotated queries. A forward hook on the attention module;
the adapter tokens do not enter the KV cache, so generation is unchanged in shape. PEFT's
arithmetic and files (ADAPTION_PROMPT), for the model types PEFT builds it for (Llama, Mistral,
GPT-2; on GPT-2 the term is added after c_proj without it, as PEFT does). A model whose o_proj
has a bias is refused: PEFT would add that bias a second time for the adapter term."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DeltaConfig, PeftCodec, check_int
from ..engine import Piece
from ..errors import ConfigError, DeltaFileError, UnsupportedModuleError
from ..model_inputs import bind
from ..modules import Layer
from ..roles import roles

TYPES = ("llama", "mistral", "gpt2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True, kw_only=True)
class LlamaAdapterConfig(DeltaConfig):
    """LLaMA-Adapter: adapter_len prompt tokens in each of the top adapter_layers attention layers.
    Takes no targets or layers: it goes on the attention of the top layers."""

    adapter_len: int = 10
    adapter_layers: int = 8

    method = "llama_adapter"

    def validate(self) -> None:
        check_int(self, "adapter_len")
        check_int(self, "adapter_layers")
        if self.targets is not None or self.layers is not None:
            raise ConfigError(
                "LlamaAdapterConfig takes no targets or layers: it goes on the attention of the top "
                "adapter_layers layers"
            )

    def select(self, model: nn.Module) -> list[str]:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in TYPES:
            raise UnsupportedModuleError(
                f"LLaMA-Adapter is built for {list(TYPES)} models (as PEFT's adaption_prompt), not {kind!r}"
            )
        found = list(dict.fromkeys(q.rpartition(".")[0] for q in roles(model).get("attn.q", [])))
        if self.adapter_layers > len(found):
            raise ConfigError(
                f"LlamaAdapterConfig.adapter_layers={self.adapter_layers}, but the model has "
                f"{len(found)} attention layers"
            )
        return found[-self.adapter_layers :]

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        config: Any = model.config
        return [
            GatedPrompt(self, key, model.get_submodule(key), config.model_type, config.num_attention_heads)
            for key in sites
        ]


class GatedPrompt(Piece):
    hooks = frozenset({"post"})
    mergeable = False
    routable = False  # it reads the call's position embeddings, shared by the batch's rows
    unroutable = "reads the attention call's position embeddings, which belong to the whole batch"

    def __init__(self, cfg: LlamaAdapterConfig, key: str, attn: Layer, kind: str, heads: int) -> None:
        super().__init__(key)
        self.gpt2 = kind == "gpt2"
        proj = attn.c_attn if self.gpt2 else attn.q_proj
        if not self.gpt2 and getattr(attn.o_proj, "bias", None) is not None:
            raise UnsupportedModuleError(
                f"LLaMA-Adapter at {key!r}: its o_proj has a bias, which PEFT's arithmetic adds "
                "again for the adapter term; not built for such models"
            )
        width = attn.c_attn.weight.shape[0] if self.gpt2 else attn.q_proj.in_features
        kw: dict[str, Any] = {
            "device": proj.weight.device,
            "dtype": proj.weight.dtype if proj.weight.is_floating_point() else torch.float32,
        }
        self.adaption_prompt = nn.Parameter(torch.randn(1, cfg.adapter_len, width, **kw))
        self.adaption_gate = nn.Parameter(torch.zeros(1, **kw))
        self.heads, self.head_dim = heads, attn.head_dim

    def _prompt_kv(self, attn: Layer, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gpt2:
            _, k, v = attn.c_attn(self.adaption_prompt).split(width, dim=2)
        else:
            k, v = attn.k_proj(self.adaption_prompt), attn.v_proj(self.adaption_prompt)
        kv_heads = k.shape[-1] // self.head_dim  # (grouped-query attention: fewer k/v heads)
        shape = (1, -1, kv_heads, self.head_dim)
        k, v = (t.view(shape).transpose(1, 2).repeat_interleave(self.heads // kv_heads, dim=1) for t in (k, v))
        return k, v

    def _queries(self, attn: Layer, kw: dict[str, Any]) -> torch.Tensor:
        hidden = kw["hidden_states"]
        b, n, _ = hidden.shape
        if self.gpt2:
            q = attn.c_attn(hidden).split(attn.split_size, dim=2)[0]
            return q.view(b, n, -1, self.head_dim).transpose(1, 2)
        q = attn.q_proj(hidden).view(b, n, -1, self.head_dim).transpose(1, 2)
        if kw.get("position_embeddings") is None:
            raise UnsupportedModuleError(
                "LLaMA-Adapter needs the rotary position embeddings the model passes its "
                "attention (transformers 4.48 and later)"
            )
        cos, sin = kw["position_embeddings"]
        return q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        kw = bind(module, args, kwargs)
        q = self._queries(module, kw)
        k, v = self._prompt_kv(module, out.shape[-1])
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(self.head_dim)
        scores = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        extra = (scores @ v.expand(q.shape[0], -1, -1, -1)).transpose(1, 2).reshape(out.shape[0], out.shape[1], -1)
        if not self.gpt2:
            extra = module.o_proj(extra)
        new = (out + extra).to(q.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def describe(self) -> str:
        return f"LLaMA-Adapter ×{self.adaption_prompt.shape[1]} tokens, gated"


class LlamaAdapterCodec(PeftCodec):
    """PEFT's ADAPTION_PROMPT files: adaption_prompt [1, L, hidden] and adaption_gate [1] on each
    adapted attention module (the top adapter_layers)."""

    peft_type = "ADAPTION_PROMPT"
    understood = frozenset({"adapter_len", "adapter_layers", "target_modules"})
    suffixes = {".adaption_prompt": "adaption_prompt", ".adaption_gate": "adaption_gate"}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        lengths = {int(ts["adaption_prompt"].shape[1]) for ts in named.values() if "adaption_prompt" in ts}
        if len(lengths) != 1:
            raise DeltaFileError(f"the adaption-prompt file's layers hold prompts of lengths {sorted(lengths)}")
        cfg = LlamaAdapterConfig(adapter_len=lengths.pop(), adapter_layers=len(named), **common)
        expected = cfg.select(model)
        if sorted(expected) != sorted(named):
            raise DeltaFileError(
                f"the adaption-prompt file adapts {sorted(named)}, not the top {len(named)} attention "
                f"layers of this model ({sorted(expected)})"
            )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: LlamaAdapterConfig = delta.config
        fields = {
            "peft_type": "ADAPTION_PROMPT",
            "task_type": "CAUSAL_LM",
            "adapter_len": cfg.adapter_len,
            "adapter_layers": cfg.adapter_layers,
            "target_modules": "attn" if delta.model.config.model_type == "gpt2" else "self_attn",
        }
        return fields, self.piece_tensors(pieces)


LlamaAdapterConfig.peft_codec = LlamaAdapterCodec()
