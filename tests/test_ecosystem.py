"""hookdelta under the training stack: DDP (torchrun, 2 CPU processes), Accelerate,
gradient checkpointing, bf16 autocast and torch.compile, each against the plain reference."""

import pytest
import torch
import torch.nn as nn
import transformers as tf
from helpers import assert_restored, perturb, run_workers, snapshot
from tiny_models import build

import hookdelta as hd


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_the_delta_identically(mode, tmp_path):
    """DDP, and FSDP2 (fully_shard, which shards the delta's tensors too), on 2 CPU processes."""
    verdict = run_workers("ddp_worker.py", mode, timeout=180)
    assert verdict["identical"], "delta parameters differ across ranks"
    assert abs(verdict["first"] - verdict["unwrapped"]) < 1e-5, "the wrapped model computes what the plain one does"
    assert verdict["last"] < verdict["first"]


def test_accelerate_prepare_trains_the_delta():
    accelerate = pytest.importorskip("accelerate")
    model, inputs, _ = build("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    acc = accelerate.Accelerator(cpu=True)
    prepared, opt = acc.prepare(model, torch.optim.AdamW(delta.parameters(), lr=1e-2))
    before = {n: p.detach().clone() for n, p in delta.named_parameters()}
    for _ in range(3):
        loss = prepared(**inputs, labels=inputs["input_ids"]).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in delta.named_parameters())
    now = acc.unwrap_model(prepared).state_dict()
    assert set(now) == set(base) and all(torch.equal(now[k], base[k]) for k in base)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_gradient_checkpointing_gives_the_same_gradients(kwargs):
    """Frozen base, inputs that do not require grad: the delta still gets exact gradients."""
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.3)
    model.train()
    model(**inputs).logits.pow(2).mean().backward()
    reference = {n: p.grad.clone() for n, p in delta.named_parameters()}
    for p in delta.parameters():
        p.grad = None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model(**inputs).logits.pow(2).mean().backward()
    for n, p in delta.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "cfg",
    [hd.LoRAConfig(r=4, targets="all-linear"), hd.AdapterConfig(bottleneck_dim=8), hd.IA3Config()],
    ids=["lora", "adapter", "ia3"],
)
def test_bf16_autocast_on_cpu(cfg):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, cfg)
    perturb(delta, std=0.3)
    with torch.no_grad():
        full = model(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**inputs).logits
        loss = logits.float().pow(2).mean()
    loss.backward()
    torch.testing.assert_close(logits.float(), full, rtol=0.05, atol=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in delta.parameters())


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_is_never_stale(backend):
    """Compile, then attach / disable / merge / unmerge / detach: the compiled model always
    equals the eager one (hooks changed after compiling are not silently ignored)."""
    model, x = MLP(), torch.randn(3, 8)
    snap = snapshot(model)
    compiled = torch.compile(model, backend=backend)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)

    check()
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["a", "b"]))
    perturb(delta, std=0.5)
    check()
    delta.disable()
    check()
    delta.enable()
    check()
    delta.merge()
    check()
    delta.unmerge()
    check()
    second = hd.attach(model, hd.AdapterConfig(targets="a", bottleneck_dim=2))
    perturb(second, std=0.5)
    check()
    second.detach()
    delta.detach()
    check()
    assert_restored(model, snap)


def test_reentrant_checkpointing_over_a_frozen_base_trains_the_delta_and_detach_leaves_no_hook():
    """Reentrant checkpointing passes gradients only to blocks whose input requires grad; over a
    frozen base hookdelta makes the input embeddings' output require it (transformers 5 does the
    same on its own, switched off here so that only hookdelta's hook is tested)."""
    model, inputs, _ = build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if int(tf.__version__.split(".")[0]) >= 5:
        model.disable_input_require_grads()
    model.train()
    snap = snapshot(model)
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.3)
    model(**inputs).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    delta.detach()
    assert_restored(model, snap)
