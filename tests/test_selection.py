"""Selectors: every form, layers/exclude, and the errors for no match and unsupported types."""

import re

import pytest
import torch.nn as nn
from helpers import assert_restored, snapshot
from tiny_models import build

import hookdelta as hd


@pytest.fixture(scope="module")
def bert():
    return build("bert")[0]


@pytest.fixture(scope="module")
def llama():
    return build("llama")[0]


def test_suffix_matches_on_dotted_boundaries(bert):
    hits = hd.match(bert, "query")
    assert hits == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    assert hd.match(bert, "attention.self.query") == hits
    assert hd.match(bert, "self.query") == hits
    with pytest.raises(hd.SelectorError):
        hd.match(bert, "uery")  # not a whole component


def test_glob_regex_type_callable_and_lists(llama):
    glob = hd.match(llama, "layers.*.mlp.*_proj")
    assert len(glob) == 6 and all(".mlp." in n for n in glob)
    assert hd.match(llama, r"re:.*\.(q|v)_proj") == hd.match(llama, ["q_proj", "v_proj"])
    linear = hd.match(llama, nn.Linear)
    assert "lm_head" in linear and len(linear) == 2 * 7 + 1
    assert hd.match(llama, lambda name, m: name.endswith("o_proj")) == hd.match(llama, "o_proj")


def test_all_linear_excludes_the_output_head(llama):
    hits = hd.match(llama, "all-linear")
    assert "lm_head" not in hits and len(hits) == 2 * 7


def test_all_linear_covers_transformers_conv1d_and_skips_tied_head():
    gpt2 = build("gpt2")[0]
    hits = hd.match(gpt2, "all-linear")
    assert "lm_head" not in hits
    assert {h.rsplit(".", 1)[-1] for h in hits} == {"c_attn", "c_proj", "c_fc"}


def test_layers_and_exclude(llama):
    assert hd.match(llama, "q_proj", layers=[1]) == ["model.layers.1.self_attn.q_proj"]
    assert hd.match(llama, "q_proj", layers=range(0, 1)) == ["model.layers.0.self_attn.q_proj"]
    assert hd.match(llama, ["q_proj", "v_proj"], exclude="v_proj") == hd.match(llama, "q_proj")


def test_no_match_names_the_selector_and_suggests(bert):
    with pytest.raises(hd.SelectorError) as err:
        hd.match(bert, ["query", "vlaue"])
    text = str(err.value)
    assert "'vlaue'" in text and "value" in text.split("Closest")[1]


def test_everything_excluded_is_an_error(llama):
    with pytest.raises(hd.SelectorError, match="removed them all"):
        hd.match(llama, "q_proj", layers=[7])


def test_unsupported_module_type_is_named_and_model_untouched():
    model = build("bert")[0]
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError) as err:
        hd.attach(model, hd.LoRAConfig(targets="attention.self"))
    assert re.search(r"Bert\w*SelfAttention", str(err.value)) and "bert.encoder.layer.0.attention.self" in str(
        err.value
    )
    assert_restored(model, snap)


def test_bad_selector_on_attach_leaves_model_untouched():
    model = build("llama")[0]
    snap = snapshot(model)
    with pytest.raises(hd.SelectorError, match="q_prj"):
        hd.attach(model, hd.LoRAConfig(targets=["q_prj"]))
    assert_restored(model, snap)


def test_callable_that_raises_is_reported(llama):
    def broken(name, module):
        raise KeyError("oops")

    with pytest.raises(hd.SelectorError, match="raised"):
        hd.match(llama, broken)


@pytest.mark.parametrize(
    "bad",
    [
        dict(r=0),
        dict(r=2.5),
        dict(r=True),
        dict(alpha=0),
        dict(alpha=float("nan")),
        dict(dropout=1.0),
        dict(dropout=-0.1),
        dict(init="xavier"),
        dict(bias="all"),
        dict(use_rslora="yes"),
        dict(targets=[]),
        dict(targets=[3]),
        dict(targets=""),
        dict(layers=[-1]),
        dict(layers="0"),
        dict(use_dora=1),
    ],
)
def test_config_validates_every_field(bad):
    kwargs = {"targets": "q_proj", **bad}
    with pytest.raises(hd.ConfigError):
        hd.LoRAConfig(**kwargs)


def test_config_round_trips_through_json():
    cfg = hd.LoRAConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        targets=["q_proj", nn.Linear],
        exclude="re:.*0.*",
        layers=range(2, 4),
        use_rslora=True,
        also_train=["lm_head"],
    )
    again = hd.DeltaConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again, hd.LoRAConfig)
    with pytest.raises(hd.ConfigError, match="no field"):
        hd.DeltaConfig.from_dict({**cfg.to_dict(), "rank": 3})
