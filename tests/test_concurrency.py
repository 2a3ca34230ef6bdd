"""Threads and training-time hazards.

Policy (docs/guides/errors.md, "Threads"): forward passes from several threads at once are fine and give the
single-threaded outputs; a delta change (attach / detach / enable / disable / merge / unmerge /
set_active) while another thread is inside a forward of the model is refused with
DeltaStateError, and a forward that starts during a change waits for it to finish. Under
gradient checkpointing, a change between a forward and its backward is refused too.
"""

import threading

import pytest
import torch
import torch.nn as nn
from helpers import assert_restored, assert_same, perturb, run_workers, snapshot
from tiny_models import build

import hookdelta as hd


def _outputs_in_threads(model, inputs, threads=4, calls=5):
    results, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                results[i] = [model(**inputs[i]).logits for _ in range(calls)]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize(
    "configs",
    [
        [hd.LoRAConfig(r=4, targets="all-linear"), hd.AdapterConfig(bottleneck_dim=4)],
        # LN tuning swaps the norm weights for each call: the threads must take turns there
        [hd.LNTuningConfig(), hd.LoRAConfig(r=2, target_parameters=["mlp.gate_proj.weight"])],
    ],
    ids=["hooks", "weight-swaps"],
)
def test_threads_get_the_single_threaded_outputs(configs):
    model, _, _ = build("llama")
    for i, cfg in enumerate(configs):
        perturb(hd.attach(model, cfg), std=0.3, seed=i)
    inputs = [
        {"input_ids": torch.randint(3, 96, (2, 6 + i), generator=torch.Generator().manual_seed(i))} for i in range(4)
    ]
    with torch.no_grad():
        expected = [model(**x).logits for x in inputs]
    for i, outs in _outputs_in_threads(model, inputs).items():
        for out in outs:
            torch.testing.assert_close(out, expected[i], rtol=0, atol=0)


class Gate(nn.Module):
    """A layer whose forward waits until the test opens it, so a forward can be held mid-way."""

    def __init__(self):
        super().__init__()
        self.inside, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.inside.set()
        assert self.release.wait(10)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.gate, self.b = nn.Linear(4, 4), Gate(), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


@pytest.mark.parametrize("change", ["disable", "merge", "detach", "attach", "set_active"])
def test_a_change_during_another_threads_forward_is_refused(change):
    model, x = Net(), torch.randn(3, 4)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["a", "b"]), name="d")
    perturb(delta)
    model.gate.release.set()
    with torch.no_grad():
        expected = model(x)
    model.gate.release.clear()
    model.gate.inside.clear()
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=model(x).detach()))
    worker.start()
    assert model.gate.inside.wait(10)
    snap = snapshot(model)
    calls = {
        "disable": delta.disable,
        "merge": delta.merge,
        "detach": delta.detach,
        "attach": lambda: hd.attach(model, hd.BitFitConfig(targets=["a"])),
        "set_active": lambda: hd.set_active(model),
    }
    try:
        with pytest.raises(hd.DeltaStateError, match="another thread runs a forward"):
            calls[change]()
        assert_same(model, snap)
    finally:
        model.gate.release.set()
        worker.join()
    torch.testing.assert_close(result["out"], expected, rtol=0, atol=0)
    model.gate.release.set()
    calls[change]()  # between forwards the same call works


def test_a_forward_waits_for_a_change_in_progress():
    model, x = Net(), torch.randn(3, 4)
    model.gate.release.set()
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["a"]))
    perturb(delta)
    store = model._hookdelta
    done = threading.Event()
    with store.guard.changing("disable"):  # a change holds the guard...
        worker = threading.Thread(target=lambda: (model(x), done.set()))
        worker.start()
        assert not done.wait(0.3), "...so a forward that starts meanwhile waits"
        delta.pieces["a"].set_live(False)
        store.sites["a"].refresh()
    worker.join(10)
    assert done.is_set()


def _checkpointed(reentrant):
    """A tiny Llama with a perturbed LoRA, training under gradient checkpointing."""
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.3)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model, inputs, delta


def test_a_change_between_a_checkpointed_forward_and_its_backward_is_refused():
    model, inputs, delta = _checkpointed(reentrant=False)
    out = model(**inputs).logits
    for change in (delta.merge, delta.detach):
        with pytest.raises(hd.DeltaStateError, match="between a forward and its backward"):
            change()
    with delta.disabled(), torch.no_grad():  # a switch undone before backward (a reference model's forward)
        model(**inputs)
    hd.set_active(model)
    hd.set_active(model, delta.name)
    out.pow(2).mean().backward()  # the recompute runs with the deltas the forward saw
    grads = {n: p.grad.clone() for n, p in delta.named_parameters()}
    model.gradient_checkpointing_disable()
    for p in delta.parameters():
        p.grad = None
    model(**inputs).logits.pow(2).mean().backward()
    for n, p in delta.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    delta.disable()  # after the backward a change is fine
    out = model(**inputs).logits
    del out  # ... and so it is when the outputs are dropped without a backward
    delta.enable()


def test_a_switch_not_undone_before_the_backward_of_a_checkpointed_forward_is_refused_there():
    model, inputs, delta = _checkpointed(reentrant=False)
    out = model(**inputs).logits
    delta.disable()  # allowed now: it may still be undone before backward
    with pytest.raises(hd.DeltaStateError, match="changed between a forward under gradient checkpointing and its"):
        out.pow(2).mean().backward()
    assert all(p.grad is None for p in delta.parameters())  # no gradient from the wrong recompute


def test_a_reference_forward_under_disabled_between_forward_and_backward_gives_the_plain_gradients():
    """DPO's reference model without a copy: the policy's checkpointed forward, then the same
    model under `delta.disabled()`, then the backward: the gradients of the policy alone."""
    model, inputs, delta = _checkpointed(reentrant=True)
    policy = model(**inputs).logits
    with delta.disabled(), torch.no_grad():
        reference = model(**inputs).logits
    (policy - reference).pow(2).mean().backward()
    got = {n: p.grad.clone() for n, p in delta.named_parameters()}
    model.gradient_checkpointing_disable()
    delta.zero_grad()
    with delta.disabled(), torch.no_grad():
        reference_plain = model(**inputs).logits
    torch.testing.assert_close(reference, reference_plain, rtol=0, atol=0)
    (model(**inputs).logits - reference_plain).pow(2).mean().backward()
    for n, p in delta.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7)


def test_without_checkpointing_a_forward_does_not_block_changes():
    model, inputs, _ = build("llama")
    snap = snapshot(model)
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj"]))
    model.train()
    out = model(**inputs).logits
    delta.disable()
    delta.detach()
    assert out.requires_grad
    assert_restored(model.eval(), {**snap})


@pytest.mark.slow
def test_ddp_with_a_delta_disabled_on_some_steps(tmp_path):
    """Plain DDP fails with its own error that names find_unused_parameters=True; with it set,
    two deltas (one disabled on odd steps) train identically on both ranks."""
    verdict = run_workers("ddp_worker.py", "ddp_toggle", timeout=180)
    assert "find_unused_parameters=True" in verdict["plain_error"]
    assert verdict["identical"]
    losses = verdict["losses"]
    assert losses[4] < losses[2] < losses[0]  # the steps with both deltas on keep improving
