"""Any mergeable delta as a plain LoRA (issue 28): `delta.as_lora(rank=...)` /
`as_lora(tolerance=...)` and `hookdelta convert --to lora`. The reference for each site is the
change merge() writes into the model's weights (read off the weights, not the pieces): at full
rank the LoRA reproduces the delta's outputs; within a tolerance, each site's B·A differs from
that change by at most the tolerance (relative, Frobenius), as the report says; the result is a
LoRA PEFT loads to the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_restored, perturb, snapshot
from tiny_models import build

import hookdelta as hd

QV = ["q_proj", "v_proj"]
SOURCES = {
    "dora": lambda: hd.LoRAConfig(r=4, targets=QV, use_dora=True),
    "loha": lambda: hd.LoHaConfig(targets=QV),
    "lokr": lambda: hd.LoKrConfig(targets=QV),
    "oft": lambda: hd.OFTConfig(oft_block_size=4, targets=QV),
    "boft": lambda: hd.BOFTConfig(boft_block_size=4, targets=QV),
    "vera": lambda: hd.VeRAConfig(r=8, targets=QV),
    "ia3": lambda: hd.IA3Config(),
    "fourierft": lambda: hd.FourierFTConfig(n_frequency=30, targets=QV),
    "hira": lambda: hd.HiRAConfig(r=2, targets=QV),
    "delora": lambda: hd.DeLoRAConfig(r=2, targets=QV),
    "gralora": lambda: hd.GraLoRAConfig(r=4, gralora_k=2, targets=QV),
    "miss": lambda: hd.MiSSConfig(r=4, targets=QV),
    "c3a": lambda: hd.C3AConfig(block_size=8, targets=QV),
    "hra": lambda: hd.HRAConfig(r=4, targets=QV),
    "road": lambda: hd.RoAdConfig(group_size=8, targets=QV),
    "adalora": lambda: hd.AdaLoRAConfig(init_r=4, target_r=2, targets=QV),
    "vblora": lambda: hd.VBLoRAConfig(r=2, vector_length=8, num_vectors=8, targets=QV),
    "randlora": lambda: hd.RandLoRAConfig(r=8, randlora_alpha=16.0, targets=QV),
    "shira": lambda: hd.SHiRAConfig(r=2, targets=QV),
}


def source(name):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, SOURCES[name](), name="src")
    perturb(delta, std=0.2)
    return model, inputs, delta


def merged_changes(model, delta):
    """What merge() writes into each weight: the merged weights minus the originals."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.merge()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.unmerge()
    return {
        n.rpartition(".")[0]: after[n] - before[n]
        for n in before
        if n.endswith(".weight") and not torch.equal(after[n], before[n])
    }


@pytest.mark.parametrize("name", list(SOURCES))
def test_at_full_rank_the_lora_is_the_delta(name):
    model, inputs, delta = source(name)
    with torch.no_grad():
        want = model(**inputs).logits
    lora = delta.as_lora(rank=10**6, name="lora")
    delta.disable()
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(error < 1e-5 for _, error in lora.conversion.values())


@pytest.mark.parametrize("name", ["dora", "loha", "oft", "ia3"])
def test_within_a_tolerance_each_site_is_within_it(name):
    model, inputs, delta = source(name)
    changes = merged_changes(model, delta)
    lora = delta.as_lora(tolerance=0.05, name="lora")
    assert set(lora.conversion) == set(changes)
    ranks = set()
    for key, dw in changes.items():
        piece = lora.piece(key)
        error = ((piece.lora_B @ piece.lora_A) * float(piece.scale) - dw).norm() / dw.norm()
        rank, reported = lora.conversion[key]
        assert error.item() <= 0.05 + 1e-4 and abs(error.item() - reported) < 1e-4, (key, error.item(), reported)
        assert piece.r == rank
        ranks.add(rank)
    assert any(lora.conversion[k][0] < min(dw.shape) for k, dw in changes.items())  # truly truncated


