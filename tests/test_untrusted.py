"""Untrusted files (issue 30): every loader checks a file against itself and the model before it
allocates or trusts anything. Peak memory is measured in a fresh process (ru_maxrss), not guessed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_restored, outputs, perturb, snapshot
from tiny_models import build

import hookdelta as hd
from hookdelta.untrusted import risky_pattern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved_lora(tmp_path, peft: bool = False):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(delta, std=0.2)
    want = outputs(model, inputs)
    path = tmp_path / ("peft" if peft else "delta")
    delta.save_peft(path) if peft else delta.save(path)
    delta.detach()
    return path, want


def edit_json(path, name, change):
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


LOAD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    import hookdelta as hd
    from tiny_models import build
    model, _, _ = build("llama")
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))  # (not the machine)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        {call}
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc), isinstance(exc, hd.HookdeltaError)]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({{"error": error, "grown_mb": grown / 1024, "seconds": time.perf_counter() - start}}))
""")


def load_in_fresh_process(call: str) -> dict:
    code = LOAD.format(tests=os.path.join(ROOT, "tests"), call=call)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_edited_rank_in_delta_json_is_refused_before_anything_is_built(tmp_path):
    path, _ = saved_lora(tmp_path)
    edit_json(path, "delta.json", lambda d: d["config"].update(r=2_000_000))
    got = load_in_fresh_process(f"hd.load(model, {str(path)!r})")
    name, message, ours = got["error"]
    assert name == "DeltaFileError" and ours
    assert "r=2000000" in message and "[2000000, 32]" in message and "[4, 32]" in message
    # before: 3.5 GB and 8 s to build the whole delta, then the shape check refused it
    assert got["grown_mb"] < 50 and got["seconds"] < 2, got


def test_the_same_load_of_the_unedited_file_costs_what_its_tensors_do(tmp_path):
    path, _ = saved_lora(tmp_path)
    got = load_in_fresh_process(f"hd.load(model, {str(path)!r})")
    assert got["error"] is None and got["grown_mb"] < 50, got


def test_a_peft_config_whose_r_contradicts_its_tensors_is_refused(tmp_path):
    path, want = saved_lora(tmp_path, peft=True)
    model, inputs, _ = build("llama")
    snap = snapshot(model)
    for r in (8, 2_000_000):
        edit_json(path, "adapter_config.json", lambda d, r=r: d.update(r=r))
        with pytest.raises(hd.DeltaFileError, match=rf"r={r} for .*rank 4"):
            hd.load_peft(model, path)
        assert_restored(model, snap)
    peft = pytest.importorskip("peft")  # the reference refuses it too (a size mismatch)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(build("llama")[0], str(path))
    # saying so explicitly (rank_pattern) is what PEFT reads too: the file loads, at alpha / 4
    edit_json(
        path,
        "adapter_config.json",
        lambda d: d.update(
            r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "v_proj": 4}, alpha_pattern={"q_proj": 8, "v_proj": 8}
        ),
    )
    hd.load_peft(model, path)
    assert torch.allclose(outputs(model, inputs), want, atol=1e-6)


def test_max_bytes_refuses_a_delta_larger_than_the_caller_allows(tmp_path):
    path, _ = saved_lora(tmp_path)
    model, _, _ = build("llama")
    snap = snapshot(model)
    size = 2 * 4 * ((32 + 32) + (32 + 16)) * 4  # layers x r x (q: in + out, v: in + out) x 4 bytes
    with pytest.raises(hd.DeltaFileError, match=f"{size:,} bytes, more than max_bytes=1,000"):
        hd.load(model, path, max_bytes=1000)
    assert_restored(model, snap)
    hd.load(model, path, max_bytes=size)


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("delta.json", lambda p: (p / "delta.json").write_text(" " * (17 * 2**20) + "{}"), "a few KB"),
        ("delta.json", lambda p: (p / "delta.json").write_text("[" * 100_000 + "]" * 100_000), "nests deeper"),
        (
            "delta.json",
            lambda p: edit_json(p, "delta.json", lambda d: d["config"].update(targets=["re:(q+)+_proj$"])),
            "exponential",
        ),
        ("delta.json", lambda p: edit_json(p, "delta.json", lambda d: d.update(sites=d["sites"] * 1000)), "sites"),
    ],
)
def test_a_crafted_delta_json_is_refused_quickly(tmp_path, name, change, match):
    path, _ = saved_lora(tmp_path)
    change(path)
    model, _, _ = build("llama")
    snap = snapshot(model)
    with pytest.raises(hd.DeltaFileError, match=match):
        hd.load(model, path)
    assert_restored(model, snap)


