"""Soft prompts and prefixes inside model.generate(): the learned tokens steer generation,
and with the delta disabled generation equals the base model's, token for token."""

import pytest
import torch
from helpers import assert_restored, perturb, snapshot
from tiny_models import build

import hookdelta as hd

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def prompt_inputs(model, inputs):
    ids = inputs["input_ids"]
    return ids, torch.ones_like(ids)


def cases():
    for method, make in (
        ("soft_prompt", lambda: hd.SoftPromptConfig(num_virtual_tokens=4)),
        ("p_tuning", lambda: hd.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8)),
        ("llama_adapter", lambda: hd.LlamaAdapterConfig(adapter_len=4, adapter_layers=2)),
        ("prefix", lambda: hd.PrefixConfig(num_virtual_tokens=4)),
    ):
        for arch in ("llama", "gpt2") if method == "llama_adapter" else ("llama", "gpt2", "opt"):
            yield pytest.param(make, arch, id=f"{method}-{arch}", marks=getattr(pytest.mark, method))


@pytest.mark.parametrize("make,arch", list(cases()))
def test_generate_with_delta_and_disabled(make, arch):
    model, inputs, _ = build(arch)
    snap = snapshot(model)
    ids, mask = prompt_inputs(model, inputs)
    base = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    d = hd.attach(model, make())
    perturb(d, std=3.0)
    run = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **GREEDY)
    got = run.sequences
    with d.disabled():
        plain = model.generate(
            input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **GREEDY
        )
    assert not torch.allclose(run.scores[0], plain.scores[0]), "the learned tokens must influence generation"
    with d.disabled():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), base)
    # greedy decoding with the cache must agree with one full forward pass over the result
    n = GREEDY["max_new_tokens"]
    with torch.no_grad():
        logits = model(input_ids=got[:, :-1], attention_mask=torch.ones_like(got[:, :-1])).logits
    assert torch.equal(logits[:, -n:].argmax(-1), got[:, -n:])
    d.detach()
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), base)
    assert_restored(model, snap)


@pytest.mark.soft_prompt
def test_soft_prompt_generate_equals_base_model_fed_the_prompt():
    """Decoder-only: the same new tokens as the bare model given the prompt as inputs_embeds."""
    model, inputs, _ = build("llama")
    ids, mask = prompt_inputs(model, inputs)
    d = hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=4))
    perturb(d, std=3.0)
    got = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    with d.disabled():
        embeds = torch.cat(
            [d.pieces["model-embed_tokens"].prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], 1
        ).detach()
        ext = torch.ones(2, embeds.shape[1], dtype=mask.dtype)
        expected = model.generate(inputs_embeds=embeds, attention_mask=ext, **GREEDY)
    assert torch.equal(got[:, ids.shape[1] :], expected)


@pytest.mark.soft_prompt
def test_soft_prompt_generate_on_encoder_decoder():
    """T5: generate() runs the encoder on its own; the prompt still goes in front of its input."""
    model, inputs, _ = build("t5")
    ids, mask = prompt_inputs(model, inputs)
    kw = dict(GREEDY, decoder_start_token_id=0)
    base = model.generate(input_ids=ids, attention_mask=mask, **kw)
    d = hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=4))
    perturb(d, std=3.0)
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    with d.disabled():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw), base)
        embeds = torch.cat([d.pieces["shared"].prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], 1).detach()
        ext = torch.ones(2, embeds.shape[1], dtype=mask.dtype)
        expected = model.generate(inputs_embeds=embeds, attention_mask=ext, **kw)
    assert torch.equal(got, expected)


@pytest.mark.prefix
def test_prefix_takes_cache_positions_counted_with_or_without_it_and_refuses_others():
    """generate() on transformers 4.x counts cache positions without the prefix already in the
    cache; the prefix shifts them (else the causal mask is misplaced, silently). A position that
    fits neither count is refused."""
    model, inputs, _ = build("llama")
    ids = inputs["input_ids"]
    d = hd.attach(model, hd.PrefixConfig(num_virtual_tokens=4))
    perturb(d, std=1.0)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        without = model(input_ids=ids, cache_position=torch.arange(ids.shape[1])).logits
        counted = model(input_ids=ids, cache_position=torch.arange(4, 4 + ids.shape[1])).logits
        torch.testing.assert_close(without, plain)
        torch.testing.assert_close(counted, plain)
        with pytest.raises(hd.UnsupportedModuleError, match="cache_position starts at 2"):
            model(input_ids=ids, cache_position=torch.arange(2, 2 + ids.shape[1]))
