"""Attach / enable / disable / merge / unmerge / detach, stacking and moving with the model."""

import pytest
import torch
import torch.nn as nn
from helpers import assert_restored, assert_same, outputs, perturb, same_bits, snapshot
from internals import forward_hooks, forward_pre_hooks
from tiny_models import build

import hookdelta as hd

pytestmark = pytest.mark.lora


@pytest.fixture()
def llama():
    return build("llama")


def q_hooks(model):
    q = model.model.layers[0].self_attn.q_proj
    return len(forward_hooks(q)) + len(forward_pre_hooks(q))


def test_merged_and_disabled_deltas_take_their_hooks_off(llama):
    model, inputs, targets = llama
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    assert q_hooks(model) == 1
    delta.disable()
    assert q_hooks(model) == 0
    delta.enable()
    delta.merge()
    assert q_hooks(model) == 0
    delta.unmerge()
    assert q_hooks(model) == 1


def test_one_hook_per_site_and_attach_order(llama):
    model, inputs, targets = llama
    bare = outputs(model, inputs)
    a = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="a")
    b = hd.attach(model, hd.LoRAConfig(r=3, targets=targets), name="b")
    assert q_hooks(model) == 1, "two deltas on one layer share one dispatcher hook"
    perturb(a, seed=1)
    perturb(b, seed=2)
    both = outputs(model, inputs)
    with a.disabled():
        only_b = outputs(model, inputs)
    with b.disabled():
        only_a = outputs(model, inputs)
    assert not torch.allclose(only_a, only_b)
    site = hd.deltas(model)["a"]._store().sites["model.layers.0.self_attn.q_proj"]
    assert [p.key for p in site.pieces] == ["model.layers.0.self_attn.q_proj"] * 2
    assert [id(p) for p in site.pieces] == [
        id(a.pieces["model-layers-0-self_attn-q_proj"]),
        id(b.pieces["model-layers-0-self_attn-q_proj"]),
    ]
    a.disable(), a.enable()  # order survives a disable/enable
    assert [id(p) for p in site.pieces][0] == id(a.pieces["model-layers-0-self_attn-q_proj"])
    assert torch.equal(outputs(model, inputs), both)
    with a.disabled(), b.disabled():
        assert torch.equal(outputs(model, inputs), bare)


def test_merging_one_of_two_stacked_deltas_matches_both_unmerged(llama):
    model, inputs, targets = llama
    snap = snapshot(model)
    a = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="a")
    b = hd.attach(model, hd.LoRAConfig(r=2, targets=targets + ["o_proj"]), name="b")
    perturb(a, seed=1)
    perturb(b, seed=2)
    both = outputs(model, inputs)
    a.merge()
    torch.testing.assert_close(outputs(model, inputs), both, rtol=1e-4, atol=1e-5)
    b.merge()
    torch.testing.assert_close(outputs(model, inputs), both, rtol=1e-4, atol=1e-5)
    a.unmerge()  # out of order: b was merged after a
    torch.testing.assert_close(outputs(model, inputs), both, rtol=1e-4, atol=1e-5)
    b.unmerge()
    for n, p in snap["params"].items():
        assert same_bits(dict(model.named_parameters(remove_duplicate=False))[n], p), n
    b.detach()
    with a.disabled():
        torch.testing.assert_close(outputs(model, inputs), build("llama")[0](**inputs).logits.detach())
    a.merge()
    a.detach()
    assert_restored(model, snap)


@pytest.mark.parametrize("later", ["ia3", "dora"])
def test_unmerging_below_a_later_non_commuting_merge_is_refused(llama, later):
    """LoRA a merged, then IA3 (a product) or DoRA (reads the weight) b merged after it: putting
    a's hook back would run it after b's effect; refused, nothing changed, and fine in order."""
    model, inputs, targets = llama
    snap = snapshot(model)
    a = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="a")
    perturb(a, seed=1)
    a.merge()
    b_cfg = hd.IA3Config(targets=targets) if later == "ia3" else hd.LoRAConfig(r=2, targets=targets, use_dora=True)
    b = hd.attach(model, b_cfg, name="b")
    perturb(b, seed=2)
    both = outputs(model, inputs)
    b.merge()
    before = {n: t.clone() for n, t in model.named_parameters()}
    with pytest.raises(hd.MergeError, match="Unmerge 'b' first"):
        a.unmerge()
    assert a.merged and b.merged
    assert all(same_bits(t, before[n]) for n, t in model.named_parameters())
    torch.testing.assert_close(outputs(model, inputs), both, rtol=1e-4, atol=1e-5)
    b.unmerge()
    torch.testing.assert_close(outputs(model, inputs), both, rtol=1e-4, atol=1e-5)
    if later == "dora":  # b, unmerged, reads the weight a is merged into: a stays in
        with pytest.raises(hd.MergeError, match="Detach 'b' first"):
            a.unmerge()
    else:
        a.unmerge()
        torch.testing.assert_close(outputs(model, inputs), both, rtol=1e-4, atol=1e-5)
    b.detach()
    a.detach()
    assert_restored(model, snap)


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a"), ("b", "a", "c")])
def test_detach_in_any_order_restores_exactly(llama, order):
    model, inputs, targets = llama
    snap = snapshot(model)
    ds = {
        n: hd.attach(model, hd.LoRAConfig(r=2, targets=t), name=n)
        for n, t in zip("abc", [targets, ["q_proj"], "all-linear"], strict=True)
    }
    for i, d in enumerate(ds.values()):
        perturb(d, seed=i)
    ds["b"].merge()
    for name in order:
        ds[name].detach()
        rest = [n for n in "abc" if n in hd.deltas(model)]
        assert rest == [n for n in "abc" if n not in order[: order.index(name) + 1]]
    assert_restored(model, snap)