def test_a_crafted_pattern_in_a_peft_config_is_refused(tmp_path):
    path, _ = saved_lora(tmp_path, peft=True)
    edit_json(path, "adapter_config.json", lambda d: d.update(rank_pattern={"(a|aa)*b": 4}))
    with pytest.raises(hd.DeltaFileError, match="exponential"):
        hd.load_peft(build("llama")[0], path)


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q|v)_proj",
        r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
        r"(.*\.)?q_proj",
        r"layers\.[0-9]+\.mlp\..*",
        r"re:.*(q_proj|v_proj)$",
        r"^(?!.*lm_head).*proj$",
        r"[(a+)+]",
        r"\(a+\)+",
        "q_proj",
        r"a{2,3}b",
    ],
)
def test_ordinary_patterns_are_read(pattern):
    assert risky_pattern(pattern) is None


@pytest.mark.parametrize(
    "pattern", [r"(a+)+$", r"(a|aa)*b", r"(.*)*x", r"((ab)*)+", r"(\w+\s?)*$", r"(x+x+)+y", r"(a{1,})+", "a" * 5000]
)
def test_patterns_that_can_backtrack_exponentially_are_refused(pattern):
    import re
    import time

    assert risky_pattern(pattern)
    if len(pattern) < 100:  # (they are: what the check protects from, measured on a short name)
        start = time.perf_counter()
        re.fullmatch(pattern, "a" * 18 + "!")
        assert time.perf_counter() - start < 5  # (a sanity bound only; some are slow, some are not on this string)


# -- the meta build is the real build's twin ---------------------------------------------------------

from test_methods import CASES, METHODS  # noqa: E402


@pytest.mark.parametrize("method,arch", CASES)
def test_the_meta_plan_has_the_real_deltas_shapes_and_bytes(method, arch):
    """untrusted.Plan builds the delta on a meta copy of the model: the tensors it foresees must be
    the ones the real build makes (names, shapes, bytes), or the checks before a load would be wrong."""
    from hookdelta.untrusted import Plan

    model, _, _ = build(arch)
    cfg = METHODS[method][0]()
    before = sum(t.numel() for t in model.parameters())
    delta = hd.attach(model, cfg)
    plan = Plan(model, cfg, list(delta.sites), list(delta.also_train))
    real = {k: tuple(t.shape) for k, t in delta.tensors().items()}
    assert plan.saved == real
    pieces = [p for p in delta.pieces.values()]
    tensors = {id(t): t for p in pieces for t in list(p.parameters()) + list(p.buffers())}
    tensors |= {id(t): t for p in pieces for t in p.state_dict(keep_vars=True).values()}
    assert plan.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    delta.detach()
    assert sum(t.numel() for t in model.parameters()) == before


def test_a_hot_swap_from_a_file_whose_rank_was_edited_is_refused(tmp_path):
    """hd.load(into=) takes r and alpha from the file: an r that is not its tensors' would set
    every scale wrong without a single shape error (alpha / 2,000,000 instead of alpha / 4)."""
    path, _ = saved_lora(tmp_path)
    model, inputs, _ = build("llama")
    live = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(live, std=0.1, seed=3)
    before = outputs(model, inputs)
    edit_json(path, "delta.json", lambda d: d["config"].update(r=2_000_000))
    with pytest.raises(hd.DeltaFileError, match="r=2000000"):
        hd.load(model, path, into=live.name)
    assert torch.equal(outputs(model, inputs), before)  # nothing was swapped


def test_a_build_that_fails_in_a_foreign_way_is_one_delta_file_error(tmp_path, monkeypatch):
    """The plan builds the described delta before anything else: whatever a method's build raises
    on a layer it was not written for reaches the caller as a DeltaFileError, the model untouched."""
    path, _ = saved_lora(tmp_path)
    model, _, _ = build("llama")
    snap = snapshot(model)

    def broken(self, model, sites):
        raise RuntimeError("boom")

    monkeypatch.setattr(hd.LoRAConfig, "build", broken)
    with pytest.raises(hd.DeltaFileError, match="cannot be built on this model: RuntimeError: boom"):
        hd.load(model, path)
    assert_restored(model, snap)
