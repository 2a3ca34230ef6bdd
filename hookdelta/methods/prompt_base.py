"""What the prompt methods (soft prompt, prefix) share: a number of virtual tokens, an init
choice, no targets (they go in front of the input, found from the model's input
embeddings), and rows of the model's own vocabulary as a starting point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import DeltaConfig, check_choice, check_int
from ..errors import ConfigError
from ..model_inputs import input_embeddings_path


@dataclass(frozen=True, kw_only=True)
class PromptConfig(DeltaConfig):
    """num_virtual_tokens: how many virtual tokens; init: one of the method's `inits`."""

    num_virtual_tokens: int = 20
    init: str = "random"

    inits: ClassVar[tuple[str, ...]] = ("random", "from_vocab")
    goes: ClassVar[str] = "in front of the input"  # completes "... takes no targets or layers: it goes ..."

    def validate(self) -> None:
        check_int(self, "num_virtual_tokens")
        check_choice(self, "init", list(self.inits))
        if self.targets is not None or self.layers is not None:
            raise ConfigError(f"{type(self).__name__} takes no targets or layers: it goes {self.goes}")

    def select(self, model: nn.Module) -> list[str]:
        return [input_embeddings_path(model)]


def vocab_rows(vocab: torch.Tensor, count: int) -> torch.Tensor:
    """`count` random rows of a [vocab, hidden] embedding matrix (a copy): virtual tokens that
    start out as real words."""
    return vocab[torch.randint(0, vocab.shape[0], (count,), device=vocab.device)].detach().clone()
