"""hd.optim's recipes against PEFT's own (issue 28): LoRA+ (`create_loraplus_optimizer`) and
LoRA-FA (`create_lorafa_optimizer`). The same tiny Llama, the same factors (hookdelta's delta
saved in PEFT's format and loaded by PEFT), the same batches: after a few steps both models
compute the same outputs, which holds only if every tensor sat in the group with PEFT's learning
rate and decay (LoRA+) or got PEFT's projected gradient (LoRA-FA)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import perturb
from internals import peft_lorafa_in_float32
from tiny_models import build

import hookdelta as hd

peft = pytest.importorskip("peft")


def twins(tmp_path, **config):
    model, inputs, _ = build("llama")
    base = copy.deepcopy(model)
    delta = hd.attach(model, hd.LoRAConfig(**{"r": 4, "alpha": 8, **config}))
    perturb(delta, std=0.1)
    delta.save_peft(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft", is_trainable=True)
    return model, delta, theirs, inputs


def train(model, optimizer, inputs, steps=3):
    for _ in range(steps):
        model.train()
        model(**inputs).logits.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize(
    "config",
    [
        dict(targets=["q_proj", "v_proj", "embed_tokens"]),
        dict(targets="all-linear", bias="lora_only"),
        dict(targets=["q_proj", "v_proj"], use_dora=True),
    ],
    ids=["embedding", "lora-bias", "dora"],
)
def test_loraplus_trains_as_peft_does(tmp_path, config):
    from packaging.version import Version
    from peft.optimizers import create_loraplus_optimizer

    if "embed_tokens" in str(config.get("targets")) and Version(peft.__version__) < Version("0.21"):
        pytest.skip(
            "PEFT before 0.21 never found an embedding's LoRA (its lookup of the owning layer returned the "
            "tensor itself), so it trained it in the A / B groups; hookdelta follows PEFT 0.21's groups"
        )
    ours, delta, theirs, inputs = twins(tmp_path, **config)
    kw = dict(lr=1e-2, weight_decay=0.1, lr_embedding=1e-3)
    mine = hd.optim.loraplus(delta, torch.optim.AdamW, ratio=16, **kw)
    got = train(ours, mine, inputs)
    want = train(
        theirs,
        create_loraplus_optimizer(
            theirs,
            torch.optim.AdamW,
            loraplus_lr_ratio=16,
            lr=kw["lr"],
            loraplus_weight_decay=kw["weight_decay"],
            loraplus_lr_embedding=kw["lr_embedding"],
        ),
        inputs,
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    groups = hd.optim.loraplus_groups(delta, lr=1e-2, ratio=16)
    assert [g["lr"] for g in groups] == [1e-2, 1e-6, 0.16, 0.16]
    # the ratio matters: without it the result differs (the comparison above can fail)
    ours2, delta2, _, _ = twins(tmp_path / "again", **config)
    plain = train(ours2, torch.optim.AdamW(delta2.parameters(), lr=1e-2, weight_decay=0.1), inputs)
    assert not torch.allclose(plain, want, rtol=1e-4, atol=1e-5)


def test_lorafa_trains_as_peft_does(tmp_path, monkeypatch):
    from peft.optimizers import create_lorafa_optimizer

    peft_lorafa_in_float32(monkeypatch)
    ours, delta, theirs, inputs = twins(tmp_path, targets=["q_proj", "v_proj"])
    a_before = {k: p.lora_A.detach().clone() for k, p in delta.pieces.items()}
    # PEFT's optimizer is transformers' old AdamW, which adds eps to √v before the bias correction
    # (torch's AdamW after it): with eps = 0 the two are the same update, so eps is 0 on both sides
    # and what is compared is the projected gradient
    setup = hd.optim.lorafa(delta, lr=1e-2, eps=0.0)
    got = train(ours, setup, inputs)
    theirs_opt = create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2)
    for group in theirs_opt.param_groups:
        group["eps"] = 0.0
    want = train(theirs, theirs_opt, inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p.lora_A, a_before[k]) for k, p in delta.pieces.items()), "A must stay frozen"
    setup.remove()
    assert all(p.lora_A.requires_grad for p in delta.pieces.values())
    ours2, delta2, _, _ = twins(tmp_path / "again", targets=["q_proj", "v_proj"])
    plain = train(ours2, torch.optim.AdamW(delta2.parameters(), lr=1e-2, eps=0.0), inputs)
    assert not torch.allclose(plain, want, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused():
    model, _, _ = build("llama")
    ia3 = hd.attach(model, hd.IA3Config())
    with pytest.raises(hd.UnsupportedModuleError, match="LoRA deltas"):
        hd.optim.loraplus(ia3, lr=1e-3, ratio=16)
    ia3.detach()
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"], use_dora=True))
    with pytest.raises(hd.ConfigError, match="ratio"):
        hd.optim.loraplus(delta, lr=1e-3, ratio=float("nan"))
    with pytest.raises(hd.UnsupportedModuleError, match="LoRA-FA"):
        hd.optim.lorafa(delta, lr=1e-3)
    assert all(p.requires_grad for p in delta.parameters())  # nothing was frozen
