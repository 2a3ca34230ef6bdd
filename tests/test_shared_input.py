"""Sibling grouping (issue 15): LoRA on layers that read the same input (q/k/v, gate/up) computes
one A GEMM over the stacked A's. Checked against the plain path (each layer alone) and against
LoRA merged by hand into a float64 copy of the model, forward and gradients; the cases where
the siblings' inputs differ (cross-attention, an in-place write between two siblings' calls, the
same layer called twice) must fall back and stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import perturb
from tiny_models import build

import hookdelta as hd
from hookdelta import ops
from hookdelta.shared_input import new_forward


def _groups(delta):
    found = {id(p.siblings): p.siblings for p in delta.pieces.values() if getattr(p, "siblings", None) is not None}
    return sorted(tuple(m.key.rpartition(".")[2] for m in g.members) for g in found.values())


def _ungrouped(model):
    plain = copy.deepcopy(model)
    for delta in hd.deltas(plain).values():
        for piece in delta.pieces.values():
            if getattr(piece, "siblings", None) is not None:
                piece.siblings = None
    return plain


def _merged_by_hand(model, *deltas, dtype=torch.float64):
    """A copy of the bare model in `dtype` with W + s·B·A of each delta written into its weights."""
    ref = copy.deepcopy(model)
    updates = [
        (p.key, float(p.scale) * p.lora_B.detach().double() @ p.lora_A.detach().double())
        for d in deltas
        for p in d.pieces.values()
    ]
    for d in list(hd.deltas(ref).values()):
        d.detach()
    ref = ref.to(dtype)
    with torch.no_grad():
        for key, update in updates:
            ref.get_submodule(key).weight += update.to(dtype)
    return ref


class _CountStacked:
    """Counts the linear calls whose weight is a stack of `r`-row factors (more than r rows)."""

    def __init__(self, monkeypatch, r):
        self.calls, self.r = 0, r
        real = torch.nn.functional.linear

        def counting(x, w, *rest):
            if w.shape[0] > self.r and w.shape[0] % self.r == 0 and w.shape[0] <= 3 * self.r:
                self.calls += 1
            return real(x, w, *rest)

        monkeypatch.setattr(torch.nn.functional, "linear", counting)


@pytest.fixture(autouse=True)
def _always_stack(monkeypatch):
    """These tests use a few rows: let grouping act at any size without autograd too (it steps
    aside below ops.STACK_ROWS rows there, where separate GEMMs are faster)."""
    monkeypatch.setattr(ops, "STACK_ROWS", 1)


def _watched_llama():
    """A tiny Llama with LoRA on every linear layer, its watched first call done."""
    model, inputs, _ = build("llama")
    hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    with torch.no_grad():
        model(**inputs)
    return model, inputs


def test_grouping_steps_aside_for_few_rows_without_autograd_only(monkeypatch):
    monkeypatch.setattr(ops, "STACK_ROWS", 128)
    model, inputs = _watched_llama()
    counter = _CountStacked(monkeypatch, 4)
    with torch.no_grad():
        model(**inputs)  # 2 x 7 rows: decoding-sized, each layer alone
        assert counter.calls == 0
        model(input_ids=torch.randint(3, 90, (2, 64)))  # 128 rows: grouped
        assert counter.calls == 4
    model(**inputs)  # with autograd: grouped at any size
    assert counter.calls == 8


def test_groups_are_q_k_v_and_gate_up_of_each_block():
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    assert _groups(delta) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    bert, _, _ = build("bert")
    assert _groups(hd.attach(bert, hd.LoRAConfig(r=4, targets="all-linear"))) == [("query", "key", "value")] * 2


@pytest.mark.parametrize("arch", ["llama", "bert", "bart", "t5"])
def test_grouped_equals_the_formula_and_the_plain_path_forward_and_backward(arch):
    """bart / t5: the decoder's cross-attention q reads the decoder, k and v the encoder."""
    model, inputs, _ = build(arch)
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=6, targets="all-linear"))
    perturb(delta, std=0.3)
    assert _groups(delta)
    plain = _ungrouped(model)
    ref = _merged_by_hand(model, delta)
    with torch.no_grad():
        got = model(**inputs)[0]
        torch.testing.assert_close(got.double(), ref(**inputs)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, plain(**inputs)[0], rtol=1e-4, atol=1e-5)
    grads = []
    for m in (model, plain):  # (eval: no dropout in the models, the same computation in both)
        m(**inputs)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in hd.deltas(m)[delta.name].named_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(delta.pieces)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)


def test_siblings_sharing_an_input_compute_one_stacked_gemm(monkeypatch):
    model, inputs = _watched_llama()
    counter = _CountStacked(monkeypatch, 4)
    with torch.no_grad():
        model(**inputs)
    assert counter.calls == 4  # 2 blocks x (q/k/v, gate/up)
    counter.calls = 0
    with torch.inference_mode():  # inference tensors have no version: every layer alone
        model(**inputs)
    assert counter.calls == 0


def test_cross_attention_siblings_with_other_inputs_each_compute_their_own(monkeypatch):
    model, inputs, _ = build("bart")
    hd.attach(model, hd.LoRAConfig(r=4, targets=["encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj"]))
    with torch.no_grad():
        model(**inputs)
    counter = _CountStacked(monkeypatch, 4)
    with torch.no_grad():
        model(**inputs)
    layers = len(model.model.decoder.layers)
    assert counter.calls == 2 * layers  # q on the decoder's states; k (shared with v) on the encoder's


