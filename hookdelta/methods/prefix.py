"""Prefix tuning (Li & Liang 2021): `num_virtual_tokens` learned key/value pairs in front of
every attention layer's keys and values. A forward-pre hook (with kwargs) on the model fills
the model's own key/value cache argument with the prefix before the call and widens the
attention mask to cover it; the model's attention layers then attend to it as to past
tokens. Real tokens keep the positions they have without the prefix (position_ids are
passed explicitly), so training and generate() agree.

Optional reparametrization (prefix_projection): the prefix is computed by a small MLP
(embedding -> Linear -> tanh -> Linear) from `encoder_hidden_size`-wide embeddings, as in
the paper and PEFT. Decoder-only and encoder-only models; not mergeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn

from .. import inits
from ..config import check_bool, check_int
from ..engine import Piece
from ..errors import UnsupportedModuleError
from ..model_inputs import (
    accepts,
    attention_shape,
    bind,
    cache_argument,
    cache_length,
    cache_taker,
    check_growable,
    is_encoder_decoder,
    main_input,
    widen_mask,
)
from .prompt_base import PromptConfig, vocab_rows


def _new_cache() -> Any:
    from transformers import DynamicCache  # imported on use: `import hookdelta` does not load transformers

    return DynamicCache()


def _cached(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.54
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


@torch.no_grad()
def token_key_values(taker: nn.Module, cache_arg: str, vocab: int, tokens: int, layers: int) -> torch.Tensor:
    """The keys and values the model itself computes for `tokens` random vocabulary tokens,
    [layers, 2, kv_heads, tokens, head_dim]: a prefix that starts out like real text."""
    device = next(taker.parameters()).device
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    cache = _new_cache()
    taker(input_ids=ids, **{cache_arg: cache})
    return torch.stack([torch.stack(_cached(cache, i))[:, 0, :, -tokens:] for i in range(layers)])


class Prefix(Piece):
    """The prefix's key/value tensors for every layer, passed in through the cache argument."""

    hooks = frozenset({"pre"})
    mergeable = False
    routable = False  # virtual tokens change the sequence length: rows would differ

    def __init__(
        self,
        key: str,
        shape: tuple[int, int, int],
        tokens: int,
        projection: int | None,
        like: torch.Tensor,
        site_path: str,
        cache_arg: str,
        positions: bool,
    ) -> None:
        super().__init__(site_path, key)
        self.layers, self.kv_heads, self.head_dim = shape
        width = self.layers * 2 * self.kv_heads * self.head_dim
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        if projection is None:
            self.embedding = nn.Parameter(torch.empty(tokens, width, **kw))  # filled by the config's init
            self.mlp = None
        else:
            hidden = like.shape[-1]
            self.embedding = nn.Parameter(torch.empty(tokens, hidden, **kw))
            self.mlp = nn.Sequential(nn.Linear(hidden, projection, **kw), nn.Tanh(), nn.Linear(projection, width, **kw))
        self.cache_arg = cache_arg
        self.positions = positions  # the model takes position_ids

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def key_values(self) -> torch.Tensor:
        """[layers, 2, 1, kv_heads, tokens, head_dim]"""
        flat = self.mlp(self.embedding) if self.mlp is not None else self.embedding
        kv = flat.reshape(self.length, self.layers, 2, self.kv_heads, self.head_dim)
        return kv.permute(1, 2, 3, 0, 4).unsqueeze(2)

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = bind(module, args, kwargs)
        cache = kw.get(self.cache_arg)
        check_growable(cache, "prefix tuning", self.length)
        past = cache_length(cache)
        source = main_input(kw)
        batch, new = source.shape[0], source.shape[1]
        P = self.length
        if past == 0:  # first call: put the prefix into the cache (generate() keeps the same object)
            if cache is None or not hasattr(cache, "update"):
                cache = _new_cache()
            dtype = self.embedding.dtype
            for layer, (k, v) in enumerate(self.key_values()):
                cache.update(k.expand(batch, -1, -1, -1).to(dtype), v.expand(batch, -1, -1, -1).to(dtype), layer)
            kw[self.cache_arg] = cache
            past = P
        widen_mask(kw, P, past + new - P)
        at = kw.get("cache_position")
        if isinstance(at, torch.Tensor) and at.numel():  # where the new tokens go in the cache
            first = int(at.reshape(-1)[0])
            if first == past - P:  # counted without the prefix (generate() on transformers 4.x): it holds P more
                kw["cache_position"] = at + P
            elif first != past:
                raise UnsupportedModuleError(
                    f"prefix tuning: cache_position starts at {first}, but the cache holds {past} entries "
                    f"({P} of them the prefix); pass cache_position counted with or without the prefix, or none"
                )
        if self.positions and kw.get("position_ids") is None:
            start = past - P
            kw["position_ids"] = torch.arange(start, start + new, device=source.device).unsqueeze(0).expand(batch, -1)
        return (), kw

    def describe(self) -> str:
        return f"prefix ×{self.length} tokens on {self.layers} layers" + (" (MLP)" if self.mlp is not None else "")


@dataclass(frozen=True, kw_only=True)
class PrefixConfig(PromptConfig):
    """Prefix tuning. num_virtual_tokens: prefix length; prefix_projection: compute the
    prefix with an MLP of width encoder_hidden_size (more stable training, as in the paper);
    init: "from_vocab" starts from the keys/values the model computes for random vocabulary
    tokens (Li & Liang's real-word initialization; with prefix_projection, the MLP's input
    starts as token embeddings) or "random" (standard normal, as PEFT)."""

    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    init: str = "from_vocab"

    method = "prefix"
    goes = "into every attention layer"

    def validate(self) -> None:
        super().validate()
        check_int(self, "encoder_hidden_size")
        check_bool(self, "prefix_projection")

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        if is_encoder_decoder(model):
            raise UnsupportedModuleError(
                f"prefix tuning in hookdelta supports decoder-only and encoder-only models; {type(model).__name__} is "
                "encoder-decoder (its cache holds self- and cross-attention and the encoder takes none). "
                "Use SoftPromptConfig or LoRA there."
            )
        (path,) = sites
        like = cast(torch.Tensor, model.get_submodule(path).weight)  # (the input embedding's)
        site, taker = cache_taker(model)
        P = self.num_virtual_tokens
        piece = Prefix(
            path,
            attention_shape(model),
            P,
            self.encoder_hidden_size if self.prefix_projection else None,
            like,
            site,
            cache_argument(taker),
            accepts(taker, "position_ids"),
        )
        with torch.no_grad():
            if inits.is_loading():  # (a saved prefix: the file holds the values; no forward to start it)
                pass
            elif self.init == "random":
                piece.embedding.normal_()
            elif self.prefix_projection:  # the MLP's input starts as token embeddings
                piece.embedding.copy_(vocab_rows(like, P))
            else:
                kv = token_key_values(taker, piece.cache_arg, like.shape[0], P, piece.layers)
                piece.embedding.copy_(kv.permute(3, 0, 1, 2, 4).reshape(P, -1))
        return [piece]
