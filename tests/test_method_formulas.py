"""Each method's output against its formula, written out by hand on a single layer (or, for
prompts and prefixes, against the untouched model fed the equivalent inputs)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import perturb
from tiny_models import Holder, build, main_output

import hookdelta as hd


def linear_case(bias=True):
    torch.manual_seed(3)
    return Holder(nn.Linear(8, 12, bias=bias)), torch.randn(2, 5, 8)


def tensors(delta):
    """The single site's tensors by short name."""
    (piece,) = [p for p in delta.pieces.values() if p.key != "phm_rule"]
    return piece


@pytest.mark.adapter
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_adapter_formula(act):
    model, x = linear_case()
    with torch.no_grad():
        h = model.layer(x)
    d = hd.attach(model, hd.AdapterConfig(targets="layer", bottleneck_dim=3, non_linearity=act, scaling=0.5))
    perturb(d)
    p = tensors(d)
    f = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[act]
    expected = h + 0.5 * (f(h @ p.down.weight.T + p.down.bias) @ p.up.weight.T + p.up.bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parallel_adapter
def test_parallel_adapter_formula():
    model, x = linear_case()
    with torch.no_grad():
        h = model.layer(x)
    d = hd.attach(model, hd.ParallelAdapterConfig(targets="layer", bottleneck_dim=3, scaling=4.0))
    perturb(d)
    p = tensors(d)
    expected = h + 4.0 * (torch.relu(x @ p.down.weight.T + p.down.bias) @ p.up.weight.T + p.up.bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.low_rank_adapter
def test_low_rank_adapter_formula():
    model, x = linear_case()
    with torch.no_grad():
        h = model.layer(x)
    d = hd.attach(model, hd.LowRankAdapterConfig(targets="layer", bottleneck_dim=4, rank=2))
    perturb(d)
    p = tensors(d)
    down_w = p.down.B @ p.down.A  # [bottleneck, width], rank 2
    up_w = p.up.B @ p.up.A
    assert torch.linalg.matrix_rank(down_w) == 2
    expected = h + (torch.relu(h @ down_w.T + p.down.bias) @ up_w.T + p.up.bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.compacter
@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_compacter_formula_kronecker_sum(factorized, shared):
    model, x = linear_case()
    with torch.no_grad():
        h = model.layer(x)
    cfg = hd.CompacterConfig(
        targets="layer",
        bottleneck_dim=4,
        phm_dim=2,
        factorized_phm=factorized,
        shared_phm_rule=shared,
        non_linearity="relu",
    )
    d = hd.attach(model, cfg)
    perturb(d)
    p = tensors(d)

    def phm(layer, rule):
        B = layer.s @ layer.t if factorized else layer.W
        return sum(torch.kron(rule[i], B[i]) for i in range(rule.shape[0]))  # [in, out]

    rules = (d.pieces["phm_rule"].down, d.pieces["phm_rule"].up) if shared else (p.down.rule, p.up.rule)
    w_down, w_up = phm(p.down, rules[0]), phm(p.up, rules[1])
    assert w_down.shape == (12, 4) and w_up.shape == (4, 12)
    expected = h + (torch.relu(h @ w_down + p.down.bias) @ w_up + p.up.bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.compacter
def test_compacter_shares_one_rule_across_layers():
    model = build("llama")[0]
    d = hd.attach(model, hd.CompacterConfig(bottleneck_dim=8, phm_dim=4))
    rule = d.pieces["phm_rule"]
    layers = [p for p in d.pieces.values() if p is not rule]
    assert len(layers) == 2
    assert all(p.down.rule_matrices() is rule.down and p.up.rule_matrices() is rule.up for p in layers)
    assert sum(1 for _ in d.parameters() if _ is rule.down) == 1


@pytest.mark.bitfit
@pytest.mark.parametrize("bias", [True, False])
def test_bitfit_formula(bias):
    model, x = linear_case(bias)
    with torch.no_grad():
        h = model.layer(x)
    d = hd.attach(model, hd.BitFitConfig(targets="layer"))
    perturb(d)
    torch.testing.assert_close(model(x), h + tensors(d).bias)


@pytest.mark.bitfit
def test_bitfit_on_conv_adds_per_channel():
    torch.manual_seed(0)
    model, x = Holder(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        h = model.layer(x)
    d = hd.attach(model, hd.BitFitConfig(targets="layer"))
    perturb(d)
    torch.testing.assert_close(model(x), h + tensors(d).bias[:, None, None])


@pytest.mark.ia3
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_formula(feedforward):
    model, x = linear_case()
    w, b = model.layer.weight, model.layer.bias
    cfg = hd.IA3Config(targets="layer", feedforward_targets="layer" if feedforward else None)
    d = hd.attach(model, cfg)
    perturb(d, std=0.5)
    gain = tensors(d).ia3_l
    expected = F.linear(x * gain, w, b) if feedforward else gain * F.linear(x, w, b)
    torch.testing.assert_close(model(x), expected)
    with torch.no_grad():
        unmerged = model(x)
        d.merge()
        torch.testing.assert_close(model(x), unmerged)


@pytest.mark.ia3
def test_ia3_on_transformers_conv1d_merges_on_the_right_axis():
    model = build("gpt2")[0]
    inputs = build("gpt2")[1]
    d = hd.attach(model, hd.IA3Config())
    perturb(d, std=0.5)
    with torch.no_grad():
        out = main_output(model(**inputs))
        d.merge()
        torch.testing.assert_close(main_output(model(**inputs)), out, rtol=1e-4, atol=1e-5)


@pytest.mark.ln_tuning
def test_ln_tuning_formula():
    torch.manual_seed(0)
    model, x = Holder(nn.LayerNorm(8)), torch.randn(3, 8)
    d = hd.attach(model, hd.LNTuningConfig(targets="layer"))
    perturb(d)
    p = tensors(d)
    expected = F.layer_norm(x, (8,), model.layer.weight + p.delta_weight, model.layer.bias + p.delta_bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.ln_tuning
def test_ln_tuning_on_rmsnorm_without_bias():
    model, inputs, _ = build("llama")
    d = hd.attach(model, hd.LNTuningConfig())
    assert {p.swaps for p in d.pieces.values()} == {("weight",)}
    assert len(d.sites) == 2 * 2 + 1  # two per block and the final norm


@pytest.mark.dora
@pytest.mark.parametrize("bias", [True, False])
def test_dora_formula(bias):
    model, x = linear_case(bias)
    w, b = model.layer.weight.detach().clone(), model.layer.bias
    d = hd.attach(model, hd.LoRAConfig(targets="layer", r=2, alpha=4, use_dora=True))
    p = tensors(d)
    torch.testing.assert_close(p.magnitude, w.norm(dim=1))
    perturb(d, std=0.3)
    updated = w + 2.0 * p.lora_B @ p.lora_A
    w_dora = p.magnitude[:, None] * updated / updated.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model(x), F.linear(x, w_dora, b))
    with torch.no_grad():
        d.merge()
        torch.testing.assert_close(model.layer.weight, w_dora)
        d.unmerge()
    assert torch.equal(model.layer.weight, w)


@pytest.mark.dora
def test_dora_refuses_layers_it_cannot_normalize():
    """DoRA takes linear layers, nn.Embedding and ungrouped convolutions (as PEFT); a grouped
    convolution or a transposed one is refused."""
    model = Holder(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(hd.UnsupportedModuleError, match="DoRA"):
        hd.attach(model, hd.LoRAConfig(targets="layer", use_dora=True))
    assert not hd.deltas(model)


# -- prompts and prefixes ---------------------------------------------------------------------


@pytest.mark.soft_prompt
@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_soft_prompt_equals_the_model_fed_the_prompt(arch):
    model, inputs, _ = build(arch)
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    d = hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=4))
    perturb(d)
    prompt = tensors(d).prompt if arch != "t5" else d.pieces["shared"].prompt
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        got = main_output(model(input_ids=ids, attention_mask=mask, **extra))
        with d.disabled():
            embeds = model.get_input_embeddings()(ids)
            embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), embeds], 1)
            ext = torch.cat([torch.ones(ids.shape[0], 4, dtype=mask.dtype), mask], 1)
            expected = main_output(model(inputs_embeds=embeds, attention_mask=ext, **extra))
    torch.testing.assert_close(got, expected)


@pytest.mark.soft_prompt
def test_soft_prompt_pads_causal_lm_labels():
    model, inputs, _ = build("llama")
    d = hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=4))
    perturb(d)
    ids = inputs["input_ids"]
    out = model(input_ids=ids, labels=ids)
    # the last prompt position predicts the first real token; prompt positions carry no label
    logits = out.logits[:, 3:-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.soft_prompt
def test_soft_prompt_init_from_vocab_copies_token_embeddings():
    model = build("llama")[0]
    d = hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=5, init="from_vocab"))
    vocab = model.get_input_embeddings().weight
    for row in tensors(d).prompt:
        assert (vocab == row).all(dim=1).any()


