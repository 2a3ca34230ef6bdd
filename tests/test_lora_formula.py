"""LoRA output against the formula computed by hand, for every layer kind, and gradients."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import perturb
from internals import parameter_slot
from tiny_models import Holder, layer_cases, tied_llama
from torch.func import functional_call

import hookdelta as hd

pytestmark = pytest.mark.lora

CASES = layer_cases()


def manual_delta_weight(layer: nn.Module, piece, s: float) -> torch.Tensor:
    """ΔW in the layer's own weight layout, built with explicit loops (independent of hookdelta)."""
    A, B = piece.lora_A.detach(), piece.lora_B.detach()
    if isinstance(layer, nn.Embedding):  # PEFT layout: A [r, num], B [dim, r]
        return s * (B @ A).T
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        g, out = layer.groups, layer.out_channels
        r = A.shape[0] // g
        blocks = []
        for j in range(g):
            a = A[j * r : (j + 1) * r].reshape(r, -1)
            b = B[j * (out // g) : (j + 1) * (out // g)].reshape(out // g, r)
            blocks.append((b @ a).reshape(out // g, *layer.weight.shape[1:]))
        return s * torch.cat(blocks)
    dw = s * (B @ A)
    return dw.T if type(layer).__name__ == "Conv1D" else dw


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rslora", [False, True])
def test_output_matches_formula(case, rslora):
    _, model, x = case
    model = copy.deepcopy(model)
    pristine = copy.deepcopy(model.layer)
    r, alpha = 3, 5.0
    delta = hd.attach(model, hd.LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, targets="layer"))
    assert torch.equal(model(x), pristine(x)), "a fresh delta must change nothing"
    perturb(delta)
    s = alpha / (math.sqrt(r) if rslora else r)
    piece = next(iter(delta.pieces.values()))
    layer = model.layer
    W, b = pristine.weight.detach(), getattr(pristine, "bias", None)
    if isinstance(layer, nn.Linear):
        A, B = piece.lora_A.detach(), piece.lora_B.detach()
        expected = x @ W.T + (b if b is not None else 0) + s * (x @ A.T) @ B.T
    elif type(layer).__name__ == "Conv1D":
        A, B = piece.lora_A.detach(), piece.lora_B.detach()
        expected = x @ W + b + s * (x @ A.T) @ B.T
    elif isinstance(layer, nn.Embedding):
        A, B = piece.lora_A.detach(), piece.lora_B.detach()
        expected = W[x] + s * A.T[x] @ B.T
    else:  # conv: the same conv with W + ΔW, where ΔW is assembled by hand per group
        expected = functional_call(pristine, {"weight": W + manual_delta_weight(layer, piece, s), "bias": b}, (x,))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradients_reach_only_A_and_B(case):
    _, model, x = case
    model = copy.deepcopy(model)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="layer"))
    perturb(delta)
    model(x).float().pow(2).sum().backward()
    for name, p in model.named_parameters():
        if "_hookdelta" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert {n.rsplit(".", 1)[-1] for n, _ in delta.named_parameters()} == {"lora_A", "lora_B"}


def test_parameter_target_3d_per_expert_matches_formula():
    """A fused [experts, out, in] weight: each expert gets its own W_e + s·B_e·A_e."""

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6, 5))

        def forward(self, x, idx):
            return torch.stack([F.linear(x[i], self.w[int(e)]) for i, e in enumerate(idx)])

    model = Holder(Experts())
    model.forward = lambda x, idx: model.layer(x, idx)  # noqa: E731 - test-only root
    pristine = copy.deepcopy(model.layer)
    x, idx = torch.randn(3, 5), torch.tensor([0, 3, 1])
    delta = hd.attach(model, hd.LoRAConfig(r=2, alpha=4.0, target_parameters=["layer.w"]))
    perturb(delta, std=0.3)
    piece = next(iter(delta.pieces.values()))
    A, B = piece.lora_A.detach(), piece.lora_B.detach()
    assert A.shape == (4, 2, 5) and B.shape == (4, 6, 2)
    w = pristine.w.detach().clone()
    for e in range(4):
        w[e] += 2.0 * B[e] @ A[e]
    expected = functional_call(pristine, {"w": w}, (x, idx))
    torch.testing.assert_close(model(x, idx), expected)
    model(x, idx).sum().backward()
    assert pristine.w.grad is None and model.layer.w.grad is None
    assert piece.lora_A.grad is not None and piece.lora_B.grad is not None
    assert isinstance(model.layer.w, nn.Parameter), "the weight must be put back after the call"


