"""PEFT's LoRA as an independent reference: same weights in, same outputs out."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import perturb
from tiny_models import build, main_output

import hookdelta as hd

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.lora


def peft_twin(model, delta, targets, **kw):
    """A PEFT LoRA model on a copy of the bare model, given hookdelta's factors (same layout)."""
    bare = copy.deepcopy(model)
    for d in list(hd.deltas(bare).values()):
        d.detach()
    cfg = peft.LoraConfig(
        r=delta.config.r,
        lora_alpha=delta.config.alpha,
        target_modules=targets,
        use_rslora=delta.config.use_rslora,
        **kw,
    )
    twin = peft.get_peft_model(bare, cfg)
    with torch.no_grad():
        for piece in delta.pieces.values():
            layer = twin.base_model.model.get_submodule(piece.key)
            if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
                layer.lora_embedding_A["default"].copy_(piece.lora_A)
                layer.lora_embedding_B["default"].copy_(piece.lora_B)
            else:
                layer.lora_A["default"].weight.copy_(piece.lora_A.reshape(layer.lora_A["default"].weight.shape))
                layer.lora_B["default"].weight.copy_(piece.lora_B.reshape(layer.lora_B["default"].weight.shape))
    return twin.eval()


@pytest.mark.parametrize(
    "arch,targets,kw",
    [
        ("llama", ["q_proj", "v_proj", "embed_tokens"], {}),
        ("gpt2", ["c_attn", "c_fc"], {"fan_in_fan_out": True}),
        ("bert", ["query", "value", "word_embeddings"], {}),
    ],
)
@pytest.mark.parametrize("rslora", [False, True])
def test_transformers_models_match_peft(arch, targets, kw, rslora):
    model, inputs, _ = build(arch)
    delta = hd.attach(
        model,
        hd.LoRAConfig(r=4, alpha=8, targets=targets, use_rslora=rslora, tie_weights=False)
        if arch != "llama"
        else hd.LoRAConfig(r=4, alpha=8, targets=targets, use_rslora=rslora),
    )
    perturb(delta, std=0.1)
    twin = peft_twin(model, delta, targets, **kw)
    with torch.no_grad():
        ours, theirs = main_output(model(**inputs)), main_output(twin(**inputs))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_conv2d_matches_peft():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model, x = Net(), torch.randn(2, 4, 7, 7)
    delta = hd.attach(model, hd.LoRAConfig(r=3, alpha=6, targets="conv"))
    perturb(delta, std=0.2)
    twin = peft_twin(model, delta, ["conv"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.dora
@pytest.mark.parametrize(
    "arch,targets,kw", [("llama", ["q_proj", "v_proj"], {}), ("gpt2", ["c_attn"], {"fan_in_fan_out": True})]
)
def test_dora_matches_peft_outputs_and_gradients(arch, targets, kw):
    model, inputs, _ = build(arch)
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=targets, use_dora=True))
    perturb(delta, std=0.1)
    twin = peft_twin(model, delta, targets, use_dora=True, **kw)
    with torch.no_grad():
        for piece in delta.pieces.values():
            twin.base_model.model.get_submodule(piece.key).lora_magnitude_vector["default"].weight.copy_(
                piece.magnitude
            )
    ours, theirs = main_output(model(**inputs)), main_output(twin(**inputs))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    for piece in delta.pieces.values():
        layer = twin.base_model.model.get_submodule(piece.key)
        torch.testing.assert_close(
            piece.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(piece.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.ia3
def test_ia3_matches_peft():
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.IA3Config())
    perturb(delta, std=0.3)
    bare = copy.deepcopy(model)
    for d in list(hd.deltas(bare).values()):
        d.detach()
    twin = peft.get_peft_model(
        bare, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).eval()
    with torch.no_grad():
        for piece in delta.pieces.values():
            layer = twin.base_model.model.get_submodule(piece.key)
            layer.ia3_l["default"].copy_(piece.ia3_l.reshape(layer.ia3_l["default"].shape))
        torch.testing.assert_close(main_output(model(**inputs)), main_output(twin(**inputs)), rtol=1e-5, atol=1e-5)