@pytest.mark.prefix
def test_prefix_attention_equals_hand_computed_attention():
    """BERT layer 0: softmax(Q·[Kp; K]ᵀ/√d)·[Vp; V], heads split by hand."""
    model, inputs, _ = build("bert")
    d = hd.attach(model, hd.PrefixConfig(num_virtual_tokens=3))
    perturb(d)
    attn = model.bert.encoder.layer[0].attention.self
    seen = {}
    handle = attn.register_forward_hook(
        lambda m, a, kw, out: seen.update(x=kw.get("hidden_states", a[0] if a else None), out=out[0]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    x = seen["x"]
    B, S, H = x.shape
    heads, hd_ = 4, H // 4
    kv = tensors(d).embedding.reshape(3, 2, 2, heads, hd_)  # [P, layers, k/v, heads, head_dim]
    pk, pv = kv[:, 0, 0].permute(1, 0, 2), kv[:, 0, 1].permute(1, 0, 2)  # [heads, P, hd]

    def split(t):
        return t.reshape(B, S, heads, hd_).transpose(1, 2)

    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    k = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd_), -1)
    expected = (weights @ v).transpose(1, 2).reshape(B, S, H)
    torch.testing.assert_close(seen["out"], expected)


@pytest.mark.prefix
def test_prefix_refuses_encoder_decoder_and_models_without_token_embeddings():
    for arch in ("t5", "vit"):
        model = build(arch)[0]
        with pytest.raises(hd.UnsupportedModuleError):
            hd.attach(model, hd.PrefixConfig())
        assert not hd.deltas(model)


