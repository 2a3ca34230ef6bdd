"""Tiny random models built from transformers configs (no downloads), and small seeded
modules of every layer kind LoRA supports. Each builder returns (model, inputs, lora targets)."""

from __future__ import annotations

import torch
import torch.nn as nn
import transformers as tf
from transformers import Conv1D

V, H, L = 96, 32, 2  # vocab, hidden, layers
TEXT = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=48)


def _ids(batch: int = 2, seq: int = 7, low: int = 3) -> torch.Tensor:
    return torch.randint(low, V, (batch, seq), generator=torch.Generator().manual_seed(1))


def bert():
    m = tf.BertForSequenceClassification(tf.BertConfig(**TEXT, max_position_embeddings=32, num_labels=2))
    return m, {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}, ["query", "value"]


def roberta():
    m = tf.RobertaForMaskedLM(tf.RobertaConfig(**TEXT, max_position_embeddings=40, pad_token_id=1))
    return m, {"input_ids": _ids()}, ["query", "value"]


def gpt2():
    m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=32))
    return m, {"input_ids": _ids()}, ["c_attn", "c_proj"]


def tied_llama() -> tf.LlamaForCausalLM:
    """A one-layer Llama whose output head is its input embedding (tie_word_embeddings)."""
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )


def llama(hidden: int = H):
    text = {**TEXT, "hidden_size": hidden}
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, max_position_embeddings=32))
    return m, {"input_ids": _ids()}, ["q_proj", "v_proj"]


def qwen2():
    m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT, num_key_value_heads=2, max_position_embeddings=32))
    return m, {"input_ids": _ids()}, ["q_proj", "v_proj"]


def t5():
    m = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=V, d_model=H, d_kv=8, d_ff=48, num_layers=L, num_decoder_layers=L, num_heads=4)
    )
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5)}, ["q", "v"]


def bart():
    m = tf.BartForConditionalGeneration(
        tf.BartConfig(
            vocab_size=V,
            d_model=H,
            encoder_layers=L,
            decoder_layers=L,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=32,
        )
    )
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5)}, ["q_proj", "v_proj"]


def opt():
    m = tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=L,
            ffn_dim=48,
            num_attention_heads=4,
            max_position_embeddings=32,
            word_embed_proj_dim=H,
        )
    )
    return m, {"input_ids": _ids()}, ["q_proj", "v_proj"]


def vit():
    m = tf.ViTForImageClassification(
        tf.ViTConfig(
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=16,
            patch_size=8,
            num_labels=3,
        )
    )
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return m, {"pixel_values": px}, ["attn.q", "attn.v"]  # (query/value before transformers 5, q_proj/v_proj since)


def mixtral():
    m = tf.MixtralForCausalLM(
        tf.MixtralConfig(
            **TEXT, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32
        )
    )
    return m, {"input_ids": _ids()}, ["q_proj", "v_proj"]


ARCHS = {f.__name__: f for f in (bert, roberta, gpt2, llama, qwen2, t5, bart, opt, vit, mixtral)}


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model, inputs, targets = ARCHS[arch]()
    return model.eval(), inputs, targets


def main_output(out):
    """The tensor to compare from a model's output (logits or the first tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


class Holder(nn.Module):
    """Wraps one layer so it can be a model root (hookdelta refuses bare containers)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def layer_cases():
    """(id, model, input) for each layer kind LoRA adapts through the output-side path."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    return [
        ("linear", Holder(nn.Linear(6, 5)), torch.randn(2, 4, 6, generator=g)),
        ("linear-nobias", Holder(nn.Linear(6, 5, bias=False)), torch.randn(3, 6, generator=g)),
        ("conv1d-transformers", Holder(Conv1D(5, 6)), torch.randn(2, 4, 6, generator=g)),
        ("embedding", Holder(nn.Embedding(11, 5, padding_idx=0)), torch.randint(0, 11, (2, 6), generator=g)),
        ("conv1d", Holder(nn.Conv1d(4, 6, 3, padding=1)), torch.randn(2, 4, 9, generator=g)),
        ("conv2d", Holder(nn.Conv2d(4, 6, 3, stride=2, padding=1)), torch.randn(2, 4, 8, 8, generator=g)),
        ("conv2d-grouped", Holder(nn.Conv2d(4, 6, 3, groups=2, padding=1)), torch.randn(2, 4, 7, 7, generator=g)),
        ("conv2d-1x1", Holder(nn.Conv2d(4, 6, 1)), torch.randn(2, 4, 5, 5, generator=g)),
        (
            "conv2d-reflect",
            Holder(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")),
            torch.randn(2, 4, 6, 6, generator=g),
        ),
    ]
