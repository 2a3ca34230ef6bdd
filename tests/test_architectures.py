"""The shared checks, run on every tiny transformers architecture (DESIGN.md testing pattern)."""

import copy

import pytest
import torch
import transformers as tf
from helpers import assert_restored, perturb, same_bits, snapshot
from tiny_models import ARCHS, build, main_output

import hookdelta as hd

pytestmark = pytest.mark.lora

ARCH_IDS = list(ARCHS)
FUSED_EXPERTS = int(tf.__version__.split(".")[0]) >= 5  # Mixtral's experts: 3-D tensors since transformers 5


def lora_cfg(arch, targets, **kw):
    if arch == "mixtral" and FUSED_EXPERTS:  # fused experts too, through the parameter path
        kw.setdefault("target_parameters", ["experts.gate_up_proj", "experts.down_proj"])
    return hd.LoRAConfig(r=4, alpha=8, targets=targets, **kw)


def run(model, inputs, grad=False):
    # no_grad: requires_grad flags (frozen base vs. not) can steer torch.matmul to other kernels
    with torch.set_grad_enabled(grad):
        return main_output(model(**inputs))


@pytest.fixture(params=ARCH_IDS)
def arch(request):
    return request.param


def test_fresh_perturbed_merge_unmerge_disable_detach(arch):
    model, inputs, targets = build(arch)
    snap = snapshot(model)
    bare = run(model, inputs)
    delta = hd.attach(model, lora_cfg(arch, targets))
    assert torch.equal(run(model, inputs), bare), "a fresh delta changes no output"
    perturb(delta)
    adapted = run(model, inputs)
    assert not torch.allclose(adapted, bare, atol=1e-4), "a perturbed delta must change the output"
    with delta.disabled():
        assert torch.equal(run(model, inputs), bare), "disabled() equals the bare model"
    assert torch.equal(run(model, inputs), adapted), "enabled again after disabled()"

    delta.merge()
    torch.testing.assert_close(run(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    delta.unmerge()
    for n, p in snap["params"].items():
        assert same_bits(dict(model.named_parameters(remove_duplicate=False))[n], p), n
    assert torch.equal(run(model, inputs), adapted)

    delta.merge()  # detach straight from the merged state
    delta.detach()
    assert_restored(model, snap)
    assert torch.equal(run(model, inputs), bare)


def test_structure_and_keys_unchanged_while_attached(arch, tmp_path):
    model, inputs, targets = build(arch)
    before = snapshot(model)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    delta = hd.attach(model, lora_cfg(arch, targets, also_train=None))
    perturb(delta)
    modules = {n: (id(m), type(m)) for n, m in model.named_modules()}
    for n, ident, cls in before["modules"]:
        assert modules[n] == (ident, cls), f"{n} was replaced or changed class"
    assert list(model.state_dict().keys()) == before["keys"]
    model.load_state_dict(checkpoint, strict=True)  # an original checkpoint still loads strictly
    model.save_pretrained(tmp_path / "with")
    delta.detach()
    model.save_pretrained(tmp_path / "bare")  # reference: what transformers writes for the bare model
    from safetensors import safe_open

    keys = {}
    for kind in ("with", "bare"):
        with safe_open(str(tmp_path / kind / "model.safetensors"), "pt") as f:
            keys[kind] = set(f.keys())
    assert keys["with"] == keys["bare"]


def test_training_lowers_loss_and_touches_only_the_delta(arch):
    model, inputs, targets = build(arch)  # eval(): the base model's own dropout would only add noise
    snap = snapshot(model)
    with hd.attach(model, lora_cfg(arch, targets), name="teacher") as teacher:  # a reachable target
        perturb(teacher, std=0.3, seed=99)
        target = run(model, inputs).float()
    delta = hd.attach(model, lora_cfg(arch, targets))
    opt = torch.optim.AdamW(delta.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (run(model, inputs, grad=True).float() - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses
    for n, p in model.named_parameters():
        if "_hookdelta" not in n:
            assert same_bits(p, snap["params"][n]), f"training changed base parameter {n}"
    delta.detach()
    assert_restored(model, snap)


def test_save_load_on_fresh_model_is_exact(arch, tmp_path):
    model, inputs, targets = build(arch)
    delta = hd.attach(model, lora_cfg(arch, targets))
    perturb(delta)
    expected = run(model, inputs)
    delta.save(tmp_path / "d")
    fresh, _, _ = build(arch)  # same seed: same base weights
    loaded = hd.load(fresh, tmp_path / "d")
    assert loaded.name == delta.name and loaded.sites == delta.sites
    assert torch.equal(run(fresh, inputs), expected)


def test_deepcopy_gives_an_independent_delta(arch):
    model, inputs, targets = build(arch)
    delta = hd.attach(model, lora_cfg(arch, targets))
    perturb(delta)
    before = run(model, inputs)
    twin = copy.deepcopy(model)
    twin_delta = hd.deltas(twin)[delta.name]
    assert twin_delta is not delta and twin_delta.model is twin
    assert torch.equal(run(twin, inputs), before)
    opt = torch.optim.SGD(twin_delta.parameters(), lr=0.5)
    run(twin, inputs, grad=True).float().pow(2).mean().backward()
    opt.step()
    assert torch.equal(run(model, inputs), before), "training the copy moved the original"
    assert not torch.equal(run(twin, inputs), before)
    twin_delta.detach()
    assert torch.equal(run(model, inputs), before), "detaching the copy touched the original"
