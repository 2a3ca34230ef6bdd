"""P-tuning (Liu et al. 2021, "GPT understands, too"): a soft prompt whose virtual tokens are
not trained directly but come out of a small encoder over trained embeddings, an MLP
(Linear-ReLU-Linear-ReLU-Linear, PEFT's default) or a bidirectional LSTM with an MLP head: the
reparametrisation makes prompt training steadier. PEFT's arithmetic (its PromptEncoder) and
files (P_TUNING). hookdelta's own files keep the encoder, so training resumes where it stopped;
PEFT's files hold only the encoder's output (the prompt it runs in inference), so they load as,
and are written from, the prompt that output is: a P_TUNING file loads as a soft prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import check_choice, check_float, check_int
from ..engine import Piece
from ..errors import UnsupportedModuleError
from ..model_inputs import attention_shape, is_encoder_decoder
from .prompt_base import PromptConfig, vocab_rows
from .soft_prompt import PromptTuningCodec, SoftPrompt, place_prompt, prompt_task


@dataclass(frozen=True, kw_only=True)
class PTuningConfig(PromptConfig):
    """P-tuning: num_virtual_tokens; encoder "MLP" or "LSTM" of width encoder_hidden_size (None: the
    model's hidden size); encoder_num_layers and encoder_dropout for the LSTM (PEFT's MLP has three
    layers whatever the count); init of the embeddings the encoder reads: "random" (N(0, 1), as
    PEFT's nn.Embedding) or "from_vocab"."""

    encoder: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    method = "p_tuning"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "encoder", ("MLP", "LSTM"))
        if self.encoder_hidden_size is not None:
            check_int(self, "encoder_hidden_size")
        check_int(self, "encoder_num_layers")
        check_float(self, "encoder_dropout", low=0.0, high=1.0)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        return place_prompt(
            model,
            sites,
            lambda path, site, embedding, pad, cache: EncodedPrompt(self, path, site, embedding, pad, cache),
        )


class EncodedPrompt(SoftPrompt):
    """The prompt is encoder(embeddings): PEFT's PromptEncoder, its tensors named as PEFT's."""

    def __init__(
        self,
        cfg: PTuningConfig,
        key: str,
        site_path: str,
        embedding: nn.Embedding,
        pad_labels: bool,
        cache_arg: str | None,
    ) -> None:
        super().__init__(key, site_path, None, embedding, pad_labels, cache_arg)
        vocab = embedding.weight.detach()
        dim, width, count = vocab.shape[1], cfg.encoder_hidden_size or vocab.shape[1], cfg.num_virtual_tokens
        kw: dict[str, Any] = {"device": vocab.device, "dtype": vocab.dtype}
        start = vocab_rows(vocab, count) if cfg.init == "from_vocab" else torch.randn(count, dim, **kw)
        self.prompt_embedding = nn.Parameter(start)
        self.kind = cfg.encoder
        if cfg.encoder == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=width,
                num_layers=cfg.encoder_num_layers,
                dropout=cfg.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                **kw,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * width, 2 * width, **kw), nn.ReLU(), nn.Linear(2 * width, dim, **kw)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, width, **kw),
                nn.ReLU(),
                nn.Linear(width, width, **kw),
                nn.ReLU(),
                nn.Linear(width, dim, **kw),
            )

    def virtual(self) -> torch.Tensor:
        x = self.prompt_embedding.unsqueeze(0)  # PEFT encodes one [1, P, dim] sample
        if self.kind == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    @property
    def length(self) -> int:
        return self.prompt_embedding.shape[0]

    def describe(self) -> str:
        return f"P-tuning ×{self.length} tokens ({self.kind} encoder)"


class PTuningCodec(PromptTuningCodec):
    """PEFT's P_TUNING files: `prompt_embeddings`, the encoder's output. Read as a soft prompt (the
    encoder is not in the file); written from the current encoder output, in inference form."""

    peft_type = "P_TUNING"
    understood = PromptTuningCodec.understood | {
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    }

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        model = delta.model
        if is_encoder_decoder(model):
            raise UnsupportedModuleError(
                "hookdelta writes PEFT P-tuning files for decoder-only and encoder-only models"
            )
        (piece,) = [p for p in pieces if isinstance(p, EncodedPrompt)]
        cfg: PTuningConfig = delta.config
        with torch.no_grad():
            prompt = piece.virtual().detach().contiguous()
        layers, _, _ = attention_shape(model)
        fields = {
            "peft_type": "P_TUNING",
            "task_type": prompt_task(model),
            "num_virtual_tokens": piece.length,
            "token_dim": prompt.shape[1],
            "num_transformer_submodules": 1,
            "num_layers": layers,
            "num_attention_heads": model.config.num_attention_heads,
            "encoder_reparameterization_type": cfg.encoder,
            "encoder_hidden_size": cfg.encoder_hidden_size or prompt.shape[1],
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_dropout": cfg.encoder_dropout,
        }
        return fields, {"prompt_embeddings": prompt}


PTuningConfig.peft_codec = PTuningCodec()
