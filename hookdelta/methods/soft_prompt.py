"""Prompt tuning (Lester et al. 2021): `num_virtual_tokens` learned input embeddings put in
front of every input. A forward-pre hook (with kwargs) on the model embeds the input ids,
prepends the prompt and widens `attention_mask`, `token_type_ids`, `position_ids` and
causal-LM `labels` (with -100) to match.

With a key/value cache (generate()), only the first call, on an empty cache, gets the
prompt; later calls only widen the attention mask to cover the prompt already cached.
On encoder-decoder models the prompt goes in front of the encoder's input (a hook on the
encoder, so generate()'s separate encoder call gets it too), and a hook on the model
widens the encoder mask the decoder's cross-attention uses. Not mergeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec
from ..engine import Piece
from ..errors import ConfigError, DeltaFileError, UnsupportedModuleError
from ..model_inputs import (
    accepts,
    attention_shape,
    bind,
    cache_argument,
    cache_length,
    check_growable,
    input_embeddings_path,
    is_encoder_decoder,
    main_input,
    path_of,
    prepend,
    widen_mask,
)
from .prompt_base import PromptConfig, vocab_rows


class SoftPrompt(Piece):
    """The learned prompt [P, hidden], put in front of the inputs of the module it hooks."""

    hooks = frozenset({"pre"})
    mergeable = False
    routable = False  # virtual tokens change the sequence length: rows would differ

    def __init__(
        self,
        key: str,
        site_path: str,
        prompt: torch.Tensor | None,
        embedding: nn.Module,
        pad_labels: bool,
        cache_arg: str | None,
    ) -> None:
        super().__init__(site_path, key)
        if prompt is not None:  # (None: a subclass computes its prompt, see `virtual`)
            self.prompt = nn.Parameter(prompt)
        object.__setattr__(self, "embedding", embedding)  # the model's own layer: not a child
        self.pad_labels = pad_labels  # labels follow the input sequence: pad them with -100
        self.cache_arg = cache_arg

    def virtual(self) -> torch.Tensor:
        """The virtual tokens' embeddings [P, hidden] for this call."""
        return self.prompt

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        if self.cache_arg:
            check_growable(kw.get(self.cache_arg), "the soft prompt", self.length)
        past = cache_length(kw.get(self.cache_arg)) if self.cache_arg else 0
        P = self.length
        if past:  # continuing a generation whose cache already holds the prompt
            widen_mask(kw, P, past + main_input(kw).shape[1] - P)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = kw["position_ids"] + P
            return (), kw
        ids, embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise ValueError("the soft prompt needs input_ids or inputs_embeds")
            embeds = self.embedding(ids)
        seq = embeds.shape[1]
        prompt = self.virtual().to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        widen_mask(kw, P, seq)  # unless the encoder-decoder model hook widened it already
        if kw.get("token_type_ids") is not None:  # (set only where given: T5's stack takes none before transformers 5)
            kw["token_type_ids"] = prepend(kw["token_type_ids"], P, 0)
        position_ids = kw.get("position_ids")
        if position_ids is not None:
            ahead = torch.arange(P, device=position_ids.device, dtype=position_ids.dtype).expand(
                position_ids.shape[0], -1
            )
            kw["position_ids"] = torch.cat([ahead, position_ids + P], dim=1)
        labels = kw.get("labels")
        if self.pad_labels and labels is not None and labels.dim() == 2 and labels.shape[1] == seq:
            kw["labels"] = prepend(labels, P, -100)
        return (), kw

    def describe(self) -> str:
        return f"soft prompt ×{self.length} tokens"


class EncoderMask(Piece):
    """Encoder-decoder models: widen the encoder attention mask by the prompt's length."""

    hooks = frozenset({"pre"})
    mergeable = False
    routable = False  # virtual tokens change the sequence length: rows would differ

    def __init__(self, primary: SoftPrompt, site_path: str) -> None:
        super().__init__(site_path, key=primary.key + ":mask")
        object.__setattr__(self, "primary", primary)

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        P = self.primary.length
        if kw.get("attention_mask") is None:
            return (), kw
        encoded = kw.get("encoder_outputs")
        length = encoded[0].shape[1] if encoded is not None else main_input(kw).shape[1] + P
        widen_mask(kw, P, length - P)
        return (), kw

    def describe(self) -> str:
        return f"widens the encoder mask for {self.primary.key}"


def place_prompt(model: nn.Module, sites: Sequence[str], make: Any) -> list[Piece]:
    """A prompt piece in front of the input: `make(path, site, embedding, pad_labels, cache_arg)`
    builds it. Decoder-only and encoder-only models: on the model (labels padded, the cache
    argument watched); encoder-decoder models: on the encoder, plus the mask-widening piece."""
    (path,) = sites
    embedding = model.get_submodule(path)
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedModuleError(f"the input embedding {path!r} is a {type(embedding).__name__}, not nn.Embedding")
    if is_encoder_decoder(model):
        primary = make(path, path_of(model, model.get_encoder()), embedding, False, None)  # type: ignore[operator]  # transformers' method
        return [primary, EncoderMask(primary, "")]
    cache_arg = cache_argument(model) if accepts(model, "cache") or accepts(model, "past_key_values") else None
    return [make(path, "", embedding, True, cache_arg)]


