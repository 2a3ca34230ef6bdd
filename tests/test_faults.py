"""Faults while writing: a save that dies part-way leaves the previous complete delta (or, in
an empty directory, nothing) and never a mix of two saves; the old delta stays until the new
one is complete. Faults are injected by making a writer or a rename raise."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from helpers import perturb
from tiny_models import build

import hookdelta as hd
import hookdelta.persistence as persistence


class Crash(Exception):
    pass


def digest(directory: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(directory).iterdir())}


def model_with(seed: int):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj", "v_proj"]), name="d")
    perturb(delta, seed=seed)
    return model, inputs, delta


def output_after_load(directory, inputs):
    fresh = build("llama")[0]
    hd.load(fresh, directory)
    with torch.no_grad():
        return fresh(**inputs).logits


def crash_after(monkeypatch, target, name, calls_before_crash):
    """Make `target.name` raise on call number calls_before_crash + 1 (the earlier calls work)."""
    real = getattr(target, name)
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls_before_crash:
            raise Crash(f"injected fault in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)


FAULTS = {
    # where the save dies: (object, attribute, calls that succeed first)
    "writing the tensors": (persistence, "save_file", 0),
    "writing the description, after the tensors": (Path, "write_text", 0),
    "renaming the first file into place": (os, "replace", 0),
    "between renaming the two files": (os, "replace", 1),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_crash_while_saving_over_a_delta_keeps_the_old_one(fault, tmp_path, monkeypatch):
    old_model, inputs, old = model_with(seed=1)
    old.save(tmp_path)
    with torch.no_grad():
        old_out = old_model(**inputs).logits
    before = digest(tmp_path)
    _, _, new = model_with(seed=2)
    crash_after(monkeypatch, *FAULTS[fault])
    with pytest.raises(Crash):
        new.save(tmp_path, overwrite=True)  # another delta: replacing it needs overwrite (even with the same name)
    monkeypatch.undo()
    leftovers = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert not leftovers, "temporary files are cleaned up"
    if fault != "between renaming the two files":
        assert digest(tmp_path) == before, "the old files are untouched"
    # whatever happened, a load gives exactly the old delta, never a mix
    assert torch.equal(output_after_load(tmp_path, inputs), old_out)
    new.save(tmp_path, overwrite=True)  # the next save succeeds and replaces it completely
    assert sorted(os.listdir(tmp_path)) == ["delta.json", "delta.safetensors"]
    with torch.no_grad():
        assert torch.equal(output_after_load(tmp_path, inputs), new.model(**inputs).logits)


@pytest.mark.parametrize("fault", list(FAULTS)[:3])
def test_a_crash_while_saving_into_an_empty_directory_leaves_nothing(fault, tmp_path, monkeypatch):
    _, inputs, delta = model_with(seed=1)
    crash_after(monkeypatch, *FAULTS[fault])
    with pytest.raises(Crash):
        delta.save(tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") in ([], ["delta.safetensors"])
    with pytest.raises(hd.DeltaFileError):
        hd.load(build("llama")[0], tmp_path / "out")


@pytest.mark.parametrize("fault", ["writing the description, after the tensors", "between renaming the two files"])
def test_a_crash_while_saving_a_peft_adapter_keeps_the_old_one(fault, tmp_path, monkeypatch):
    _, _, old = model_with(seed=1)
    old.save_peft(tmp_path, overwrite=True)
    before = digest(tmp_path)
    _, _, new = model_with(seed=2)
    obj, name, n = FAULTS[fault]
    crash_after(monkeypatch, obj, name, n)
    with pytest.raises(Crash):
        new.save_peft(tmp_path, overwrite=True)
    monkeypatch.undo()
    now = digest(tmp_path)
    if fault == "between renaming the two files":  # new weights in place, old config: same shapes
        assert now[".adapter_model.safetensors.prev"] == before["adapter_model.safetensors"]
    else:
        assert now == before