@pytest.mark.prefix
def test_prefix_from_vocab_starts_as_the_models_own_keys_for_real_tokens():
    """BERT layer 0: the initial prefix keys are key(LayerNorm(word + position + type embedding))
    of the random vocabulary tokens drawn at attach time (reproduced with the same seed)."""
    model, _, _ = build("bert")
    torch.manual_seed(5)
    d = hd.attach(model, hd.PrefixConfig(num_virtual_tokens=3))
    torch.manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    emb = model.bert.embeddings
    with torch.no_grad():
        x = emb.LayerNorm(
            emb.word_embeddings(ids) + emb.position_embeddings.weight[:3] + emb.token_type_embeddings.weight[0]
        )
        keys = model.bert.encoder.layer[0].attention.self.key(x)[0]  # [3, hidden]
    prefix = tensors(d).embedding.reshape(3, 2, 2, 4, 8)[:, 0, 0].reshape(3, 32)  # layer 0, keys, heads joined
    torch.testing.assert_close(prefix, keys)


@pytest.mark.prefix
def test_prefix_random_init_is_standard_normal():
    model = build("llama")[0]
    d = hd.attach(model, hd.PrefixConfig(num_virtual_tokens=50, init="random"))
    assert abs(tensors(d).embedding.std().item() - 1.0) < 0.05