def test_an_in_place_write_between_siblings_is_seen():
    """A pre-hook on k_proj adds to the shared input in place: k and v must see the new values,
    q the old ones (a stale stacked product would give k and v q's input)."""
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "k_proj", "v_proj"]))
    perturb(delta, std=0.3)
    attn = model.model.layers[0].self_attn
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.clone()))

    def shift(module, args):
        args[0].add_(0.5)

    attn.k_proj.register_forward_pre_hook(shift)
    plain = _ungrouped(model)
    with torch.no_grad():
        got = model(**inputs).logits
        mine = dict(seen)
        want = plain(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in mine:
        torch.testing.assert_close(mine[name], seen[name], rtol=1e-5, atol=1e-6)


def test_a_stale_product_is_never_taken():
    """Direct calls on one tensor, no model forward in between: a sibling whose A changed after
    the stacked product was made recomputes it, and a member that made the product does not take
    from it again (its graph may be gone after a backward)."""
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "k_proj", "v_proj"]))
    perturb(delta, std=0.3)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features)
    k = delta.piece("model.layers.0.self_attn.k_proj")
    with torch.no_grad():
        attn.q_proj(x)
        k.lora_A.add_(1.0)  # after q made the stacked product of x
        got = attn.k_proj(x)
        want = _merged_by_hand(model, delta).model.layers[0].self_attn.k_proj(x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    attn.q_proj(x).sum().backward()
    attn.q_proj(x).sum().backward()  # a second product: not the first one, whose graph was freed
    new_forward()  # the model's next forward: what k and v did not take is gone
    attn.k_proj(x).sum().backward()


def test_repeated_calls_give_the_same_bits_and_stacked_deltas_stay_exact():
    model, inputs, _ = build("llama")
    a = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"), name="a")
    b = hd.attach(model, hd.LoRAConfig(r=2, alpha=3, targets=["q_proj", "v_proj"]), name="b")
    perturb(a, std=0.3, seed=1)
    perturb(b, std=0.3, seed=2)
    assert _groups(b) == [("q_proj", "v_proj")] * 2
    with torch.no_grad():
        outs = [model(**inputs).logits for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    with torch.no_grad():
        torch.testing.assert_close(
            outs[0].double(), _merged_by_hand(model, a, b)(**inputs).logits, rtol=1e-4, atol=1e-5
        )


def test_dropout_autocast_compile_and_deepcopy():
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, dropout=0.5, targets="all-linear"))
    perturb(delta, std=0.3)
    plain = _ungrouped(model)
    for m in (model, plain):
        m.train()
    torch.manual_seed(3)
    got = model(**inputs).logits
    torch.manual_seed(3)
    want = plain(**inputs).logits  # with dropout each layer draws its own mask: no sharing
    assert torch.equal(got, want)
    copy.deepcopy(model)  # a forward with autograd just ran: nothing held makes the copy fail
    for m in (model, plain):
        m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_plain = model(**inputs).logits, plain(**inputs).logits
    torch.testing.assert_close(cast, cast_plain, rtol=0.02, atol=0.02)
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model)(**inputs).logits
    torch.compiler.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_hotswap_padding_and_a_member_moved_alone():
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj", "k_proj", "v_proj"]))
    perturb(delta, std=0.3)
    with torch.no_grad():
        before = model(**inputs).logits
    hd.prepare_hotswap(model, max_rank=6)  # new, zero-padded A's: the groups follow
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-6)
    q = delta.piece("model.layers.0.self_attn.q_proj")
    ref = _merged_by_hand(model, delta).model.layers[0].self_attn
    q.double()  # one member in another dtype: each computes alone, nothing is mixed
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        x = torch.randn(1, 3, q.lora_A.shape[1])
        k, out = attn.k_proj(x), attn.q_proj(x)
    assert out.dtype == k.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.q_proj(x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.double(), ref.k_proj(x.double()), rtol=1e-5, atol=1e-5)


def test_the_stack_follows_every_change_of_the_factors_and_is_never_kept(monkeypatch):
    """The concatenated A's are made per call: a fused AdamW step (the HF Trainer's default), a
    write through `.data` (EMA code, 8-bit optimizers) and an SGD step change a factor without a
    trace a kept stack could check (version counter, storage), and each must show at the next
    forward under no_grad; with autograd gradients reach every member's own A."""
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "k_proj", "v_proj"]))
    perturb(delta, std=0.3)
    cats = []
    real_cat = torch.cat

    def counting(ts, *a, **k):  # (the model itself concatenates other tensors)
        if all(isinstance(t, torch.nn.Parameter) for t in ts):
            cats.append(len(ts))
        return real_cat(ts, *a, **k)

    monkeypatch.setattr(torch, "cat", counting)

    def check():
        with torch.no_grad():
            got = model(**inputs).logits
            want = _merged_by_hand(model, delta)(**inputs).logits
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)

    check()
    assert len(cats) == 2  # one stack per layer's q/k/v
    with torch.no_grad():
        model(**inputs)
    assert len(cats) == 4  # made again: nothing is kept between calls
    q = delta.piece("model.layers.0.self_attn.q_proj")
    k = delta.piece("model.layers.1.self_attn.k_proj")
    model(**inputs).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in delta.named_parameters() if "lora_A" in n)
    torch.optim.AdamW(delta.parameters(), lr=0.5, fused=True).step()  # fused: no version bump
    check()
    torch.optim.SGD(delta.parameters(), lr=0.5).step()
    check()
    k.lora_A.data.mul_(-2.0)  # through .data: neither version nor storage changes
    check()
    with torch.no_grad():
        k.lora_A.copy_(torch.randn_like(k.lora_A))
    check()
    q.lora_A.data = torch.randn_like(q.lora_A)  # new storage
    check()
    hd.prepare_hotswap(model, max_rank=6)  # new, zero-padded parameters
    check()
