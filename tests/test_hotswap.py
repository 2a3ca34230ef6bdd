"""Hot-swap (hd.load(..., into=name), hd.prepare_hotswap): a saved delta's values go into an
attached one in place; the reference is the same file attached fresh to an untouched model."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same, outputs, perturb, save_lora, snapshot
from tiny_models import build

import hookdelta as hd


def _fresh(path):
    """The reference: the saved delta attached to a fresh base model."""
    model, inputs, _ = build("llama")
    hd.load(model, path)
    return outputs(model, inputs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    return {
        "r4": save_lora(root / "r4", r=4, alpha=16.0, std=0.2).path,
        "r8": save_lora(root / "r8", r=8, alpha=4.0, std=0.3).path,
        "r16": save_lora(root / "r16", r=16, std=0.1).path,
        "k": save_lora(root / "k", r=4, targets=["q_proj", "k_proj"]).path,
    }


def _attached(r=8):
    model, inputs, targets = build("llama")
    perturb(hd.attach(model, hd.LoRAConfig(r=r, targets=targets), name="a"), std=0.1)
    return model, inputs


@pytest.mark.parametrize("which", ["r4", "r8"])
def test_swap_equals_a_fresh_load(files, which):
    model, inputs = _attached(r=8)
    before = {n: p for n, p in model.named_parameters()}
    delta = hd.load(model, files[which], into="a")
    assert delta is hd.deltas(model)["a"] and list(hd.deltas(model)) == ["a"]
    torch.testing.assert_close(outputs(model, inputs), _fresh(files[which]), rtol=1e-6, atol=1e-6)
    assert all(p is before[n] for n, p in model.named_parameters())  # in place: the same tensors


def test_prepare_pads_without_changing_outputs_and_saves_what_it_runs(tmp_path):
    model, inputs = _attached(r=4)
    want = outputs(model, inputs)
    hd.prepare_hotswap(model, max_rank=16)
    delta = hd.deltas(model)["a"]
    assert all(p.lora_A.shape[0] == 16 for p in delta.pieces.values())
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-6, atol=1e-6)
    delta.save(tmp_path / "padded")
    torch.testing.assert_close(_fresh(tmp_path / "padded"), want, rtol=1e-6, atol=1e-6)


def _counting():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def test_swap_under_compile_does_not_recompile(files):
    refs = {which: _fresh(files[which]) for which in ("r4", "r16", "r8")}  # (attaching resets dynamo: first)
    base = outputs(build("llama")[0], build("llama")[1])
    torch.compiler.reset()
    model, inputs = _attached(r=8)
    hd.prepare_hotswap(model, max_rank=16)
    graphs, backend = _counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(**inputs)
        compiled(**inputs)
    count = len(graphs)
    assert count >= 1
    for which in ("r4", "r16", "r8"):  # other ranks, other alphas (scales 4, 0.5, 0.5)
        hd.load(model, files[which], into="a")
        with torch.no_grad():
            got = compiled(**inputs).logits
        assert len(graphs) == count, f"swapping in {which} recompiled"
        torch.testing.assert_close(got, refs[which], rtol=1e-5, atol=1e-5)
    # any other lifecycle change still reaches the compiled model (never stale)
    hd.deltas(model)["a"].disable()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, base, rtol=1e-5, atol=1e-5)
    torch.compiler.reset()


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("r16", hd.DeltaFileError, "prepare_hotswap"),
        ("k", hd.DeltaFileError, "same sites"),
        ("nobody", hd.DeltaStateError, "no delta named"),
        ("ia3", hd.DeltaFileError, "same method"),
        ("merged", hd.DeltaStateError, "unmerge"),
        ("both", hd.ConfigError, "not both"),
    ],
)
def test_refusals_leave_the_model_as_it_was(files, tmp_path, case, error, match):
    model, inputs = _attached(r=8)
    path, into, name = files.get(case, files["r4"]), "a", None
    if case == "nobody":
        into = "b"
    if case == "ia3":
        other, _, _ = build("llama")
        hd.attach(other, hd.IA3Config(), name="i").save(tmp_path / "ia3")
        path = tmp_path / "ia3"
    if case == "merged":
        hd.deltas(model)["a"].merge()
    if case == "both":
        name = "x"
    snap, want = snapshot(model), outputs(model, inputs)
    with pytest.raises(error, match=match):
        hd.load(model, path, into=into, name=name)
    assert_same(model, snap)
    torch.testing.assert_close(outputs(model, inputs), want, rtol=0, atol=0)


def test_prepare_refusals():
    model, inputs = _attached(r=8)
    with pytest.raises(hd.ConfigError, match="ranks above"):
        hd.prepare_hotswap(model, max_rank=4)
    with pytest.raises(hd.ConfigError, match="positive integer"):
        hd.prepare_hotswap(model, max_rank=0)
    with pytest.raises(hd.DeltaStateError, match="no delta named"):
        hd.prepare_hotswap(model, max_rank=8, names=["zz"])
    assert hd.deltas(model)["a"].pieces["model-layers-0-self_attn-q_proj"].lora_A.shape[0] == 8


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_swap_on_other_architectures(tmp_path, arch):
    source, inputs, targets = build(arch)
    perturb(hd.attach(source, hd.LoRAConfig(r=2, alpha=6.0, targets=targets), name="s"), std=0.3)
    want = outputs(source, inputs)
    hd.deltas(source)["s"].save(tmp_path / "s")
    model, _, _ = build(arch)
    perturb(hd.attach(model, hd.LoRAConfig(r=8, targets=targets), name="a"), std=0.1)
    hd.prepare_hotswap(model, max_rank=8)
    hd.load(model, tmp_path / "s", into="a")
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_get_clear_errors(files):
    model, inputs = _attached(r=8)
    snap = snapshot(model)
    with pytest.raises(hd.ConfigError, match="name of an attached delta"):
        hd.load(model, files["r4"], into=["a"])
    with pytest.raises(hd.UnsupportedModuleError):
        hd.prepare_hotswap(object(), max_rank=8)
    assert_same(model, snap)
    hd.prepare_hotswap(model, max_rank=8, names="a")  # one name as a string


@pytest.mark.parametrize(
    "live, saved, match",
    [
        (hd.LoRAConfig(r=4), hd.LoRAConfig(r=4, use_dora=True), "use_dora: True in the file"),
        (hd.LoRAConfig(r=4), hd.LoRAConfig(r=4, bias="lora_only"), "bias"),
        (hd.LoRAConfig(r=4), hd.LoRAConfig(r=4, init="pissa"), "has tensors 'a' lacks"),
        (hd.LoRAConfig(r=4), hd.LoRAConfig(r=4, activate_after_tokens=[5, 9]), "activate_after_tokens"),
        (hd.LoHaConfig(r=4, alpha=4.0), hd.LoHaConfig(r=4, alpha=8.0), "alpha: 8.0 in the file"),
        (hd.LoKrConfig(r=4, alpha=4.0), hd.LoKrConfig(r=4, alpha=8.0), "alpha"),
        (hd.OFTConfig(r=4, oft_block_size=0), hd.OFTConfig(r=4, oft_block_size=0, coft=True), "coft"),
        (hd.VeRAConfig(r=8), hd.VeRAConfig(r=8, projection_prng_key=7), "projection_prng_key"),
    ],
    ids=["dora", "lora_bias", "pissa", "alora", "loha-alpha", "lokr-alpha", "oft-coft", "vera-key"],
)
def test_a_file_that_computes_otherwise_is_refused_and_nothing_changes(tmp_path, live, saved, match):
    """A hot-swap copies tensors; a file whose other settings or extra tensors would make it
    compute something else than the live delta after the copy is refused, naming them."""
    other, _, _ = build("llama")
    perturb(hd.attach(other, saved.replace(targets=["q_proj", "v_proj"]), name="s"), std=0.2)
    hd.deltas(other)["s"].save(tmp_path / "s")
    model, inputs, _ = build("llama")
    perturb(hd.attach(model, live.replace(targets=["q_proj", "v_proj"]), name="a"), std=0.1)
    snap, want = snapshot(model), outputs(model, inputs)
    config = hd.deltas(model)["a"].config
    with pytest.raises(hd.DeltaFileError, match=match):
        hd.load(model, tmp_path / "s", into="a")
    assert_same(model, snap)
    assert hd.deltas(model)["a"].config == config
    torch.testing.assert_close(outputs(model, inputs), want, rtol=0, atol=0)
