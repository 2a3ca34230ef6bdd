"""LoReFT and DiReFT against their definitions (pyreft): at the chosen positions of a block's
output, h + Rᵀ(W h + b − R h) with R's rows orthonormal (LoReFT), h + Rᵀ(W h + b) (DiReFT);
every other position, and every other block, untouched. The reference is a hand-written
forward hook on an untouched copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_restored, snapshot
from tiny_models import build

import hookdelta as hd

pytestmark = pytest.mark.reft


def by_hand(bare, block, piece, positions, orthogonal=True):
    """A hook on the untouched model's block that applies the intervention from its definition."""
    w = piece.rotate_layer.weight.detach()  # [d, r]: R = wᵀ
    lw, lb = piece.learned_source.weight.detach(), piece.learned_source.bias.detach()

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        for row, pos in enumerate(positions(h)):
            for t in pos:
                x = h[row, t]
                target = x @ lw.T + lb - (x @ w if orthogonal else 0)
                h[row, t] = x + target @ w.T
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    return bare.get_submodule(block).register_forward_hook(hook)


def first_last(first, last):
    return lambda h: [sorted(set(range(first)) | set(range(h.shape[1] - last, h.shape[1])))] * h.shape[0]


@pytest.mark.parametrize("cfg_cls,orth", [(hd.LoReFTConfig, True), (hd.DiReFTConfig, False)])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_matches_the_definition(cfg_cls, orth, arch):
    model, inputs, _ = build(arch)
    bare = copy.deepcopy(model)
    delta = hd.attach(model, cfg_cls(r=3, positions="f1+l2", layers=[1]))
    (piece,) = delta.pieces.values()
    handle = by_hand(bare, piece.key, piece, first_last(1, 2), orthogonal=orth)
    with torch.no_grad():
        got, want, untouched = model(**inputs), bare(**inputs), None
    handle.remove()
    key = "logits" if hasattr(got, "logits") else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        untouched = bare(**inputs)[key]
    assert not torch.allclose(got[key], untouched, atol=1e-4), "the intervention must change something"


def test_callable_positions_per_row_and_only_there():
    model, inputs, _ = build("llama")
    bare = copy.deepcopy(model)
    rows = torch.tensor([[0, 3], [2, 6]])
    delta = hd.attach(model, hd.LoReFTConfig(r=2, positions=lambda h: rows, layers=[0]))
    (piece,) = delta.pieces.values()
    handle = by_hand(bare, piece.key, piece, lambda h: rows.tolist())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, bare(**inputs).logits, rtol=1e-5, atol=1e-5)
    handle.remove()
    with pytest.raises(hd.ConfigError, match="positions callable"):
        hd.deltas(model)[delta.name].detach()
        hd.attach(model, hd.LoReFTConfig(r=2, positions=lambda h: torch.tensor([[99]]), layers=[0]))
        model(**inputs)


def test_rotation_stays_orthonormal_while_training():
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoReFTConfig(r=4, positions="l1"))
    opt = torch.optim.AdamW(delta.parameters(), lr=0.05)
    for _ in range(3):
        model(**inputs).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    for piece in delta.pieces.values():
        w = piece.rotate_layer.weight
        torch.testing.assert_close(w.T @ w, torch.eye(4), rtol=1e-5, atol=1e-5)


def test_decode_steps_pass_through_and_refusals(tmp_path):
    model, inputs, _ = build("llama")
    snap = snapshot(model)
    ids = inputs["input_ids"]
    positions = torch.arange(5, 5 + ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        bare = model(input_ids=ids, position_ids=positions).logits
    delta = hd.attach(model, hd.LoReFTConfig(r=2, positions="l1"))
    with torch.no_grad():  # a call continuing a sequence (generate's decode steps): no intervention
        assert torch.equal(model(input_ids=ids, position_ids=positions).logits, bare)
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    with pytest.raises(hd.MergeError):
        delta.merge()
    delta.detach()
    assert_restored(model, snap)
    cases = [(dict(r=64), "exceeds the hidden size"), (dict(layers=[7]), "blocks"), (dict(positions="m3"), "positions")]
    for kw, msg in cases:
        with pytest.raises(hd.ConfigError, match=msg):
            hd.attach(model, hd.LoReFTConfig(**kw))
        assert_restored(model, snap)
    delta = hd.attach(model, hd.DiReFTConfig(r=2, positions=lambda h: torch.zeros(h.shape[0], 1, dtype=torch.long)))
    with pytest.raises(hd.ConfigError, match="callable"):
        delta.save(tmp_path / "x")
