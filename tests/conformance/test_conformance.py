"""The conformance matrix (issue 24): every method with a fast path or state kept between calls,
under the mechanisms that touch the same tensors from outside — optimizer writes, checkpointing
(plain and selective), functorch, torch.compile, half precision, copies and model edits after
attach. Oracles: the same run with every fast path off (`hookdelta.ops.plain()`: the plain twins,
nothing kept) and, for LoRA, the float64 formula by hand. A cell that cannot hold is a clean
HookdeltaError, never a number.

Tolerances are derived, not tuned: float32 fast-vs-plain differs by the order of summation of
one GEMM (a few ulp of the largest partial sum: rtol 1e-5); bfloat16 / float16 by one rounding
of the output (2⁻⁸ / 2⁻¹¹ relative, doubled)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import perturb
from tiny_models import Holder, build, main_output
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import hookdelta as hd
from hookdelta import ops


@pytest.fixture(autouse=True)
def _fast_paths_at_any_size(monkeypatch):
    """The tiny models have a few rows: make every fast path act at their size (sibling grouping
    steps aside below ops.STACK_ROWS rows without autograd, where it does not pay)."""
    monkeypatch.setattr(ops, "STACK_ROWS", 1)


SUBJECTS = {  # each: a method with a fast path or per-call state on every linear layer of a tiny Llama
    "lora": lambda: hd.LoRAConfig(r=4, alpha=8, targets="all-linear"),  # siblings share the A GEMM
    "lora-bias": lambda: hd.LoRAConfig(r=4, alpha=8, bias="lora_only", targets="all-linear"),
    "pissa": lambda: hd.LoRAConfig(r=4, alpha=8, init="pissa", targets="all-linear"),
    "dora": lambda: hd.LoRAConfig(r=4, alpha=8, use_dora=True, targets="all-linear"),
    "ia3": lambda: hd.IA3Config(),
    "oft": lambda: hd.OFTConfig(oft_block_size=4, targets=["q_proj", "v_proj"]),
    "vera": lambda: hd.VeRAConfig(r=8, targets=["q_proj", "v_proj"]),
    "adapter": lambda: hd.AdapterConfig(bottleneck_dim=4),
    # issue 28's methods with a shared tensor, a per-batch mix, a hook reading the call's kwargs, a
    # Python loop building the rotation, or a schedule writing E between steps
    "vblora": lambda: hd.VBLoRAConfig(r=2, vector_length=8, num_vectors=8, targets="all-linear"),
    "lily": lambda: hd.LilyConfig(r=2, stride_A=2, targets="all-linear"),
    "hra": lambda: hd.HRAConfig(r=4, targets=["q_proj", "v_proj"]),
    "llama-adapter": lambda: hd.LlamaAdapterConfig(adapter_len=3, adapter_layers=2),
    "adalora": lambda: hd.AdaLoRAConfig(init_r=4, target_r=2, targets="all-linear"),
}
CATALOGUE = ["vblora", "lily", "hra", "llama-adapter", "adalora"]
# a LoRA on a tiny Mixtral's fused experts (transformers 5), under each of transformers' experts
# implementations: the products with W + s·B·A taken on routed tokens (ops.LowRankWeight)
EXPERTS = {"experts-grouped": "grouped_mm", "experts-eager": "eager", "experts-batched": "batched_mm"}
SUBJECTS.update({k: lambda: hd.LoRAConfig(r=4, alpha=8, targets=["ffn.in", "ffn.out", "attn.q"]) for k in EXPERTS})


def subject(name: str, dtype: torch.dtype = torch.float32):
    model, inputs, _ = build("mixtral" if name in EXPERTS else "llama")
    if name in EXPERTS:
        if not hasattr(model, "set_experts_implementation"):
            pytest.skip("transformers 4 keeps one nn.Linear per expert: the plain LoRA cells cover it")
        model.set_experts_implementation(EXPERTS[name])
    model = model.to(dtype)
    delta = hd.attach(model, SUBJECTS[name](), name=name)
    perturb(delta, std=0.1)
    with torch.no_grad():
        model(**inputs)  # the first forward after attach is the watched one
    return model, inputs, delta


def loss_of(model, inputs):
    return main_output(model(**inputs)).float().square().mean()


def grads(delta):
    return {n: p.grad.detach().clone() for n, p in delta.named_parameters() if p.grad is not None}


def close(a, b, dtype=torch.float32):
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2**-7), torch.float16: (2**-10, 2**-10)}[dtype]
    torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])


def by_hand_lora64(model, delta, inputs):
    """The model in float64 with each LoRA update written into its weight by hand: W + s·B·A."""
    ref = copy.deepcopy(model)
    hd.deltas(ref)[delta.name].detach()
    ref = ref.double()
    if hasattr(ref, "set_experts_implementation"):
        ref.set_experts_implementation("eager")  # (grouped GEMMs take no float64 on the CPU)
    with torch.no_grad():
        for piece in delta.pieces.values():
            owner, _, name = piece.key.rpartition(".")
            holder, name = (
                (ref.get_submodule(owner), name)
                if "." in piece.key and not _is_module(ref, piece.key)
                else (ref.get_submodule(piece.key), "weight")
            )
            getattr(holder, name).add_(float(piece.scale) * piece.lora_B.double() @ piece.lora_A.double())
        return main_output(ref(**inputs))


def _is_module(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


# -- optimizer writes, then eval: nothing derived outlives the step ----------------------------


def _adamw(kind):
    def make(params):
        return torch.optim.AdamW(
            params, lr=1e-2, **({"fused": True} if kind == "fused" else {"foreach": kind == "foreach"})
        )

    return make


def _data_write(params):
    class EMA:  # writes through .data: no version bump, the same storage
        def step(self):
            for p in params:
                p.data.mul_(0.9).add_(0.01)

        def zero_grad(self):
            for p in params:
                p.grad = None

    return EMA()


def _bnb8(params):
    bnb = pytest.importorskip("bitsandbytes")
    try:
        return bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=1)
    except Exception as e:  # noqa: BLE001 - a build without CPU optimizers: not ours to test
        pytest.skip(f"bitsandbytes' 8-bit AdamW does not run here: {e}")


OPTIMIZERS = {
    "adamw-fused": _adamw("fused"),
    "adamw-foreach": _adamw("foreach"),
    "adamw-loop": _adamw("loop"),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "data-write": _data_write,
    "bnb-8bit": _bnb8,
}


def _train_then_eval(name, optimizer, plain):
    model, inputs, delta = subject(name)
    params = [p for p in delta.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params)
    losses, evals = [], []
    with ops.plain() if plain else _nothing():
        for _ in range(3):
            loss = loss_of(model, inputs)
            loss.backward()
            if optimizer == "bnb-8bit":
                try:
                    opt.step()
                except Exception as e:  # noqa: BLE001
                    pytest.skip(f"bitsandbytes' 8-bit AdamW does not step here: {e}")
            else:
                opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
            with torch.no_grad():  # eval after the write: a kept stack would be stale here
                evals.append(main_output(model(**inputs)))
            with torch.inference_mode():
                evals.append(main_output(model(**inputs)).clone())
    return model, inputs, delta, losses, evals


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "name", ["lora", "lora-bias", "pissa", "dora", "vera", "oft", "experts-grouped", "experts-eager"]
)
def test_eval_after_optimizer_writes_equals_the_plain_path(name, optimizer):
    model, inputs, delta, losses, evals = _train_then_eval(name, optimizer, plain=False)
    _, _, delta_p, losses_p, evals_p = _train_then_eval(name, optimizer, plain=True)
    if name in EXPERTS and optimizer not in ("sgd", "data-write"):
        # the fast path sums a fused-experts gradient in another order than the built weight's
        # (per routed token, not through the full weight gradient); SGD shows the gradients agree to
        # rounding (≤ 2e-8 here), but Adam divides each entry by its own running size, so an entry near
        # zero, whose rounding is large relative to it, can move by a visible part of the step (lr 1e-2):
        # parameters within 1% of three steps, outputs within 1e-4 of their scale; bitsandbytes' 8-bit
        # state rounds each entry to one of 256 levels, so there a few levels (2⁻⁵ of a step, 2⁻⁷ of scale)
        eight = optimizer == "bnb-8bit"
        for got, want in zip(losses + evals, losses_p + evals_p, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=(2**-7 if eight else 1e-4) * want.abs().max().item())
        for (_, p), (_, q) in zip(delta.named_parameters(), delta_p.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=3 * 1e-2 * (2**-5 if eight else 1e-2))
    else:
        for got, want in zip(losses + evals, losses_p + evals_p, strict=True):
            close(got, want)
        for (_, p), (_, q) in zip(delta.named_parameters(), delta_p.named_parameters(), strict=True):
            close(p, q)
    if name in (
        "lora",
        "experts-grouped",
        "experts-eager",
    ):  # and the formula itself, in float64, at the trained factors
        with torch.no_grad():
            torch.testing.assert_close(
                main_output(model(**inputs)).double(), by_hand_lora64(model, delta, inputs), rtol=1e-4, atol=1e-5
            )


# -- checkpointing: plain (reentrant or not) and selective, with several save lists -------------


def _policy(saved):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


MM, ADDMM = torch.ops.aten.mm.default, torch.ops.aten.addmm.default
CHECKPOINTS = {
    "reentrant": None,
    "non-reentrant": None,
    "sac-mm": {MM},
    "sac-mm-addmm": {MM, ADDMM},
    "sac-nothing": set(),
    "sac-bmm": {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default},
}


def _checkpointed_grads(name, how, plain):
    model, inputs, delta = subject(name)
    with ops.plain() if plain else _nothing():
        if how in ("reentrant", "non-reentrant"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": how == "reentrant"})
            model.train()
            loss = loss_of(model, inputs)
        elif how == "none":
            loss = loss_of(model, inputs)
        else:
            embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
            out = checkpoint(
                lambda e: model(inputs_embeds=e).logits,
                embeds,
                use_reentrant=False,
                context_fn=_policy(CHECKPOINTS[how]),
            )
            loss = out.float().square().mean()
        loss.backward()
    return loss.detach(), grads(delta)


@pytest.mark.parametrize("how", list(CHECKPOINTS))
@pytest.mark.parametrize("name", ["lora", "lora-bias", "pissa", "dora", "ia3", "vera", *EXPERTS, *CATALOGUE])
def test_checkpointing_gives_the_gradients_of_the_plain_uncheckpointed_path(name, how):
    loss, got = _checkpointed_grads(name, how, plain=False)
    want_loss, want = _checkpointed_grads(name, "none", plain=True)
    close(loss, want_loss)
    assert got.keys() == want.keys() and got
    for k in want:
        close(got[k], want[k])


# -- functorch: grad / vmap / jvp over functional_call ------------------------------------------


def _holder(name):
    torch.manual_seed(1)
    model = Holder(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)))
    cfg = {
        "lora": hd.LoRAConfig(r=3, alpha=6, targets="all-linear"),
        "lora-bias": hd.LoRAConfig(r=3, alpha=6, bias="lora_only", targets="all-linear"),
        "dora": hd.LoRAConfig(r=3, alpha=6, use_dora=True, targets="all-linear"),
        "ia3": hd.IA3Config(targets="all-linear", feedforward_targets=["layer.2"]),
        "vera": hd.VeRAConfig(r=4, targets="all-linear"),
    }[name]
    delta = hd.attach(model, cfg)
    perturb(delta, std=0.2)
    model(torch.randn(2, 6))
    return model, delta


FUNCTORCH_SUBJECTS = ["lora", "lora-bias", "dora", "ia3", "vera"]


@pytest.mark.parametrize("name", FUNCTORCH_SUBJECTS)
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
def test_func_grad_over_functional_call_equals_autograd(name, grad_mode):
    model, delta = _holder(name)
    x = torch.randn(4, 6)
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(params):
        return torch.func.functional_call(model, params, (x,)).square().sum()

    with torch.no_grad() if grad_mode == "no_grad" else _nothing():
        got = torch.func.grad(loss)({n: p.detach() for n, p in names.items()})
    with ops.plain():
        model(x).square().sum().backward()
    for n, p in names.items():
        close(got[n], p.grad)


@pytest.mark.parametrize("name", FUNCTORCH_SUBJECTS)
def test_vmap_over_inputs_and_jvp_equal_the_plain_path(name):
    model, delta = _holder(name)
    xs = torch.randn(3, 4, 6)
    with torch.no_grad():
        got = torch.func.vmap(model)(xs)
        with ops.plain():
            want = torch.stack([model(x) for x in xs])
    close(got, want)
    v = torch.randn(4, 6)
    out, tangent = torch.func.jvp(model, (xs[0],), (v,))
    with ops.plain():
        x = xs[0].clone().requires_grad_(True)
        ref = model(x)
        # the jvp by the double-backward trick: J·v = d/du (uᵀ·J·v)
        u = torch.zeros_like(ref, requires_grad=True)
        (g,) = torch.autograd.grad(ref, x, u, create_graph=True)
        (jv,) = torch.autograd.grad(g, u, v)
    close(out, ref.detach())
    close(tangent, jv)


def test_vmap_over_stacked_adapter_parameters_equals_each_adapter_alone():
    model, delta = _holder("lora")
    x = torch.randn(4, 6)
    params = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    stacked = {n: torch.stack([p, p * 0.5, -p]) for n, p in params.items()}
    got = torch.func.vmap(lambda ps: torch.func.functional_call(model, ps, (x,)))(stacked)
    with torch.no_grad(), ops.plain():
        for i in range(3):
            want = torch.func.functional_call(model, {n: t[i] for n, t in stacked.items()}, (x,))
            close(got[i], want)


# -- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "experts-grouped", "experts-eager", *CATALOGUE])
@pytest.mark.parametrize("grad", [False, True])
def test_compiled_with_the_eager_backend_equals_the_plain_path(name, grad):
    torch.compiler.reset()  # a fresh cache per cell
    model, inputs, delta = subject(name)
    compiled = torch.compile(model, backend="eager")
    with torch.set_grad_enabled(grad):
        got = main_output(compiled(**inputs))
    with ops.plain(), torch.no_grad():
        want = main_output(model(**inputs))
    close(got, want)


def test_compiled_with_inductor_trains_like_the_plain_path():
    torch.compiler.reset()
    model, delta = _holder("lora")
    x = torch.randn(4, 6)
    compiled = torch.compile(model)
    out = compiled(x)
    out.square().sum().backward()
    got = grads(delta)
    delta.zero_grad()
    with ops.plain():
        want_out = model(x)
        want_out.square().sum().backward()
    close(out, want_out)
    want = grads(delta)
    assert got.keys() == want.keys() and got
    for k in want:
        close(got[k], want[k])


# -- half precision: models in bf16 / fp16, and bf16 autocast -----------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["lora", "lora-bias", "pissa", "dora", "ia3", "oft", "vera", *EXPERTS])
def test_half_models_fast_equals_plain(name, dtype):
    model, inputs, delta = subject(name, dtype)
    with torch.no_grad():
        got = main_output(model(**inputs))
        with ops.plain():
            want = main_output(model(**inputs))
    close(got, want, dtype)
    loss = loss_of(model, inputs)
    loss.backward()
    got_g = grads(delta)
    delta.zero_grad()
    with ops.plain():
        loss_of(model, inputs).backward()
    for k, g in grads(delta).items():
        torch.testing.assert_close(got_g[k].float(), g.float(), rtol=0.05, atol=0.05 * g.float().abs().max().item())


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", *EXPERTS])
def test_bf16_autocast_fast_equals_plain(name):
    model, inputs, delta = subject(name)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = main_output(model(**inputs))
        with ops.plain():
            want = main_output(model(**inputs))
    close(got.float(), want.float(), torch.bfloat16)


# -- copies and state dicts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "pissa", "dora", "oft"])
def test_a_deepcopy_and_a_state_dict_round_trip_compute_what_the_original_does(name):
    model, inputs, delta = subject(name)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = main_output(model(**inputs))
        close(main_output(twin(**inputs)), want)
        for p in hd.deltas(twin)[name].parameters():  # the copy's tensors are its own
            p.mul_(0.5)
        close(main_output(model(**inputs)), want)
    fresh, _, _ = build("llama")
    other = hd.attach(fresh, SUBJECTS[name](), name=name)
    other.load_state_dict(delta.state_dict())
    with torch.no_grad():
        close(main_output(fresh(**inputs)), want)


# -- model edits after attach ---------------------------------------------------------------------


def test_a_module_replaced_after_attach_is_refused_at_the_next_forward():
    model, inputs, delta = subject("lora")
    attn = model.model.layers[0].self_attn
    attn.q_proj = copy.deepcopy(attn.q_proj)  # e.g. a converter that rebuilds layers
    with pytest.raises(hd.HookdeltaError, match="replaced"):
        model(**inputs)


def test_torch_ao_dynamic_quantization_after_attach_is_refused_at_the_next_forward():
    model, inputs, delta = subject("lora")
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    with pytest.raises(hd.HookdeltaError, match="replaced"):
        model(**inputs)


def test_tie_weights_after_attach_keeps_the_delta_exact():
    model, inputs, delta = subject("lora")
    with torch.no_grad():
        want = main_output(model(**inputs))
    model.tie_weights()  # the tiny Llama does not tie: nothing may change
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), want, rtol=0, atol=0)


def test_moving_the_model_to_another_dtype_after_attach_moves_the_delta_with_it():
    model, inputs, delta = subject("lora")
    with torch.no_grad():
        want = main_output(model(**inputs)).double()
    model.double()
    with torch.no_grad():
        got = main_output(model(**{k: v for k, v in inputs.items()}))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, by_hand_lora64(model, delta, inputs), rtol=1e-10, atol=1e-10)


# -- the routed gather-bmm ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_routed_rows_equal_the_plain_row_by_row_path_after_optimizer_writes(mode):
    model, inputs, _ = build("llama")
    for i in range(2):
        perturb(hd.attach(model, hd.LoRAConfig(r=2 + 2 * i, targets="all-linear"), name=f"d{i}"), std=0.1, seed=i)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    rows = ["d0", "d1"]
    for _ in range(2):
        with hd.route(model, rows):
            loss_of(model, inputs).backward()
        opt.step()
        opt.zero_grad()
        ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": _nothing}[mode]
        with ctx(), hd.route(model, rows):
            got = main_output(model(**inputs)).clone()
            with ops.plain():
                want = main_output(model(**inputs)).clone()
        close(got.detach(), want.detach())


# -- every input shape a linear layer accepts, for every method that adapts one -----------------

LINEAR_METHODS = {
    "lora": lambda: hd.LoRAConfig(r=2, targets=["layer"]),
    "lora-bias": lambda: hd.LoRAConfig(r=2, bias="lora_only", targets=["layer"]),
    "dora": lambda: hd.LoRAConfig(r=2, use_dora=True, targets=["layer"]),
    "ia3": lambda: hd.IA3Config(targets=["layer"], feedforward_targets=["layer"]),
    "ia3-out": lambda: hd.IA3Config(targets=["layer"]),
    "bitfit": lambda: hd.BitFitConfig(targets=["layer"]),
    "loha": lambda: hd.LoHaConfig(r=2, targets=["layer"]),
    "lokr": lambda: hd.LoKrConfig(r=2, targets=["layer"]),
    "oft": lambda: hd.OFTConfig(oft_block_size=2, targets=["layer"]),
    "boft": lambda: hd.BOFTConfig(boft_block_size=2, targets=["layer"]),
    "vera": lambda: hd.VeRAConfig(r=4, targets=["layer"]),
    "fourierft": lambda: hd.FourierFTConfig(n_frequency=8, targets=["layer"]),
    "hira": lambda: hd.HiRAConfig(r=2, targets=["layer"]),
    "delora": lambda: hd.DeLoRAConfig(r=2, targets=["layer"]),
    "gralora": lambda: hd.GraLoRAConfig(r=2, gralora_k=2, targets=["layer"]),
    "miss": lambda: hd.MiSSConfig(r=4, targets=["layer"]),
    "c3a": lambda: hd.C3AConfig(block_size=3, targets=["layer"]),
    "hra": lambda: hd.HRAConfig(r=2, targets=["layer"]),
    "road": lambda: hd.RoAdConfig(group_size=2, targets=["layer"]),
    "adalora": lambda: hd.AdaLoRAConfig(init_r=2, target_r=1, targets=["layer"]),
    "adapter": lambda: hd.AdapterConfig(bottleneck_dim=3, targets=["layer"]),
    "parallel_adapter": lambda: hd.ParallelAdapterConfig(bottleneck_dim=3, targets=["layer"]),
    "low_rank_adapter": lambda: hd.LowRankAdapterConfig(bottleneck_dim=4, targets=["layer"]),
    "compacter": lambda: hd.CompacterConfig(bottleneck_dim=4, phm_dim=2, targets=["layer"]),
}
SHAPES = {"1-D": (6,), "empty batch": (0, 6), "empty tokens": (2, 0, 6), "4-D": (2, 2, 3, 6)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(LINEAR_METHODS))
def test_every_input_shape_a_linear_layer_takes_gives_what_a_batch_of_it_gives(name, shape):
    """Unbatched, empty and 4-D inputs: each row's output is that row's output in an ordinary
    2-D batch (the layer acts per row), or the method refuses the shape with a HookdeltaError."""
    torch.manual_seed(0)
    model = Holder(nn.Linear(6, 6))
    try:
        delta = hd.attach(model, LINEAR_METHODS[name]())
    except hd.HookdeltaError as e:
        pytest.skip(f"{name} does not adapt a lone linear layer: {e}")
    perturb(delta, std=0.3)
    x = torch.randn(*SHAPES[shape])
    flat = x.reshape(-1, 6)
    with torch.no_grad():
        model(torch.randn(3, 6))  # (the watched first forward)
        try:
            got = model(x)
        except hd.HookdeltaError:
            return  # refused clearly: allowed
        want = model(flat) if flat.shape[0] else torch.zeros(0, 6)
    assert got.shape == x.shape
    close(got.reshape(-1, 6), want)
    if flat.shape[0]:  # the delta acts: the comparison is not vacuous
        assert not torch.allclose(want, F.linear(flat, model.layer.weight, model.layer.bias), atol=1e-4)


# -- an interrupt inside forward ----------------------------------------------------------------


@pytest.mark.parametrize("first", [True, False], ids=["first forward", "later forward"])
@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "adapter"])
def test_a_keyboard_interrupt_inside_forward_leaves_the_model_as_it_was(name, first):
    import threading

    model, inputs, _ = build("llama")
    delta = hd.attach(model, SUBJECTS[name](), name=name)
    perturb(delta, std=0.1)
    if not first:
        with torch.no_grad():
            model(**inputs)

    def interrupt(module, args, output):
        handle.remove()
        raise KeyboardInterrupt

    handle = model.model.layers[-1].mlp.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**inputs)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(delta.disable()))
    worker.start()
    worker.join()
    assert errors == [None] and not delta.enabled  # the ended forward does not hold changes off
    delta.enable()
    with torch.no_grad():
        got = main_output(model(**inputs))
        with ops.plain():
            want = main_output(model(**inputs))
    close(got, want)
