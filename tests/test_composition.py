"""Composition blocks (hd.average, hd.fuse, hd.split) against hand-written references: plain
forward hooks on a copy of the bare model that compute each adapter by its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same, bare_copy, outputs, perturb, snapshot
from tiny_models import build, main_output

import hookdelta as hd
from hookdelta.methods.adapter import ACTIVATIONS


def _adapters(arch, n=3):
    model, inputs, _ = build(arch)
    for i in range(n):
        perturb(
            hd.attach(model, hd.AdapterConfig(bottleneck_dim=4 + i, non_linearity="gelu"), name=f"a{i}"),
            std=0.3,
            seed=i + 1,
        )
    return model, inputs


def _change(delta, site, h):
    """A bottleneck adapter's change at `site` by its formula: s·up(f(down(h)))."""
    p = delta.piece(site)
    down = F.linear(h, p.down.weight, p.down.bias)
    return p.scale * F.linear(ACTIVATIONS[p.non_linearity](down), p.up.weight, p.up.bias)


def _by_hand(model, inputs, rule, names):
    """The model without hookdelta, each block site's output replaced by rule(site, h, deltas)."""
    bare = bare_copy(model)
    deltas = [hd.deltas(model)[n] for n in names]
    handles = []
    for site in (p.key for p in deltas[0].pieces.values()):

        def hook(module, args, out, site=site):
            return rule(site, out, deltas)

        handles.append(bare.get_submodule(site).register_forward_hook(hook))
    try:
        return outputs(bare, inputs)
    finally:
        for h in handles:
            h.remove()


ARCHS = ["llama", "gpt2", "bert"]


@pytest.mark.parametrize("arch", ARCHS)
def test_average_equals_the_weighted_changes(arch):
    model, inputs = _adapters(arch)
    weights = {"a0": 0.5, "a1": 0.3, "a2": 1.2}
    want = _by_hand(
        model,
        inputs,
        lambda site, h, ds: h + sum(w / 2.0 * _change(d, site, h) for w, d in zip(weights.values(), ds, strict=True)),
        list(weights),
    )
    block = hd.average(model, weights, name="avg")
    assert not any(hd.deltas(model)[n].enabled for n in weights)  # the block runs them
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)
    stacked = _by_hand(model, inputs, lambda site, h, ds: h + _change(ds[0], site, h), ["a0"])
    assert (want - stacked).abs().max() > 1e-3
    assert block.num_trainable == 0


def _fusion_by_hand(block):
    def rule(site, h, ds):
        fp = block.piece(site)
        changes = torch.stack([_change(d, site, h) for d in ds], dim=-2)
        q = F.linear(h, fp.query.weight, fp.query.bias)
        k = F.linear(changes, fp.key_proj.weight, fp.key_proj.bias)
        v = F.linear(changes, fp.value.weight, fp.value.bias)
        scores = torch.einsum("...d,...nd->...n", q, k) / fp.temperature
        return h + torch.einsum("...n,...nd->...d", scores.softmax(-1), v)

    return rule


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_equals_adapter_fusion_by_hand_and_trains_only_the_fusion(arch):
    model, inputs = _adapters(arch)
    block = hd.fuse(model, ["a0", "a1", "a2"], name="fusion", temperature=2.0)
    perturb(block, std=0.2, seed=9)
    want = _by_hand(model, inputs, _fusion_by_hand(block), ["a0", "a1", "a2"])
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in block.parameters()}
    model.train()
    main_output(model(**inputs)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in block.parameters())
    assert all(p.grad is None for n in ("a0", "a1", "a2") for p in hd.deltas(model)[n].parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_split_gives_each_delta_its_tokens(arch):
    model, inputs = _adapters(arch, n=2)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids}

    def rule(site, h, ds):
        out = h.clone()
        out[:, :4] = h[:, :4] + _change(ds[0], site, h[:, :4])
        out[:, 6:] = h[:, 6:] + _change(ds[1], site, h[:, 6:])
        return out

    want = _by_hand(model, inputs, rule, ["a0", "a1"])
    hd.split(model, {"a0": slice(0, 4), "a1": slice(6, None)}, name="split")
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)