def prompt_task(model: nn.Module) -> str:
    """PEFT's task_type for a prompt file written from `model`."""
    name = type(model).__name__
    return (
        "CAUSAL_LM"
        if name.endswith("CausalLM")
        else "SEQ_CLS"
        if name.endswith("SequenceClassification")
        else "TOKEN_CLS"
        if name.endswith("TokenClassification")
        else "FEATURE_EXTRACTION"
    )


@dataclass(frozen=True, kw_only=True)
class SoftPromptConfig(PromptConfig):
    """Prompt tuning. num_virtual_tokens: prompt length; init: "random" (normal, with the
    token embeddings' std), "from_vocab" (copies of random token embeddings) or "text"
    (the embeddings of `init_text`, tokenized with the tokenizer at `tokenizer`, repeated to
    length). No targets: the prompt goes in front of the input."""

    init_text: str | None = None
    tokenizer: str | None = None

    method = "soft_prompt"
    inits = ("random", "from_vocab", "text")

    def validate(self) -> None:
        super().validate()
        for name in ("init_text", "tokenizer"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"SoftPromptConfig.{name} must be a string, got {getattr(self, name)!r}")
        if self.init == "text" and not (
            isinstance(self.init_text, str) and self.init_text and isinstance(self.tokenizer, str)
        ):
            raise ConfigError('SoftPromptConfig(init="text") needs init_text="..." and tokenizer="<path or name>"')

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return place_prompt(
            model,
            sites,
            lambda path, site, embedding, pad, cache: SoftPrompt(
                path, site, self._init(embedding.weight.detach()), embedding, pad, cache
            ),
        )

    def _init(self, vocab: torch.Tensor) -> torch.Tensor:
        P = self.num_virtual_tokens
        if self.init == "random":
            return torch.randn(P, vocab.shape[1], device=vocab.device, dtype=vocab.dtype) * vocab.float().std().to(
                vocab.dtype
            )
        if self.init == "from_vocab":
            return vocab_rows(vocab, P)
        from transformers import AutoTokenizer  # imported on use: `import hookdelta` does not load transformers

        ids = AutoTokenizer.from_pretrained(self.tokenizer)(self.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"init_text {self.init_text!r} tokenizes to nothing")
        ids = (ids * (P // len(ids) + 1))[:P]
        if max(ids) >= vocab.shape[0]:
            raise ConfigError(
                f"the tokenizer at {self.tokenizer!r} gives ids beyond this model's vocabulary ({vocab.shape[0]})"
            )
        return vocab[torch.tensor(ids, device=vocab.device)].clone()


class PromptTuningCodec(PeftCodec):
    """PEFT's PROMPT_TUNING files: `prompt_embeddings` [tokens, hidden], put in front of the input
    (prompt learning holds the model directly: keys start with `base_model.`)."""

    peft_type = "PROMPT_TUNING"
    understood = frozenset(
        {
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "tokenizer_name_or_path",
            "tokenizer_kwargs",
            "modules_to_save",
        }
    )
    prefix = "base_model."
    fits_paths = False  # the prompt goes on this model's own input embeddings

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        submodules = peft_config.get("num_transformer_submodules") or 1
        return [f"num_transformer_submodules={submodules} (an encoder-decoder file)"] if submodules != 1 else []

    def place(self, model: nn.Module, key: str) -> tuple[str, str] | None:
        return (input_embeddings_path(model), "prompt") if key == "prompt_embeddings" else None

    def file_key(self, key: str) -> str:
        return key  # the prompt itself is stored without a prefix (modules_to_save copies have one)

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        ((site, tensors),) = named.items()
        prompt = tensors["prompt"]
        if prompt.dim() != 2:
            raise DeltaFileError(
                f"the prompt-tuning file's prompt_embeddings is {tuple(prompt.shape)}, not [tokens, hidden]"
            )
        return SoftPromptConfig(num_virtual_tokens=prompt.shape[0], **common), {f"{site}.prompt": prompt}

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        model = delta.model
        if is_encoder_decoder(model):
            raise UnsupportedModuleError(
                "hookdelta writes PEFT prompt-tuning files for decoder-only and encoder-only models"
            )
        (piece,) = [p for p in pieces if isinstance(p, SoftPrompt)]
        layers, _, _ = attention_shape(model)
        fields = {
            "peft_type": "PROMPT_TUNING",
            "task_type": prompt_task(model),
            "num_virtual_tokens": piece.length,
            "token_dim": piece.prompt.shape[1],
            "num_transformer_submodules": 1,
            "num_layers": layers,
            "num_attention_heads": model.config.num_attention_heads,
            "prompt_tuning_init": "RANDOM",
        }
        return fields, {"prompt_embeddings": piece.prompt.detach().contiguous()}


SoftPromptConfig.peft_codec = PromptTuningCodec()
