"""Semantic layer names, default positions per method and family, and config validation
for every method."""

import pytest
import torch.nn as nn
import transformers as tf
from internals import child_names
from tiny_models import TEXT, build

import hookdelta as hd

EXPECTED = {  # family -> semantic name -> the leaf names it must select in block 0
    "bert": {
        "attn.q": {"query"},
        "attn.o": {"attention.output.dense"},
        "ffn.in": {"intermediate.dense"},
        "ffn.out": {"layer.0.output.dense"},
    },
    "gpt2": {
        "attn.q": {"c_attn"},
        "attn.k": {"c_attn"},
        "attn.o": {"attn.c_proj"},
        "ffn.out": {"mlp.c_proj"},
        "ffn": {"mlp"},
    },
    "llama": {"attn.v": {"v_proj"}, "ffn.in": {"gate_proj", "up_proj"}, "ffn.out": {"down_proj"}, "ffn": {"mlp"}},
    "t5": {"attn.q": {"SelfAttention.q", "EncDecAttention.q"}, "ffn.out": {"DenseReluDense.wo"}},
    "bart": {"attn.o": {"self_attn.out_proj", "encoder_attn.out_proj"}, "ffn.in": {"fc1"}},
    "opt": {"attn.k": {"k_proj"}, "ffn.out": {"fc2"}},
    "vit": {"attn.q": {"q_proj"}, "ffn.in": {"mlp.fc1"}},
}


def block0(paths):
    return {p for p in paths if ".0." in p}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_semantic_names_select_each_familys_layers(arch):
    model = build(arch)[0]
    expected = EXPECTED[arch]
    if arch == "vit" and not any(n.endswith(".q_proj") for n, _ in model.named_modules()):
        expected = {"attn.q": {"attention.query"}, "ffn.in": {"intermediate.dense"}}  # before transformers 5
    for name, leaves in expected.items():
        got = block0(hd.match(model, name))
        assert got and all(any(p.endswith("." + leaf) for leaf in leaves) for p in got), (name, got)
        assert {leaf for leaf in leaves if any(p.endswith("." + leaf) for p in got)} == leaves


def test_fused_projections_of_phi3_and_semantic_exclude():
    model = tf.Phi3ForCausalLM(tf.Phi3Config(**TEXT, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0))
    assert hd.match(model, ["attn.q", "attn.v"]) == hd.match(model, "qkv_proj")
    llama = build("llama")[0]
    assert hd.match(llama, "all-linear", exclude="ffn.in") == hd.match(
        llama, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    )


def test_norm_is_found_by_type_on_any_model():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

        def forward(self, x):
            return self.ln(self.proj(x))

    assert hd.match(Custom(), "norm") == ["ln"]
    assert hd.match(build("llama")[0], "norm")[-1] == "model.norm"


def test_unknown_family_asks_for_explicit_targets():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)

        def forward(self, x):
            return self.q(x)

    model = Custom()
    for cfg in (hd.LoRAConfig(), hd.AdapterConfig(), hd.IA3Config()):
        with pytest.raises(hd.SelectorError, match="Custom.*explicit targets"):
            hd.attach(model, cfg)
        assert not hd.deltas(model) and "_hookdelta" not in child_names(model)
    assert hd.attach(model, hd.AdapterConfig(targets="q", bottleneck_dim=2)).sites == ["q"]


def test_family_without_the_module_says_what_it_has():
    with pytest.raises(hd.SelectorError, match="no single module for 'ffn'.*attn.q"):
        hd.match(build("bert")[0], "ffn")


@pytest.mark.parametrize(
    "cfg,arch,expected",
    [
        (hd.LoRAConfig(), "llama", ["q_proj", "v_proj"]),
        (hd.AdapterConfig(), "llama", ["o_proj", "down_proj"]),
        (hd.AdapterConfig(placement="pfeiffer"), "bert", ["output.dense"]),
        (hd.ParallelAdapterConfig(), "llama", ["mlp"]),
        (hd.ParallelAdapterConfig(), "bert", ["output.dense"]),  # no single FFN module: the FFN output layer
        (hd.IA3Config(), "llama", ["k_proj", "v_proj", "down_proj"]),
        (hd.IA3Config(), "gpt2", ["c_attn", "mlp.c_proj"]),
        (hd.CompacterConfig(), "t5", ["wo"]),
        (hd.LNTuningConfig(), "gpt2", ["ln_1", "ln_2", "ln_f"]),
    ],
)
def test_default_positions(cfg, arch, expected):
    sites = cfg.select(build(arch)[0])
    assert sites and all(any(s.endswith(e) for e in expected) for s in sites)
    assert all(any(s.endswith(e) for s in sites) for e in expected)