def test_split_refuses_a_kv_cache_and_generates_without_one():
    model, inputs = _adapters("llama", n=2)
    hd.split(model, {"a0": slice(0, 4), "a1": slice(4, None)}, name="split")
    ids = inputs["input_ids"]
    with pytest.raises(hd.UnsupportedModuleError, match="KV cache"):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    got = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    # by hand: each step is a full forward of the sequence so far
    seq = ids
    for _ in range(3):
        nxt = main_output(model(input_ids=seq))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq)


def _same_but_hook_ids(model, snap):
    """As assert_same, but hooks by count: enabling the sources again registers their hooks anew."""
    now = snapshot(model)
    assert {n: [len(h) for h in hooks] for n, hooks in now["hooks"].items()} == {
        n: [len(h) for h in hooks] for n, hooks in snap["hooks"].items()
    }
    assert_same(model, {**snap, "hooks": now["hooks"]})


@pytest.mark.parametrize("kind", ["average", "fuse", "split"])
def test_save_load_and_bit_exact_detach(kind, tmp_path):
    model, inputs = _adapters("llama", n=2)
    snap, before = snapshot(model), outputs(model, inputs)
    make = {
        "average": lambda: hd.average(model, {"a0": 1.0, "a1": 2.0}, name="blk"),
        "fuse": lambda: hd.fuse(model, ["a0", "a1"], name="blk"),
        "split": lambda: hd.split(model, {"a0": slice(0, 3), "a1": slice(3, None)}, name="blk"),
    }[kind]
    block = make()
    perturb(block, std=0.2, seed=4)
    want = outputs(model, inputs)
    block.save(tmp_path / "blk")
    block.detach()
    _same_but_hook_ids(model, snap)  # sources enabled and trainable again, everything else as it was
    torch.testing.assert_close(outputs(model, inputs), before, rtol=0, atol=0)
    loaded = hd.load(model, tmp_path / "blk")
    assert loaded.method == kind
    torch.testing.assert_close(outputs(model, inputs), want, rtol=0, atol=0)
    loaded.detach()
    _same_but_hook_ids(model, snap)
    other, _, _ = build("llama")
    with pytest.raises(hd.DeltaStateError, match="no delta named"):
        hd.load(other, tmp_path / "blk")  # its sources are not there


def test_refusals():
    model, inputs = _adapters("llama", n=2)
    hd.attach(model, hd.AdapterConfig(bottleneck_dim=2, placement="pfeiffer"), name="ffn_only")
    hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=2), name="prompt")
    snap = snapshot(model)
    for call, error, match in [
        (lambda: hd.average(model, {"a0": 1.0, "ffn_only": 1.0}), hd.ConfigError, "same layers"),
        (lambda: hd.fuse(model, ["a0", "prompt"]), hd.UnsupportedModuleError, "layer outputs"),
        (lambda: hd.fuse(model, ["a0"]), hd.ConfigError, "two or more"),
        (lambda: hd.fuse(model, ["a0", "zz"]), hd.DeltaStateError, "no delta named"),
        (lambda: hd.average(model, {"a0": 1.0, "a1": -1.0}), hd.ConfigError, "sum to 0"),
        (lambda: hd.split(model, {"a0": slice(0, 5), "a1": slice(4, None)}), hd.ConfigError, "overlap"),
        (lambda: hd.split(model, {"a0": slice(0, 5, 2), "a1": slice(5, None)}), hd.ConfigError, "step"),
    ]:
        with pytest.raises(error, match=match):
            call()
        assert_same(model, snap)
    hd.deltas(model)["prompt"].detach()
    block = hd.average(model, {"a0": 1.0, "a1": 1.0})
    hd.deltas(model)["a0"].enable()
    with pytest.raises(hd.DeltaStateError, match="act twice"):
        model(**inputs)
    hd.deltas(model)["a0"].disable()
    model(**inputs)
    block.detach()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: hd.average(m, ["a0", "a1"]),  # weights, not names
        lambda m: hd.fuse(m, "a0a1"),  # a string is not a list of names
        lambda m: hd.split(m, [1, 2]),
        lambda m: hd.combine(m, {"a0": 1.0, "a1": 1.0}, how="svd", svd_clamp=5.0),
    ],
)
def test_wrong_kinds_of_arguments_get_a_config_error(call):
    model, inputs = _adapters("llama", n=2)
    snap = snapshot(model)
    with pytest.raises(hd.ConfigError):
        call(model)
    assert_same(model, snap)
