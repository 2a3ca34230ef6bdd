"""Activated LoRA (aLoRA) against PEFT's (alora_invocation_tokens): the adapter acts only from
the last occurrence of the invocation tokens on; positions before it are the base model's, bit
for bit; generate() follows it through the cache; PEFT files both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build

import hookdelta as hd

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.lora

INVOKE = [5, 9]


def ids_with_invocation():
    ids = torch.tensor([[13, 59, 42, 5, 9, 40, 16, 86], [68, 77, 90, 21, 76, 8, 30, 31], [5, 9, 1, 2, 5, 9, 3, 4]])
    return ids  # row 0: invocation at 3; row 1: none; row 2: last one at 4


def peft_alora(model, tmp_path):
    twin = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM",
            alora_invocation_tokens=INVOKE,
        ),
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    twin.save_pretrained(tmp_path)
    return twin.eval()


def test_alora_matches_peft_and_leaves_the_prefix_to_the_base(tmp_path):
    model, _, _ = build("llama")
    ids = ids_with_invocation()
    with torch.no_grad():
        bare = model(input_ids=ids).logits
    twin = peft_alora(model, tmp_path / "theirs")
    delta = hd.load_peft(model, tmp_path / "theirs")
    assert delta.config.activate_after_tokens == tuple(INVOKE)
    ours, theirs = model(input_ids=ids).logits, twin(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (
        torch.equal(ours[0, :3], bare[0, :3])
        and torch.equal(ours[1], bare[1])
        and torch.equal(ours[2, :4], bare[2, :4])
    )
    assert not torch.allclose(ours[0, 3:], bare[0, 3:], atol=1e-4)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for piece in delta.pieces.values():
        if hasattr(piece, "lora_A"):
            layer = twin.base_model.model.get_submodule(piece.key)
            torch.testing.assert_close(piece.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
    # generation through the cache: PEFT's tokens
    prompt = ids[:1, :6]
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=5, do_sample=False)
        want = twin.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    with pytest.raises(hd.MergeError):
        delta.merge()
    # saved in PEFT's format, read by PEFT
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(build("llama")[0]), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours.detach(), rtol=1e-5, atol=1e-5)
    # and in ours
    delta.save(tmp_path / "own")
    delta.detach()
    hd.load(model, tmp_path / "own")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours.detach(), rtol=0, atol=0)


def test_alora_refusals():
    model, _, _ = build("llama")
    with pytest.raises(hd.ConfigError, match="activate_after_tokens"):
        hd.LoRAConfig(activate_after_tokens=[])
    with pytest.raises(hd.ConfigError, match="use_dora"):
        hd.LoRAConfig(activate_after_tokens=[3], use_dora=True)
    with pytest.raises(hd.UnsupportedModuleError, match="linear layers only"):
        hd.attach(model, hd.LoRAConfig(activate_after_tokens=[3], targets=["embed_tokens"]))
    assert not hd.deltas(model)
    hd.attach(model, hd.LoRAConfig(activate_after_tokens=[3]))
    embeds = model.get_input_embeddings()(ids_with_invocation())
    with pytest.raises(hd.UnsupportedModuleError, match="input_ids"):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_alora_with_a_principal_start_changes_nothing_at_first_and_follows_the_formula(init):
    """aLoRA with init='pissa' / 'olora': the frozen residual B₀·A₀ is subtracted as in plain
    LoRA, so a fresh delta gives the base model's outputs (it added s·B₀·A₀·x before)."""
    model, _, _ = build("llama")
    ids = ids_with_invocation()
    with torch.no_grad():
        bare = model(input_ids=ids).logits
    delta = hd.attach(
        model, hd.LoRAConfig(r=4, alpha=8, init=init, targets=["q_proj", "v_proj"], activate_after_tokens=INVOKE)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, bare, rtol=1e-5, atol=1e-5)
    q = delta.piece("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        q.lora_B.add_(0.3)
    x = torch.randn(1, 8, q.lora_A.shape[1])
    q.activation.mask = torch.tensor([[False] * 3 + [True] * 5])
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        got = layer(x)
        base = torch.nn.functional.linear(x, layer.weight)
        update = (x @ q.lora_A.T @ q.lora_B.T - x @ q.base_A.T @ q.base_B.T) * q.scale
    torch.testing.assert_close(got[:, 3:], (base + update)[:, 3:], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, :3], base[:, :3])
    with pytest.raises(hd.UnsupportedModuleError, match="PiSSA"):
        hd.combine(model, {delta.name: 1.0}, how="cat", name="both")