def test_ia3_scales_the_ffn_input_and_the_kv_outputs():
    d = hd.attach(build("llama")[0], hd.IA3Config())
    sides = {p.key.rsplit(".", 1)[-1]: p.on_input for p in d.pieces.values()}
    assert sides == {"k_proj": False, "v_proj": False, "down_proj": True}


def test_non_mergeable_methods_say_so():
    model, inputs, _ = build("llama")
    for cfg in (hd.AdapterConfig(), hd.CompacterConfig(bottleneck_dim=8), hd.SoftPromptConfig(), hd.PrefixConfig()):
        d = hd.attach(model, cfg)
        with pytest.raises(hd.MergeError, match="cannot be merged"):
            d.merge()
        d.detach()


BAD = [
    (hd.AdapterConfig, dict(bottleneck_dim=0)),
    (hd.AdapterConfig, dict(non_linearity="softmax")),
    (hd.AdapterConfig, dict(placement="middle")),
    (hd.AdapterConfig, dict(scaling=0)),
    (hd.AdapterConfig, dict(reduction_factor=1.5)),
    (hd.ParallelAdapterConfig, dict(scaling=float("inf"))),
    (hd.ParallelAdapterConfig, dict(bottleneck_dim="8")),
    (hd.LowRankAdapterConfig, dict(rank=0)),
    (hd.CompacterConfig, dict(phm_dim=0)),
    (hd.CompacterConfig, dict(shared_phm_rule="yes")),
    (hd.CompacterConfig, dict(phm_rank=-1)),
    (hd.BitFitConfig, dict(norm_biases=1)),
    (hd.IA3Config, dict(feedforward_targets=[])),
    (hd.PrefixConfig, dict(num_virtual_tokens=0)),
    (hd.PrefixConfig, dict(prefix_projection="no")),
    (hd.PrefixConfig, dict(targets="q_proj")),
    (hd.PrefixConfig, dict(encoder_hidden_size=0)),
    (hd.SoftPromptConfig, dict(num_virtual_tokens=2.0)),
    (hd.SoftPromptConfig, dict(init="zeros")),
    (hd.SoftPromptConfig, dict(init="text")),
    (hd.SoftPromptConfig, dict(layers=[0])),
    (hd.LNTuningConfig, dict(layers=[-2])),
    (hd.LoRAConfig, dict(use_dora="true")),
]


@pytest.mark.parametrize("cls,bad", BAD, ids=[f"{c.__name__}-{list(b)[0]}" for c, b in BAD])
def test_every_config_validates_its_fields(cls, bad):
    with pytest.raises(hd.ConfigError):
        cls(**bad)


@pytest.mark.parametrize(
    "cls",
    [
        hd.AdapterConfig,
        hd.ParallelAdapterConfig,
        hd.LowRankAdapterConfig,
        hd.CompacterConfig,
        hd.BitFitConfig,
        hd.IA3Config,
        hd.LNTuningConfig,
        hd.PrefixConfig,
        hd.SoftPromptConfig,
    ],
)
def test_every_config_round_trips_through_json(cls):
    cfg = cls(exclude=["lm_head"]) if cls not in (hd.PrefixConfig, hd.SoftPromptConfig) else cls(num_virtual_tokens=7)
    assert hd.DeltaConfig.from_json(cfg.to_json()) == cfg


def test_compacter_phm_dim_must_divide_the_widths():
    model = build("llama")[0]
    with pytest.raises(hd.ConfigError, match="phm_dim=5"):
        hd.attach(model, hd.CompacterConfig(phm_dim=5, bottleneck_dim=10))
    assert not hd.deltas(model)