def test_with_block_detaches_on_exception(llama):
    model, inputs, targets = llama
    snap = snapshot(model)
    with pytest.raises(ValueError, match="inside"), hd.attach(model, hd.LoRAConfig(r=2, targets=targets)) as d:
        perturb(d)
        d.merge()
        raise ValueError("inside")
    assert not d.attached
    assert_restored(model, snap)


def test_failure_midway_through_attach_rolls_back(llama, monkeypatch):
    model, inputs, targets = llama
    hd.attach(model, hd.LoRAConfig(r=2, targets=["k_proj"]), name="keep")
    snap = snapshot(model)
    from hookdelta import engine

    calls = {"n": 0}
    original = engine.Site.refresh

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        original(self)

    monkeypatch.setattr(engine.Site, "refresh", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="broken")
    monkeypatch.setattr(engine.Site, "refresh", original)
    assert list(hd.deltas(model)) == ["keep"]
    assert_same(model, snap)  # hooks, flags, tensors, children: as before the failed attach


def test_freeze_base_and_flags_restored(llama):
    model, inputs, targets = llama
    model.model.norm.weight.requires_grad_(False)  # a user's own choice must survive
    snap = snapshot(model)
    a = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="a")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "_hookdelta" not in n)
    b = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="b", freeze_base=True)
    a.detach()
    assert not model.lm_head.weight.requires_grad, "b still freezes the base"
    b.detach()
    assert_restored(model, snap)
    c = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), freeze_base=False)
    assert model.lm_head.weight.requires_grad
    c.detach()
    assert_restored(model, snap)


def test_state_errors_are_clear(llama):
    model, inputs, targets = llama
    d = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    with pytest.raises(hd.DeltaStateError, match="not merged"):
        d.unmerge()
    d.merge()
    with pytest.raises(hd.DeltaStateError, match="already merged"):
        d.merge()
    with pytest.raises(hd.DeltaStateError, match="unmerge"):
        d.disable()
    d.unmerge()
    d.disable()
    with pytest.raises(hd.DeltaStateError, match="disabled"):
        d.merge()
    d.detach()
    for call in (d.enable, d.disable, d.merge, d.unmerge, d.detach):
        with pytest.raises(hd.DeltaStateError, match="detached"):
            call()
    with pytest.raises(hd.ConfigError):
        hd.attach(model, {"r": 8})
    with pytest.raises(hd.UnsupportedModuleError, match="wrap"):
        hd.attach(nn.Sequential(nn.Linear(2, 2)), hd.LoRAConfig(targets="0"))
    with pytest.raises(hd.ConfigError, match="name"):
        hd.attach(model, hd.LoRAConfig(targets="q_proj"), name="a.b")


def test_merge_refuses_non_finite_and_changes_nothing(llama):
    model, inputs, targets = llama
    snap = snapshot(model)
    d = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    with torch.no_grad():
        next(iter(d.pieces.values())).lora_B.fill_(float("inf"))
    with pytest.raises(hd.MergeError, match="NaN/Inf"):
        d.merge()
    assert not d.merged
    d.detach()
    assert_restored(model, snap)


def test_merge_without_copy_is_approximate_and_says_so(llama):
    model, inputs, targets = llama
    d = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    perturb(d)
    before = {n: p.clone() for n, p in model.named_parameters() if "_hookdelta" not in n}
    d.merge(keep_original=False)
    d.unmerge()
    for n, p in model.named_parameters():
        if "_hookdelta" not in n:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_merge_and_detach_bakes_the_delta(llama):
    model, inputs, targets = llama
    d = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    perturb(d)
    adapted = outputs(model, inputs)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert d.merge_and_detach() is model
    assert model.model.layers[0].self_attn.q_proj.weight is q, "merged in place"
    assert hd.deltas(model) == {} and not hasattr(model, "_hookdelta") and q_hooks(model) == 0
    torch.testing.assert_close(outputs(model, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_moves_with_the_model_dtype_train_eval_parameters(llama):
    model, inputs, targets = llama
    d = hd.attach(model, hd.LoRAConfig(r=2, dropout=0.1, targets=targets))
    perturb(d)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in d.parameters()), "model.parameters() includes the delta"
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in d.parameters()}
    expected = outputs(model, inputs)
    model.double()
    assert all(p.dtype == torch.float64 for p in d.parameters())
    torch.testing.assert_close(outputs(model, inputs).float(), expected, rtol=1e-4, atol=1e-5)
    model.half()
    assert all(p.dtype == torch.float16 for p in d.parameters())
    model.float()
    model.train()
    assert d.training and all(p.training for p in d.pieces.values())
    model.eval()
    assert not d.training
    d.merge()
    model.double()  # the merge copy moves too: unmerge is still exact in the new dtype
    d.unmerge()
    d.detach()


def test_piece_keys_summary_and_deltas(llama):
    model, inputs, targets = llama
    d = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    assert hd.deltas(model) == {"lora": d}
    # q_proj 32->32 and v_proj 32->16 in 2 layers, r=2: A [2, in] + B [out, 2]
    assert d.num_trainable == 2 * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))
    line = d.summary()
    assert "trainable params" in line and f"{d.num_trainable:,}" in line
    d2 = hd.attach(model, hd.LoRAConfig(r=2, targets=targets))
    assert d2.name == "lora_2"
