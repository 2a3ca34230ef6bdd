"""What the test files share: snapshots of a model, bit-exact comparisons, a forward pass to
compare, a delta with real values, a saved delta. The benchmarks use `perturb` too."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from internals import child_names, hook_state
from tiny_models import build, main_output

import hookdelta as hd


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (a meta tensor has no bits: the same meta shape and dtype; a tensor subclass
    such as torchao's quantized weights: the same inner tensors, bit for bit)."""
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta and a.dtype == b.dtype and a.shape == b.shape
    if hasattr(a, "__tensor_flatten__") or hasattr(b, "__tensor_flatten__"):
        if type(a) is not type(b):
            return False
        names, _ = a.__tensor_flatten__()
        return all(same_bits(getattr(a, n), getattr(b, n)) for n in names)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def snapshot(model: nn.Module) -> dict:
    """Everything invariants 1 and 2 promise to keep: tensors, flags, hooks, modules, keys."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "ptrs": {n: p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "flags": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "hooks": {n: hook_state(m) for n, m in model.named_modules()},
        "keys": list(model.state_dict().keys()),
        "children": {n: child_names(m) for n, m in model.named_modules()},
    }


def assert_restored(model: nn.Module, snap: dict) -> None:
    """Invariant 2: everything as in the snapshot, and no delta left."""
    assert_same(model, snap)
    assert hd.deltas(model) == {}


def assert_same(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["modules"] == snap["modules"], "module tree changed"
    assert now["children"] == snap["children"], "a child was added or removed"
    assert now["keys"] == snap["keys"], "state-dict keys changed"
    assert now["hooks"] == snap["hooks"], "a hook was left behind"
    assert now["flags"] == snap["flags"], "requires_grad flags changed"
    assert now["ptrs"] == snap["ptrs"], "a parameter was replaced"
    for n, p in snap["params"].items():
        assert same_bits(now["params"][n], p), f"parameter {n} is not bit-identical"
    for n, b in snap["buffers"].items():
        assert same_bits(now["buffers"][n], b), f"buffer {n} is not bit-identical"


def bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model with its deltas detached: the reference a test edits by hand."""
    clone = copy.deepcopy(model)
    for delta in list(hd.deltas(clone).values())[::-1]:
        delta.detach()
    return clone


def perturb(delta: hd.Delta, std: float = 0.05, seed: int = 7) -> None:
    """Give a fresh (zero-effect) delta random values so comparisons are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) * std)


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's main output tensor (logits or the first tensor) for `inputs`, without grad."""
    with torch.no_grad():
        return main_output(model(**inputs))


class Saved(NamedTuple):
    path: Path  # the delta's directory
    inputs: dict
    outputs: torch.Tensor  # the adapted model's outputs on `inputs`, before saving
    model: nn.Module


def save_lora(
    directory: Path, *, std: float = 0.05, base: bool = False, name: str | None = None, **config: Any
) -> Saved:
    """A LoRA on the tiny Llama (q_proj, v_proj unless `targets` says otherwise) given real values
    and saved to directory/"delta"; with `base`, the Llama itself is saved to directory/"base"."""
    model, inputs, targets = build("llama")
    if base:
        model.save_pretrained(directory / "base")
    delta = hd.attach(model, hd.LoRAConfig(**{"r": 4, "targets": targets, **config}), name=name)
    perturb(delta, std=std)
    adapted = outputs(model, inputs)
    delta.save(directory / "delta")
    return Saved(directory / "delta", inputs, adapted, model)


def run_workers(script: str, *args: str, processes: int = 2, timeout: int = 300) -> dict:
    """Run tests/<script> under torch.distributed.run (gloo, CPU) with the verdict file as its
    first argument, and return the verdict rank 0 wrote there (JSON)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "verdict.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        for _ in range(2):
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={processes}",
                    str(Path(__file__).parent / script),
                    str(result),
                    *args,
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
            )
            # one retry for gloo's rare abort while processes connect or part on this shared machine
            # ("terminate called without an active exception", nothing written): a real failure fails twice
            if run.returncode == 0 or "terminate called without an active exception" not in run.stderr:
                break
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(result.read_text())


def report(verdict: dict, out: str) -> None:
    """A worker's end: rank 0 writes the verdict for run_workers; every rank waits for the others
    before gloo is torn down (a rank leaving early aborted the other now and then)."""
    import json

    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(verdict))
    dist.barrier()
    dist.destroy_process_group()
    from internals import leave  # (os._exit: the one place for names with an underscore)

    leave()
