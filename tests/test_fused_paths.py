"""The fast LoRA path (issue 15): the add folded into the B GEMM, in place when nothing else can
hold the layer's output, out of place otherwise. Checked against the formula computed by hand in
float64, forward and gradients, and the cases where the in-place form must step aside (another
hook holds the output) are checked to step aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import perturb
from internals import compile_config_for_cpu, compile_stats, explain, reset_compile_stats
from tiny_models import Holder, build, layer_cases

import hookdelta as hd


def _lora_by_hand(layer, piece, x):
    """W·x + b + s·B·A·x in float64 (Conv1D stores W as [in, out])."""
    w = layer.weight.double()
    w = w.T if type(layer).__name__ == "Conv1D" else w
    bias = layer.bias.double() if layer.bias is not None else 0
    xd = x.double()
    return xd @ w.T + bias + float(piece.scale) * (xd @ piece.lora_A.double().T) @ piece.lora_B.double().T


@pytest.mark.parametrize("name", ["linear", "linear-nobias", "conv1d-transformers"])
@pytest.mark.parametrize("where", ["in place", "user hook first", "global hook"])
def test_folded_add_equals_the_formula_forward_and_backward(name, where):
    model, x = next((m, x) for n, m, x in layer_cases() if n == name)
    stored = []
    handles = []
    if where == "user hook first":  # registered before attach: it must keep seeing the layer's own output
        handles.append(model.layer.register_forward_hook(lambda m, a, out: stored.append((out, out.clone()))))
    delta = hd.attach(model, hd.LoRAConfig(r=3, alpha=5.0, targets=["layer"]))
    perturb(delta, std=0.3)
    piece = delta.piece("layer")
    if where == "global hook":
        handles.append(
            nn.modules.module.register_module_forward_hook(
                lambda m, a, out: stored.append((out, out.clone())) if m is model.layer else None
            )
        )
    try:
        with torch.no_grad():
            model(x)  # (the first call after an attach is a watched one: time the second)
        stored.clear()
        x = x.clone().requires_grad_(True)
        out = model(x)
        torch.testing.assert_close(out.double(), _lora_by_hand(model.layer, piece, x), rtol=1e-4, atol=1e-5)
        out.square().sum().backward()
        xd = x.detach().double().requires_grad_(True)
        ref = _lora_by_hand(model.layer, piece, xd)
        a, b = piece.lora_A.detach().double().requires_grad_(True), piece.lora_B.detach().double().requires_grad_(True)
        w = model.layer.weight.double()
        w = w.T if name == "conv1d-transformers" else w
        bias = model.layer.bias.double() if model.layer.bias is not None else 0
        ref = xd @ w.T + bias + float(piece.scale) * (xd @ a.T) @ b.T
        ref.square().sum().backward()
        for got, want in ((x.grad, xd.grad), (piece.lora_A.grad, a.grad), (piece.lora_B.grad, b.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        for seen, copy in stored:  # what other hooks were handed was not changed behind their back
            assert torch.equal(seen, copy)
        if where != "in place":
            assert stored
    finally:
        for h in handles:
            h.remove()


def test_stacked_deltas_and_dropout_equal_the_formula():
    torch.manual_seed(0)
    model = Holder(nn.Linear(6, 5))
    x = torch.randn(3, 4, 6)
    first = hd.attach(model, hd.LoRAConfig(r=2, targets=["layer"]), name="a")
    second = hd.attach(model, hd.LoRAConfig(r=3, alpha=1.5, dropout=0.5, targets=["layer"]), name="b")
    adapter = hd.attach(model, hd.AdapterConfig(bottleneck_dim=2, targets=["layer"]), name="c")
    third = hd.attach(model, hd.LoRAConfig(r=2, targets=["layer"]), name="d")
    for i, d in enumerate((first, second, adapter, third)):
        perturb(d, std=0.3, seed=i)
    model.train()
    torch.manual_seed(5)
    got = model(x)
    torch.manual_seed(5)
    h = F.linear(x, model.layer.weight, model.layer.bias).double()
    for d in (first, second):
        p = d.piece("layer")
        xin = F.dropout(x, p.p, training=True) if p.p else x
        h = h + float(p.scale) * (xin.double() @ p.lora_A.double().T) @ p.lora_B.double().T
    p = adapter.piece("layer")
    h = h + p.scale * F.linear(F.relu(F.linear(h.float(), p.down.weight, p.down.bias)), p.up.weight, p.up.bias).double()
    p = third.piece("layer")
    h = h + float(p.scale) * (x.double() @ p.lora_A.double().T) @ p.lora_B.double().T
    torch.testing.assert_close(got.double(), h, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_and_compile_equal_eager():
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.2)
    with torch.no_grad():
        eager = model(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = model(**inputs).logits
        compiled = torch.compile(model)(**inputs).logits
    torch.testing.assert_close(cast.float(), eager, rtol=0.05, atol=0.05)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # gradients through the compiled model equal eager ones
    model.train()
    compiled_model = torch.compile(model)
    compiled_model(**inputs).logits.square().mean().backward()
    got = [p.grad.clone() for p in delta.parameters()]
    model.zero_grad()
    model(**inputs).logits.square().mean().backward()
    for g, p in zip(got, delta.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    torch.compiler.reset()


def test_compiled_forward_has_no_graph_break_and_skips_the_hook_dict_test(monkeypatch):
    """Under torch.compile the in-place test is skipped: dynamo before torch 2.12 cannot trace a
    test of a module's hook dict and broke the graph at every LoRA site (found on an H200)."""
    from hookdelta.engine import owns_output

    model, inputs, _ = build("llama")
    hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert owns_output(layer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not owns_output(layer)
    monkeypatch.undo()
    torch.compiler.reset()
    with torch.no_grad():
        explained = explain(model, **inputs)
    torch.compiler.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


def _nodes(fn, depth: int = 4) -> set[str]:
    """Names of the autograd nodes within `depth` steps of `fn`."""
    if fn is None or depth == 0:
        return set()
    return {type(fn).__name__}.union(*(_nodes(f, depth - 1) for f, _ in fn.next_functions))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("shape", [(6,), (4, 6), (3, 4, 6), (2, 3, 4, 6)], ids=["1-D", "2-D", "3-D", "4-D"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_every_input_rank_equals_the_formula(shape, grad, bias):
    """Under autograd the add is written into the output itself (addmm_ for 2-D, baddbmm_ for
    3-D, out of place otherwise), not through a view: checked against the formula, forward and
    gradients, for each rank, and no graph has a CopySlices node (whose backward copies the
    output-wide gradient twice). With a bias, nn.Linear's 3-D output is itself a view."""
    torch.manual_seed(0)
    model = Holder(nn.Linear(6, 5, bias=bias))
    delta = hd.attach(model, hd.LoRAConfig(r=2, alpha=3.0, targets=["layer"]))
    perturb(delta, std=0.3)
    piece = delta.piece("layer")
    model(torch.randn(shape))  # (the first call after an attach is a watched one)
    x = torch.randn(shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = model(x)
    torch.testing.assert_close(out.double(), _lora_by_hand(model.layer, piece, x.detach()), rtol=1e-5, atol=1e-6)
    if not grad:
        return
    assert "CopySlices" not in _nodes(out.grad_fn)
    out.square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    a = piece.lora_A.detach().double().requires_grad_(True)
    b = piece.lora_B.detach().double().requires_grad_(True)
    w = model.layer.weight.double()
    (
        xd @ w.T + (model.layer.bias.double() if bias else 0) + float(piece.scale) * (xd @ a.T) @ b.T
    ).square().sum().backward()
    for got, want in ((x.grad, xd.grad), (piece.lora_A.grad, a.grad), (piece.lora_B.grad, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_a_layer_whose_output_is_a_view_gets_the_add_out_of_place():
    """transformers' Conv1D returns a view of its 2-D product: under autograd the add goes out of
    place rather than through the view, and gradients equal the formula."""
    model, x = next((m, x) for n, m, x in layer_cases() if n == "conv1d-transformers")
    delta = hd.attach(model, hd.LoRAConfig(r=3, targets=["layer"]))
    perturb(delta, std=0.3)
    piece = delta.piece("layer")
    model(x)
    x = x.clone().requires_grad_(True)
    out = model(x)
    assert "CopySlices" not in _nodes(out.grad_fn)
    out.square().sum().backward()
    xd = x.detach().double().requires_grad_(True)
    _lora_by_hand(model.layer, piece, xd).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-5)


def test_compiled_decoding_with_a_static_cache_has_no_graph_break_and_equal_tokens():
    """Decoding is launch-bound on a GPU; transformers' own answer is a static cache plus a
    compiled forward (CUDA graphs there). The unmerged LoRA must trace into that graph without a
    break, and the compiled model must generate the eager model's tokens, which the LoRA changes."""
    model, inputs, _ = build("llama")
    bare_tokens = _generate_tokens(model, inputs, compiled=False)
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.5)
    eager = _generate_tokens(model, inputs, compiled=False)
    assert not torch.equal(eager, bare_tokens)
    reset_compile_stats()
    try:
        compiled = _generate_tokens(model, inputs, compiled=True)
        assert torch.equal(compiled, eager)
        breaks, graphs = compile_stats()
        assert not breaks, breaks
        assert graphs >= 1  # it really compiled
    finally:
        torch.compiler.reset()


def _generate_tokens(model, inputs, compiled: bool):
    kw = (
        {"cache_implementation": "static", "compile_config": compile_config_for_cpu()}
        if compiled
        else {"disable_compile": True}
    )
    return model.generate(
        inputs["input_ids"][:1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **kw
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize(
    "shape", [(64,), (4, 64), (1, 1, 64), (4, 3, 64), (2, 3, 4, 64)], ids=["1-D", "2-D", "decode", "3-D", "4-D"]
)
def test_the_same_input_gives_the_same_bits_in_every_mode(shape, bias):
    """The kernel is chosen by the call's shape alone: the watched first call (foreign hooks, out
    of place), later calls (in place), with and without autograd, and with a user hook holding
    the output all give the same bits (CPU kernels for small batched GEMMs round differently
    from one flat GEMM, so a mode-dependent choice would show here)."""
    torch.manual_seed(1)
    model = Holder(nn.Linear(64, 48, bias=bias))
    perturb(hd.attach(model, hd.LoRAConfig(r=4, alpha=3.0, targets=["layer"])), std=0.3)
    x = torch.randn(shape)
    first = model(x).detach()  # (watched: out of place)
    with torch.no_grad():
        quiet = model(x)
    loud = model(x).detach()
    handle = model.layer.register_forward_hook(lambda m, a, out: None)  # after ours: still ours first
    held = nn.modules.module.register_module_forward_hook(lambda m, a, out: None)  # global: out of place
    try:
        with torch.no_grad():
            foreign = model(x)
    finally:
        handle.remove()
        held.remove()
    for got in (quiet, loud, foreign):
        assert torch.equal(got, first)


def _sac(policy_ops):
    """Selective activation checkpointing that saves the outputs of `policy_ops` (torchtitan's
    way: a save list of ATen ops), as a context_fn for torch.utils.checkpoint."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in policy_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return partial(create_selective_checkpoint_contexts, policy)


@pytest.mark.parametrize("save", ["mm", "mm+addmm", "none"])
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 64)], ids=["2-D", "3-D"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_selective_checkpointing_gives_the_plain_gradients(save, shape, bias):
    """A policy that saves `aten.mm` caches the layer's own output; an in-place LoRA add into it
    would be added again at the recompute (wrong gradients, silently). Gradients under the
    policy equal those without checkpointing, after a first (watched) call and before one."""
    from torch.utils.checkpoint import checkpoint

    ops = {
        "mm": [torch.ops.aten.mm.default],
        "mm+addmm": [torch.ops.aten.mm.default, torch.ops.aten.addmm.default],
        "none": [],
    }[save]
    for warm in (False, True):
        torch.manual_seed(3)
        model = Holder(nn.Linear(64, 48, bias=bias))
        delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=3.0, targets=["layer"]))
        perturb(delta, std=0.3)
        x = torch.randn(shape)
        if warm:
            with torch.no_grad():
                model(x)
        model(x).square().sum().backward()
        want = [p.grad.clone() for p in delta.parameters()]
        for p in delta.parameters():
            p.grad = None
        checkpoint(model, x, use_reentrant=False, context_fn=_sac(ops)).square().sum().backward()
        for got, ref in zip((p.grad for p in delta.parameters()), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