def test_fused_experts_are_factored_per_expert():
    model, inputs, _ = build("mixtral")
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("transformers 4 keeps one nn.Linear per expert (covered by the linear cases)")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["ffn.in", "ffn.out"], use_dora=True), name="src")
    perturb(delta, std=0.2)
    with torch.no_grad():
        want = model(**inputs).logits
    lora = delta.as_lora(rank=10**6, name="lora")
    delta.disable()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-5)
    assert all(lora.piece(k).lora_A.dim() == 3 for k in lora.conversion)


def test_the_lora_loads_in_peft_to_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs, delta = source("loha")
    base = copy.deepcopy(model)
    hd.deltas(base)["src"].detach()
    lora = delta.as_lora(tolerance=1e-3, name="lora")
    delta.disable()
    with torch.no_grad():
        ours = model(**inputs).logits
    lora.save_peft(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours, rtol=1e-4, atol=1e-5)


def test_what_a_lora_cannot_carry_is_refused_and_nothing_changes():
    model, _, _ = build("llama")
    snap = snapshot(model)
    adapter = hd.attach(model, hd.AdapterConfig(bottleneck_dim=4))
    with pytest.raises(hd.UnsupportedModuleError, match="no weight change"):
        adapter.as_lora(rank=4)
    with pytest.raises(hd.ConfigError, match="exactly one of rank"):
        adapter.as_lora()
    adapter.detach()
    bitfit = hd.attach(model, hd.BitFitConfig(targets=["q_proj"], norm_biases=False))
    perturb(bitfit, std=0.1)
    with pytest.raises(hd.UnsupportedModuleError, match="LoRA carries the weight"):
        bitfit.as_lora(rank=4)
    bitfit.detach()
    assert list(hd.deltas(model)) == []
    assert_restored(model, snap)


def test_the_cli_converts_to_lora(tmp_path, capsys):
    from hookdelta.cli import main

    model, inputs, delta = source("lokr")
    hd.deltas(model)["src"].detach()
    model.save_pretrained(tmp_path / "base")
    delta = hd.attach(model, SOURCES["lokr"](), name="src")
    perturb(delta, std=0.2)
    with torch.no_grad():
        want = model(**inputs).logits
    delta.save(tmp_path / "lokr")
    assert (
        main(
            [
                "convert",
                "--to",
                "lora",
                "--rank",
                "64",
                "--base",
                str(tmp_path / "base"),
                str(tmp_path / "lokr"),
                str(tmp_path / "lora"),
            ]
        )
        == 0
    )
    assert "a LoRA in PEFT's format" in capsys.readouterr().out
    delta.detach()
    loaded = hd.load_peft(model, tmp_path / "lora")
    assert loaded.method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "fourierft", "c3a"])
def test_a_fixed_rank_gives_the_lora_peft_save_as_lora_gives(kind, tmp_path):
    """PEFT's own conversion (save_as_lora, PEFT 0.20 and later) of the same adapter to the same rank:
    the same update s·B·A per layer (the factors' signs may differ, their product does not). FourierFT's
    and C3A's updates have their singular values in (near-)equal pairs, where a cut is not unique: the
    rank is one where every layer's spectrum has a gap."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "save_as_lora"):
        pytest.skip("this PEFT has no save_as_lora")
    peft_cfg = {
        "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=QV),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=30, target_modules=QV),
        "c3a": lambda: peft.C3AConfig(block_size=8, target_modules=QV),
    }[kind]()
    model, _, _ = build("llama")
    twin = peft.get_peft_model(copy.deepcopy(model), peft_cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    twin.save_pretrained(tmp_path / "src")
    source = hd.load_peft(copy.deepcopy(model), tmp_path / "src")
    spectra = [torch.linalg.svdvals(merged_changes(source.model, source)[k]) for k in source.sites]
    rank = next(k for k in range(3, 16) if all(s[k - 1] - s[k] > 1e-2 * s[0] for s in spectra))
    peft.save_as_lora(tmp_path / "theirs", twin, rank=rank)
    theirs = hd.load_peft(copy.deepcopy(model), tmp_path / "theirs")
    ours = source.as_lora(rank=rank, name="lora")
    for piece in ours.pieces.values():
        other = theirs.piece(piece.key)
        got = piece.scale * piece.lora_B.detach() @ piece.lora_A.detach()
        want = other.scale * other.lora_B.detach() @ other.lora_A.detach()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
