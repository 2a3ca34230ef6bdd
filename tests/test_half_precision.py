"""Every method on a bf16 or fp16 model on the CPU, where some torch.linalg ops have no half
kernel (LU for the Cayley transform, QR for orthogonal inits). Reference: the same delta (saved
from a float32 model) on the float32 model; the half model loads it, runs, trains and restores."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_restored, perturb, snapshot
from tiny_models import build, main_output

import hookdelta as hd

CONFIGS = {
    "lora": lambda: hd.LoRAConfig(r=4),
    "dora": lambda: hd.LoRAConfig(r=4, use_dora=True),
    "loha": lambda: hd.LoHaConfig(r=4),
    "lokr": lambda: hd.LoKrConfig(r=4),
    "vera": lambda: hd.VeRAConfig(r=8),
    "oft": lambda: hd.OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False),
    "boft": lambda: hd.BOFTConfig(boft_block_size=4),
    "ia3": lambda: hd.IA3Config(),
    "adapter": lambda: hd.AdapterConfig(bottleneck_dim=4),
    "loreft": lambda: hd.LoReFTConfig(r=2),
    "direft": lambda: hd.DiReFTConfig(r=2),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_delta_runs_trains_and_restores_on_a_half_precision_model(method, dtype, tmp_path):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, CONFIGS[method]())
    perturb(delta, std=0.1)
    with torch.no_grad():
        want = main_output(model(**inputs)).float()
    delta.save(tmp_path / "d")
    half, _, _ = build("llama")
    half = half.to(dtype)
    snap = snapshot(half)
    loaded = hd.load(half, tmp_path / "d")
    with torch.no_grad():
        got = main_output(half(**inputs)).float()
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * scale)  # (the model's own half rounding)
    half.train()
    main_output(half(**inputs)).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loaded.parameters())
    loaded.detach()
    assert_restored(half, snap)
