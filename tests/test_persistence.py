"""Saving and loading: exact round trips, and one clear error per bad file, model untouched."""

import json
import os

import pytest
import torch
from helpers import assert_restored, outputs, perturb, save_lora, snapshot
from tiny_models import build, llama

import hookdelta as hd


@pytest.fixture()
def saved(tmp_path):
    path, inputs, adapted, _ = save_lora(tmp_path, also_train="lm_head", name="mine")
    return path, adapted, inputs


def test_files_hold_only_the_delta_and_no_pickle(saved):
    path, _, _ = saved
    assert sorted(os.listdir(path)) == ["delta.json", "delta.safetensors"]
    meta = json.loads((path / "delta.json").read_text())
    assert meta["format_version"] == 1 and meta["method"] == "lora" and meta["backbone"] == "LlamaForCausalLM"
    assert meta["config"]["r"] == 4 and meta["also_train"] == ["lm_head"]
    assert set(meta["fingerprint"]) == set(meta["sites"])
    from safetensors import safe_open

    with safe_open(str(path / "delta.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys and "lm_head.weight" in keys
    assert all(k.endswith(("lora_A", "lora_B", "lm_head.weight")) for k in keys)


def test_load_reproduces_outputs_exactly_with_also_train(saved):
    path, expected, inputs = saved
    fresh = build("llama")[0]
    snap = snapshot(fresh)
    delta = hd.load(fresh, path)
    assert delta.name == "mine"
    assert torch.equal(outputs(fresh, inputs), expected)
    delta.detach()
    assert_restored(fresh, snap)


def test_load_on_other_base_weights_warns(saved):
    path, _, _ = saved
    other = build("llama", seed=5)[0]
    with pytest.warns(hd.BaseWeightsMismatchWarning):
        hd.load(other, path)


def bad_case(path, case):
    j, t = path / "delta.json", path / "delta.safetensors"
    meta = json.loads(j.read_text())
    if case == "missing-dir":
        return path / "nope", "not a directory"
    if case == "missing-json":
        j.unlink()
        return path, "delta.json is missing"
    if case == "missing-tensors":
        t.unlink()
        return path, "delta.safetensors is missing"
    if case == "corrupt-json":
        j.write_text(j.read_text()[:40])
        return path, "not valid JSON"
    if case == "unknown-version":
        meta["format_version"] = 99
        j.write_text(json.dumps(meta))
        return path, "format version 99"
    if case == "truncated-tensors":
        data = t.read_bytes()
        t.write_bytes(data[: len(data) // 2])
        return path, "corrupt or truncated"
    if case == "garbage-tensors":
        t.write_bytes(b"\x00" * 64)
        return path, "corrupt or truncated"
    if case == "missing-site":
        meta["sites"][0] = "model.layers.9.self_attn.q_proj"
        j.write_text(json.dumps(meta))
        return path, "layers.9"
    if case == "bad-config":
        meta["config"]["r"] = -1
        j.write_text(json.dumps(meta))
        return path, "config saved"
    if case == "missing-tensor-key":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(t))
        tensors.pop(next(iter(tensors)))
        save_file(tensors, str(t))
        return path, "missing"
    raise AssertionError(case)


CASES = [
    "missing-dir",
    "missing-json",
    "missing-tensors",
    "corrupt-json",
    "unknown-version",
    "truncated-tensors",
    "garbage-tensors",
    "missing-site",
    "bad-config",
    "missing-tensor-key",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_raises_one_clear_error_and_leaves_model_untouched(saved, case):
    path, _, _ = saved
    target, message = bad_case(path, case)
    model = build("llama")[0]
    snap = snapshot(model)
    with pytest.raises(hd.DeltaFileError, match=message):
        hd.load(model, target)
    assert_restored(model, snap)


def test_shape_mismatch_is_refused(saved):
    path, _, _ = saved
    wider = llama(hidden=48)[0]  # (the tiny Llama, wider)
    snap = snapshot(wider)
    with pytest.raises(hd.DeltaFileError, match="shape"):
        hd.load(wider, path)
    assert_restored(wider, snap)


def test_load_onto_another_architecture_names_missing_sites(saved):
    path, _, _ = saved
    bert = build("bert")[0]
    snap = snapshot(bert)
    with pytest.raises(hd.DeltaFileError, match="LlamaForCausalLM"):
        hd.load(bert, path)
    assert_restored(bert, snap)


def test_overwrite_rules_and_atomic_writes(tmp_path):
    model, inputs, targets = build("llama")
    a = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="a")
    b = hd.attach(model, hd.LoRAConfig(r=2, targets=targets), name="b")
    a.save(tmp_path)
    a.save(tmp_path)  # the same delta again: fine (periodic checkpoints)
    with pytest.raises(hd.DeltaFileError, match="overwrite=True"):
        b.save(tmp_path)
    b.save(tmp_path, overwrite=True)
    assert json.loads((tmp_path / "delta.json").read_text())["name"] == "b"
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]
    (tmp_path / "file").write_text("x")
    with pytest.raises(hd.DeltaFileError, match="not a directory"):
        a.save(tmp_path / "file")


def test_callable_selector_saves_as_exact_sites(tmp_path):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=lambda n, m: n.endswith("k_proj")))
    perturb(delta)
    expected = outputs(model, inputs)
    delta.save(tmp_path)
    fresh = build("llama")[0]
    loaded = hd.load(fresh, tmp_path)
    assert loaded.sites == delta.sites
    assert torch.equal(outputs(fresh, inputs), expected)


def test_loaded_name_clash_gets_a_fresh_name(saved):
    path, _, _ = saved
    model = build("llama")[0]
    first = hd.load(model, path)
    second = hd.load(model, path)
    assert first.name == "mine" and second.name != "mine"
    with pytest.raises(hd.DeltaStateError, match="already has a delta named"):
        hd.load(model, path, name="mine")


def test_state_dict_opt_in_round_trip_through_torch_save(tmp_path):
    """Frameworks that checkpoint model.state_dict(): with the opt-in the delta travels along."""
    model, inputs, _ = build("llama")
    cfg = hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"], also_train="lm_head")
    delta = hd.attach(model, cfg)
    perturb(delta)
    with torch.no_grad():
        expected = model(**inputs).logits
    plain = list(model.state_dict())
    with hd.include_in_state_dict(model):
        torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    assert list(model.state_dict()) == plain, "the opt-in ends with the block"
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert any(k.startswith("_hookdelta.") for k in saved) and set(plain) < set(saved)

    fresh, _, _ = build("llama", seed=9)  # other base weights: the checkpoint restores them too
    hd.attach(fresh, cfg)
    with hd.include_in_state_dict(fresh):
        fresh.load_state_dict(saved, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        build("llama")[0].load_state_dict(saved, strict=True)  # without deltas attached: refused, not silent


def test_state_dict_opt_in_needs_deltas():
    with pytest.raises(hd.DeltaStateError):
        hd.include_in_state_dict(build("llama")[0])
