"""The fast LoRA paths on the best device present (issue 15): cuBLAS picks other kernels than the
CPU, so the checks that matter most run on CUDA when there is one, and on the CPU otherwise (CI),
which keeps them honest. `HOOKDELTA_TEST_DEVICE` names another device. Each compares against the
formula in float64 or against the ungrouped / unfused path."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from helpers import perturb
from tiny_models import Holder, build

import hookdelta as hd

DEVICE = torch.device(os.environ.get("HOOKDELTA_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _inputs_to(inputs: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape", [(4, 64), (1, 1, 64), (4, 3, 64), (4, 16, 64)], ids=["2-D", "decode", "3-D", "3-D wider"]
)
def test_folded_add_equals_the_formula_and_gives_the_same_bits_in_every_mode(shape, dtype):
    torch.manual_seed(0)
    model = Holder(nn.Linear(64, 48, bias=False)).to(DEVICE, dtype)  # (small: MKL's batched kernel differs)
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["layer"]))
    perturb(delta, std=0.1)
    piece = delta.piece("layer")
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    first = model(x).detach()  # the watched first call: out of place
    with torch.no_grad():
        quiet = model(x)
    x.requires_grad_(True)
    loud = model(x)
    assert torch.equal(quiet, first) and torch.equal(loud.detach(), first)
    xd = x.detach().double().requires_grad_(True)
    a = piece.lora_A.detach().double().requires_grad_(True)
    b = piece.lora_B.detach().double().requires_grad_(True)
    want = xd @ model.layer.weight.double().T + float(piece.scale) * (xd @ a.T) @ b.T
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(loud.double(), want, rtol=tol, atol=tol)
    loud.float().square().sum().backward()
    want.square().sum().backward()
    for got, ref in ((x.grad, xd.grad), (piece.lora_A.grad, a.grad), (piece.lora_B.grad, b.grad)):
        scale = ref.abs().max().item() or 1.0  # bf16 gradients: compare relative to their size
        torch.testing.assert_close(got.double() / scale, ref / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sibling_grouping_equals_the_ungrouped_model(dtype):
    model, inputs, _ = build("llama")
    model = model.to(DEVICE, dtype)
    inputs = _inputs_to(inputs)
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    perturb(delta, std=0.3)
    plain = copy.deepcopy(model)
    for piece in hd.deltas(plain)[delta.name].pieces.values():
        if getattr(piece, "siblings", None) is not None:
            piece.siblings = None
    tol = TOLERANCE[dtype]
    for _ in range(2):  # the second forward takes the kept stack of A's
        with torch.no_grad():
            torch.testing.assert_close(
                model(**inputs).logits.float(), plain(**inputs).logits.float(), rtol=tol, atol=tol
            )
    grads = []
    for m in (model, plain):
        m(**inputs).logits.float().square().mean().backward()
        grads.append([p.grad.float() for p in hd.deltas(m)[delta.name].parameters()])
    for g, h in zip(*grads, strict=True):
        scale = h.abs().max().item() or 1.0
        torch.testing.assert_close(g / scale, h / scale, rtol=tol, atol=tol)


def test_checkpointed_training_gives_the_plain_gradients():
    """A recomputed checkpoint must save what its (watched) forward saved: the kernel is chosen
    by shape alone, also with cuBLAS."""
    model, inputs, _ = build("llama")
    model = model.to(DEVICE)
    inputs = _inputs_to(inputs)
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.3)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**inputs).logits.square().mean().backward()
    got = [p.grad.clone() for p in delta.parameters()]
    model.gradient_checkpointing_disable()
    model.zero_grad()
    model(**inputs).logits.square().mean().backward()
    for g, p in zip(got, delta.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