def test_parameter_target_on_multihead_attention_in_proj():
    """nn.MultiheadAttention uses in_proj_weight inside its own forward: the swap path covers it."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = Holder(mha)
    model.forward = lambda x: model.layer(x, x, x, need_weights=False)[0]  # noqa: E731
    pristine = copy.deepcopy(mha)
    x = torch.randn(2, 5, 8)
    delta = hd.attach(model, hd.LoRAConfig(r=2, target_parameters="in_proj_weight"))
    perturb(delta, std=0.3)
    piece = next(iter(delta.pieces.values()))
    w = pristine.in_proj_weight.detach() + piece.scale * piece.lora_B.detach() @ piece.lora_A.detach()
    expected = functional_call(pristine, {"in_proj_weight": w}, (x, x, x), {"need_weights": False})[0]
    torch.testing.assert_close(model(x), expected)


def test_swap_is_undone_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            raise RuntimeError("boom")

    model = Holder(Boom())
    original = model.layer.w
    hd.attach(model, hd.LoRAConfig(r=1, target_parameters="w"))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(3))
    assert parameter_slot(model.layer, "w") is original


def test_dropout_follows_host_training_flag():
    model = Holder(nn.Linear(16, 16))
    x = torch.randn(64, 16)
    delta = hd.attach(model, hd.LoRAConfig(r=4, dropout=0.5, targets="layer"))
    perturb(delta, std=0.5)
    model.eval()
    assert torch.equal(model(x), model(x)), "eval(): no dropout, deterministic"
    model.train()
    assert not torch.equal(model(x), model(x)), "train(): dropout is active"


def test_gaussian_init_and_lora_only_bias():
    model = Holder(nn.Linear(6, 4))
    pristine = copy.deepcopy(model.layer)
    x = torch.randn(5, 6)
    delta = hd.attach(model, hd.LoRAConfig(r=2, init="gaussian", bias="lora_only", targets="layer"))
    piece = next(iter(delta.pieces.values()))
    assert piece.lora_A.std().item() == pytest.approx(0.5, rel=0.6)
    assert torch.equal(model(x), pristine(x))
    with torch.no_grad():
        piece.lora_bias.fill_(0.25)
    torch.testing.assert_close(model(x), pristine(x) + 0.25 * piece.scale)  # B's bias, scaled with B (PEFT)
    expected = model(x)
    delta.merge()
    torch.testing.assert_close(model(x), expected)
    delta.unmerge()


def test_tied_embedding_and_head_stay_tied():

    model = tied_llama().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 50, (2, 6))
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="embed_tokens"))
    assert sorted(p.site_path for p in delta.pieces.values()) == ["lm_head", "model.embed_tokens"]
    perturb(delta, std=0.2)
    unmerged = model(input_ids=ids).logits
    # reference: the same model with the tied weight replaced by W + ΔW in both places
    piece = delta.pieces["model-embed_tokens"]
    w = model.model.embed_tokens.weight.detach() + piece.scale * (piece.lora_B @ piece.lora_A).T.detach()
    with delta.disabled():
        expected = functional_call(
            model, {"model.embed_tokens.weight": w, "lm_head.weight": w}, (), {"input_ids": ids}, tie_weights=True
        ).logits
    torch.testing.assert_close(unmerged, expected, rtol=1e-4, atol=1e-5)
    delta.merge()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-5)
    delta.detach()
    with pytest.raises(hd.UnsupportedModuleError, match="tied"):
        hd.attach(model, hd.LoRAConfig(r=2, targets="embed_tokens", tie_weights=False))


def test_a_tied_weight_with_a_pissa_start_is_refused_not_half_applied():
    """PiSSA on a tied output head: the residual s·B₀·A₀ would have to act at the embedding end
    too; the tied end used s·B·A alone before (a fresh delta changed the embeddings)."""

    model = tied_llama().eval()
    with pytest.raises(hd.UnsupportedModuleError, match="shares its weight"):
        hd.attach(model, hd.LoRAConfig(r=2, init="pissa", targets="lm_head"))
    assert not hd.deltas(model)
