"""Hostile and broken inputs: each gets exactly one clear exception of the documented type, the
model stays bit-identical (tensors, flags, hooks, keys) and the files on disk are not touched.
The "When something is wrong" guide's table (docs/guides/errors.md) lists the same cases."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil

import pytest
import torch
from helpers import assert_restored, assert_same, perturb, save_lora, snapshot
from safetensors.torch import load_file, save_file
from tiny_models import build, llama

import hookdelta as hd

# -- every config field, out of range or of the wrong type -----------------------------------

BAD_BY_TYPE = {
    "int": [0, -1, 2.5, "8", True, None, math.nan],
    "int | None": [0, -3, 1.5, "4", True],
    "float": [-1.0, math.nan, math.inf, "x", None, True],
    "str": ["nope", 3, None],
    "str | None": [3, 2.5],
    "bool": ["yes", 1, None, 0],
    "Selector | None": [3, [3], "", [], 2.5],
    "dict[str, int] | None": ["x", {"(": 2}, {"q": 0}, {"q": "2"}, {"q": 1.5}],
    "dict[str, float] | None": ["x", {"(": 2.0}, {"q": -1.0}, {"q": math.nan}],
    "Sequence[str] | None": ["q", ["x"], [], ["q", "q"], 3],
    "Any": [None, 3, "x", [], ["a"], {"a": 1.0}, ["a", "a"]],  # composition blocks' sources
    "Sequence[int]": [[], [-1], [1, 1], "12", [1.5], [True], 3],
    "Sequence[int] | None": [[], [-1], "12", [1.5], [True], 3],
    "Positions": ["x1", "f0", "l", "f1+", 3, None, ["l1"]],
}
# fields whose valid range differs from their type's: their own bad values
BAD_FIELD = {
    "decompose_factor": [0, -2, 2.5, "8", True, None],
    "projection_prng_key": [-1, 2.5, "8", True, None],
    "random_loc_seed": [-1, 2.5, "8", True, None],
    "n_frequency_pattern": [{"q": 0}, {"(": 3}, [3], {"q": 2.5}],
    "d_initial": [math.nan, math.inf, "x", None, True],
    "oft_block_size": [-1, 2.5, "8", True, None],
    "hybrid_r": [-1, 2.5, "8", True, None],
    "tinit": [-1, 2.5, "8", True, None],
    "random_seed": [-1, 2.5, "8", True],
    "tfinal": [-1, 2.5, "8", True, None],
    "boft_block_num": [-1, 2.5, "8", True, None],
}
# (OFT's r may be 0: it is the other way to give the block size)
BAD_FIELD["r@oft"] = [-1, 2.5, "8", True, None]
BAD_BASE = {
    "targets": [3, [3], "", [], 2.5],
    "exclude": [3, [3]],
    "also_train": [3, [3]],
    "layers": ["0", [-1], [1.5], [], [True]],
}
CONFIGS = hd.DeltaConfig.registered()
FIELD_CASES = [
    (method, f.name, value)
    for method, cls in sorted(CONFIGS.items())
    for f in dataclasses.fields(cls)
    for value in BAD_BASE.get(f.name)
    or BAD_FIELD.get(f"{f.name}@{method}")
    or BAD_FIELD.get(f.name)
    or BAD_BY_TYPE[f.type] + ([1.5] if f.name == "dropout" else [])
]


@pytest.mark.parametrize("method,field,value", FIELD_CASES, ids=[f"{m}.{f}={v!r}" for m, f, v in FIELD_CASES])
def test_every_bad_config_field_is_refused_by_name(method, field, value):
    with pytest.raises(hd.ConfigError, match=field.split("_")[0]):
        CONFIGS[method](**{field: value})


def test_the_field_table_covers_every_method():
    assert {m for m, _, _ in FIELD_CASES} == set(CONFIGS) and len(FIELD_CASES) > 250


# -- broken delta files ------------------------------------------------------------------------


def digest(directory) -> dict[str, str]:
    """Every file under `directory` with the hash of its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking LoRA delta on the tiny Llama, saved once."""
    return save_lora(tmp_path_factory.mktemp("saved"), r=2).path


def _edit_json(path, change):
    meta = json.loads((path / "delta.json").read_text())
    change(meta)
    (path / "delta.json").write_text(json.dumps(meta))


def _edit_tensors(path, change):
    tensors = load_file(str(path / "delta.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "delta.safetensors"))


def _other_arch(path):
    model = build("gpt2")[0]
    hd.attach(model, hd.LoRAConfig(r=2, targets=["c_attn"])).save(path, overwrite=True)


def _other_size(path):
    model = llama(hidden=48)[0]  # (the tiny Llama, wider)
    hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj", "v_proj"])).save(path, overwrite=True)


class Payload:
    ran = False

    def __reduce__(self):  # unpickling this would run code
        return (exec, ("import hookdelta; hookdelta._pwned = True",))


def _pickle_as_safetensors(path):
    with open(path / "delta.safetensors", "wb") as f:
        pickle.dump({"x": Payload()}, f)


BROKEN_FILES = {
    # case: (how to break the saved directory, what the error says)
    "unknown JSON key": (lambda p: _edit_json(p, lambda m: m.update(extra_field=1)), "does not know"),
    "unknown config key": (lambda p: _edit_json(p, lambda m: m["config"].update(rank=4)), "no field"),
    "newer format version": (lambda p: _edit_json(p, lambda m: m.update(format_version=2)), "format version 2"),
    "JSON not an object": (lambda p: (p / "delta.json").write_text("[1, 2]"), "not a hookdelta"),
    "JSON truncated": (lambda p: (p / "delta.json").write_text('{"format": "hook'), "not valid JSON"),
    "another architecture": (_other_arch, "saved for a GPT2LMHeadModel"),
    "another size": (_other_size, "shapes differ"),
    "safetensors truncated": (
        lambda p: (p / "delta.safetensors").write_bytes((p / "delta.safetensors").read_bytes()[:200]),
        "corrupt or truncated",
    ),
    "wrong dtype": (lambda p: _edit_tensors(p, lambda t: t.update({k: v.double() for k, v in t.items()})), "float64"),
    "integer tensor": (lambda p: _edit_tensors(p, lambda t: t.update({k: v.long() for k, v in t.items()})), "int64"),
    "extra tensor": (lambda p: _edit_tensors(p, lambda t: t.update(surprise=torch.zeros(2))), "extra \\['surprise'\\]"),
    "missing tensor": (lambda p: _edit_tensors(p, lambda t: t.pop(sorted(t)[0])), "missing"),
    "NaN values": (lambda p: _edit_tensors(p, lambda t: t[sorted(t)[0]].fill_(math.nan)), "holds NaN or Inf"),
    "Inf values": (lambda p: _edit_tensors(p, lambda t: t[sorted(t)[-1]].fill_(math.inf)), "holds NaN or Inf"),
    "pickle disguised as safetensors": (_pickle_as_safetensors, "corrupt or truncated"),
    "directory that is not a delta": (
        lambda p: [f.unlink() for f in p.iterdir()] and (p / "notes.txt").write_text("hi"),
        "delta.json is missing",
    ),
    "tensor file missing": (lambda p: (p / "delta.safetensors").unlink(), "missing"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_a_broken_delta_file_is_refused_and_nothing_changes(saved, case, tmp_path):
    path = tmp_path / "delta"
    shutil.copytree(saved, path)
    breaker, message = BROKEN_FILES[case]
    breaker(path)
    files = digest(path)
    model = build("llama")[0]
    snap = snapshot(model)
    with pytest.raises(hd.DeltaFileError, match=message):
        hd.load(model, path)
    assert_restored(model, snap)
    assert digest(path) == files, "loading must not touch the files"
    assert not getattr(hd, "_pwned", False), "a pickle was executed"


def test_a_path_that_is_a_file_is_refused(saved, tmp_path):
    file = tmp_path / "delta.json"
    shutil.copy(saved / "delta.json", file)
    model = build("llama")[0]
    snap = snapshot(model)
    with pytest.raises(hd.DeltaFileError, match="not a directory"):
        hd.load(model, file)
    assert_restored(model, snap)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]))
    before = digest(tmp_path)
    with pytest.raises(hd.DeltaFileError, match="not a directory"):
        delta.save(file)
    assert digest(tmp_path) == before


def test_saving_over_another_delta_needs_overwrite(saved, tmp_path):
    path = tmp_path / "delta"
    shutil.copytree(saved, path)
    files = digest(path)
    model = build("llama")[0]
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name="other")
    with pytest.raises(hd.DeltaFileError, match="already holds another delta"):
        delta.save(path)
    assert digest(path) == files


# -- misuse of the API ---------------------------------------------------------------------------


def _same_name(model):
    hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name="x")
    return lambda: hd.attach(model, hd.LoRAConfig(r=2, targets=["v_proj"]), name="x")


def _detached(action):
    def setup(model):
        delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]))
        delta.detach()
        return lambda: action(delta)

    return setup


def _nan_merge(model):
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]))
    perturb(delta)
    with torch.no_grad():
        delta.pieces["model-layers-0-self_attn-q_proj"].lora_B[0, 0] = math.nan
    return delta.merge


def _compiled(model):
    compiled = torch.compile(model, backend="eager")
    return lambda: hd.attach(compiled, hd.LoRAConfig(r=2, targets=["q_proj"]))


def _set_active_odd(model):
    hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name="a")
    return lambda: hd.set_active(model, ["a"], None)


MISUSE = {
    # case: (setup returning the bad call, error type, what the message says)
    "two deltas with the same name": (_same_name, hd.DeltaStateError, "already has a delta named 'x'"),
    "detaching twice": (_detached(lambda d: d.detach()), hd.DeltaStateError, "is detached"),
    "merging a detached delta": (_detached(lambda d: d.merge()), hd.DeltaStateError, "is detached"),
    "enabling a detached delta": (_detached(lambda d: d.enable()), hd.DeltaStateError, "is detached"),
    "saving a detached delta": (_detached(lambda d: d.save("never-written")), hd.DeltaStateError, "is detached"),
    "merging NaN": (_nan_merge, hd.MergeError, r"model.layers.0.self_attn.q_proj.lora_B'\] hold NaN"),
    "attaching to the torch.compile wrapper": (_compiled, hd.UnsupportedModuleError, "torch.compile"),
    "a selector that matches nothing": (
        lambda m: lambda: hd.attach(m, hd.LoRAConfig(targets=["qq_proj"])),
        hd.SelectorError,
        "q_proj",
    ),
    "a module the method cannot adapt": (
        lambda m: lambda: hd.attach(m, hd.LoRAConfig(targets=["input_layernorm"])),
        hd.UnsupportedModuleError,
        "LlamaRMSNorm",
    ),
    "IA3 on an embedding": (
        lambda m: lambda: hd.attach(m, hd.IA3Config(targets=["embed_tokens"])),
        hd.UnsupportedModuleError,
        "Embedding",
    ),
    "a config that is not a config": (lambda m: lambda: hd.attach(m, {"r": 8}), hd.ConfigError, "delta config"),
    "a model that is not a module": (
        lambda m: lambda: hd.attach("llama", hd.LoRAConfig()),
        hd.UnsupportedModuleError,
        "nn.Module",
    ),
    "set_active with a name that is no string": (_set_active_odd, hd.DeltaStateError, "delta names"),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_raises_one_clear_error_and_changes_nothing(case):
    setup, error, message = MISUSE[case]
    model = build("llama")[0]
    call = setup(model)
    snap = snapshot(model)  # after the setup: the bad call itself must change nothing
    names = {n: (d.enabled, d.merged) for n, d in hd.deltas(model).items()}
    with pytest.raises(error, match=message):
        call()
    assert_same(model, snap)
    assert {n: (d.enabled, d.merged) for n, d in hd.deltas(model).items()} == names
    assert not os.path.exists("never-written")


def test_set_active_takes_peft_s_one_list_of_names():
    model, inputs, _ = build("llama")
    for name in ("a", "b", "c"):
        perturb(hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name=name), seed=len(name) + ord(name))
    hd.set_active(model, "a", "c")
    with torch.no_grad():
        want = model(**inputs).logits
    hd.set_active(model, "b")
    hd.set_active(model, ["a", "c"])  # PEFT's set_adapter(["a", "c"]): a raw TypeError before
    assert [n for n, d in hd.deltas(model).items() if d.enabled] == ["a", "c"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=0, atol=0)
