"""The data-driven LoRA initialisations (hd.inits) against PEFT's own on the same weights, data
and seed: the same first factors; PEFT writes the base, hookdelta keeps its part as a frozen
residual, so the two models give the same outputs, fresh and after the factors move. LoftQ (PEFT
runs it on CUDA only) is checked against its formula on the dequantized base."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build, main_output

import hookdelta as hd

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.lora
QV = ["q_proj", "v_proj"]


def batches(n=3, batch=2):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 96, (batch, 7), generator=g) for _ in range(n)]


def same_factors_and_outputs(twin, delta, ours, model, ids):
    for piece in delta.pieces.values():
        layer = twin.base_model.model.get_submodule(piece.key)
        torch.testing.assert_close(piece.lora_A, layer.lora_A["default"].weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(piece.lora_B, layer.lora_B["default"].weight, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        bare = main_output(model(input_ids=ids))
        torch.testing.assert_close(main_output(ours(input_ids=ids)), bare, rtol=0, atol=0)  # ours: nothing yet
        torch.testing.assert_close(main_output(twin(input_ids=ids)), bare, rtol=1e-4, atol=1e-5)  # PEFT: rounding
        g = torch.Generator().manual_seed(3)
        for piece in delta.pieces.values():  # move both the same way: the same model after the move
            layer = twin.base_model.model.get_submodule(piece.key)
            for name in ("lora_A", "lora_B"):
                step = torch.randn(getattr(piece, name).shape, generator=g) * 0.05
                getattr(piece, name).add_(step)
                getattr(layer, name)["default"].weight.add_(step)
        torch.testing.assert_close(
            main_output(ours(input_ids=ids)), main_output(twin(input_ids=ids)), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    "direction,scale", [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("A2rBr", "gd_scale"), ("random", "unit")]
)
def test_lora_ga_gives_peft_factors(direction, scale):
    if not hasattr(peft, "preprocess_loraga"):
        pytest.skip("this PEFT has no LoRA-GA (0.19 and later)")
    model, _, _ = build("llama")
    data = batches()

    def step(m):
        return lambda: [m(input_ids=ids, labels=ids).loss.backward() for ids in data]

    theirs = copy.deepcopy(model)
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=QV,
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale),
    )
    peft.preprocess_loraga(theirs, cfg, step(theirs))
    torch.manual_seed(11)
    twin = peft.get_peft_model(theirs, cfg).eval()
    ours = copy.deepcopy(model)
    torch.manual_seed(11)  # (the factors come from a randomized SVD: the same draws)
    delta = hd.inits.lora_ga(
        ours, hd.LoRAConfig(r=2, alpha=4, targets=QV, init="lora_ga"), step(ours), direction=direction, scale=scale
    )
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora" not in n and ".base_" not in n)
    ours.eval()
    same_factors_and_outputs(twin, delta, ours, model, data[0])


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_gives_peft_factors(method):
    from internals import peft_corda

    CordaConfig, preprocess_corda = peft_corda()

    model, _, _ = build("llama")
    samples = batches(n=4, batch=1)  # (CorDA reads one sample per call)

    def run(m):
        return lambda: [m(input_ids=ids) for ids in samples]

    theirs = copy.deepcopy(model)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=QV, init_lora_weights="corda", corda_config=CordaConfig(corda_method=method)
    )
    preprocess_corda(theirs, cfg, run_model=run(theirs))
    twin = peft.get_peft_model(theirs, cfg).eval()
    ours = copy.deepcopy(model)
    delta = hd.inits.corda(ours, hd.LoRAConfig(r=2, alpha=4, targets=QV, init="corda"), run(ours), method=method)
    same_factors_and_outputs(twin, delta, ours, model, samples[0])


def test_data_inits_save_and_load_without_their_data(tmp_path):
    model, _, _ = build("llama")
    data = batches(n=2, batch=1)
    delta = hd.inits.corda(
        model, hd.LoRAConfig(r=2, targets=QV, init="corda"), lambda: [model(input_ids=i) for i in data]
    )
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1)
        want = main_output(model(input_ids=data[0]))
    delta.save(tmp_path / "d")
    delta.detach()
    hd.load(model, tmp_path / "d")  # (no calibration data here: the file holds factors and residual)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(input_ids=data[0])), want, rtol=0, atol=0)


def test_data_inits_refuse_a_plain_attach_and_bad_inputs():
    model, _, _ = build("llama")
    for init in ("lora_ga", "corda", "loftq", "eva"):
        with pytest.raises(hd.ConfigError, match=f"hd.inits.{init}"):
            hd.attach(model, hd.LoRAConfig(r=2, init=init))
    with pytest.raises(hd.ConfigError, match="LoRAConfig"):
        hd.inits.corda(model, hd.LoRAConfig(r=2), lambda: None)
    with pytest.raises(hd.ConfigError, match="one sample"):
        hd.inits.corda(model, hd.LoRAConfig(r=2, init="corda"), lambda: model(input_ids=batches()[0]))
    with pytest.raises(hd.ConfigError, match="no gradient"):
        hd.inits.lora_ga(model, hd.LoRAConfig(r=2, init="lora_ga"), lambda: None)
    with pytest.raises(hd.UnsupportedModuleError, match="quantized"):
        hd.inits.loftq(model, hd.LoRAConfig(r=2, init="loftq"), {})
    for bad in ([], [{"attention_mask": batches()[0]}], [batches()[0]]):
        with pytest.raises(hd.ConfigError, match="batches"):
            hd.inits.eva(model, hd.LoRAConfig(r=2, init="eva"), bad)
    with pytest.raises(hd.ConfigError, match="rho"):
        hd.inits.eva(model, hd.LoRAConfig(r=2, init="eva"), [{"input_ids": batches()[0]}], rho=0.5)
    assert not hd.deltas(model)
    assert all(p.grad is None for p in model.parameters())


def test_loftq_factors_carry_the_quantization_error(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    torch.manual_seed(0)
    float_model = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
        )
    ).eval()
    float_model.save_pretrained(tmp_path)
    q = tf.LlamaForCausalLM.from_pretrained(
        tmp_path,
        device_map="cpu",
        quantization_config=tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    ).eval()
    from internals import peft_low_rank_decomposition

    from hookdelta.quantized import dequantize

    split = peft_low_rank_decomposition()
    delta = hd.inits.loftq(q, hd.LoRAConfig(r=4, alpha=8, targets=QV, init="loftq"), str(tmp_path))
    for piece in delta.pieces.values():
        w = float_model.get_submodule(piece.key).weight.detach()
        quant = dequantize(q.get_submodule(piece.key)).float()
        u, s, vh = torch.linalg.svd(w - quant, full_matrices=False)  # the reference: best rank-r approximation
        best = (u[:, :4] * s[:4]) @ vh[:4]
        half = piece.lora_A.dtype != torch.float32  # (transformers 4.x loads a 4-bit model in float16)
        torch.testing.assert_close(
            piece.scale * piece.lora_B.float() @ piece.lora_A.float(),
            best,
            rtol=1e-2 if half else 1e-4,
            atol=1e-3 if half else 1e-5,
        )
        assert (w - quant - best).norm() < (w - quant).norm()
        theirs = split(w - quant, reduced_rank=4)  # PEFT's factors: A = R, B = L (hookdelta: B = L / s)
        torch.testing.assert_close(
            piece.lora_A.float(), theirs["R"], rtol=1e-2 if half else 1e-4, atol=1e-3 if half else 1e-5
        )
        torch.testing.assert_close(
            piece.scale * piece.lora_B.float(), theirs["L"], rtol=1e-2 if half else 1e-4, atol=1e-3 if half else 1e-5
        )
    ids = batches()[0]
    with torch.no_grad():
        err_after = (main_output(q(input_ids=ids)) - main_output(float_model(input_ids=ids))).abs().mean()
        with delta.disabled():
            err_before = (main_output(q(input_ids=ids)) - main_output(float_model(input_ids=ids))).abs().mean()
    assert err_after < err_before, "the LoftQ start is closer to the float model than the quantized base"


def test_a_data_init_delta_saves_for_peft_on_the_original_base(tmp_path):
    model, _, _ = build("llama")
    data = batches(n=2, batch=1)
    ours = copy.deepcopy(model)
    delta = hd.inits.corda(
        ours, hd.LoRAConfig(r=2, targets=QV, init="corda"), lambda: [ours(input_ids=i) for i in data]
    )
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.05)
        want = main_output(ours(input_ids=data[0]))
    delta.save_peft(tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(back(input_ids=data[0])), want, rtol=1e-4, atol=1e-5)


def eva_data():
    g = torch.Generator().manual_seed(9)
    data = []
    for _ in range(6):
        ids = torch.randint(3, 96, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding: left out of the statistics
        data.append({"input_ids": ids, "attention_mask": mask})
    return data


EVA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj"]


def peft_eva(model, data, **kw):
    """PEFT's EVA directions {layer: A} and its LoRA model."""
    EvaConfig, get_eva_state_dict, initialize_lora_eva_weights = (
        peft.EvaConfig,
        peft.get_eva_state_dict,
        peft.initialize_lora_eva_weights,
    )
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=EVA_TARGETS, init_lora_weights="eva", eva_config=EvaConfig(tau=0.9, **kw)
    )
    twin = peft.get_peft_model(copy.deepcopy(model), cfg, low_cpu_mem_usage=True)
    state = get_eva_state_dict(twin, data, show_progress_bar=False)
    initialize_lora_eva_weights(twin, eva_state_dict=state)
    return twin, {
        n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.detach()
        for n, p in twin.named_parameters()
        if n.endswith("lora_A.default.weight")
    }


@pytest.mark.parametrize(
    "kw",
    [dict(rho=2.0), dict(rho=1.0), dict(rho=1.5, adjust_scaling_factors=False)],
    ids=["redistribute", "fixed-ranks", "fixed-alpha"],
)
def test_eva_gives_peft_directions_and_ranks(kw):
    model, _, _ = build("llama")
    data = eva_data()
    twin, theirs = peft_eva(model, data, **kw)
    ours = copy.deepcopy(model)
    delta = hd.inits.eva(ours, hd.LoRAConfig(r=4, alpha=8, targets=EVA_TARGETS, init="eva"), data, tau=0.9, **kw)
    assert {p.key for p in delta.pieces.values()} == set(theirs)
    for piece in delta.pieces.values():
        torch.testing.assert_close(piece.lora_A, theirs[piece.key], rtol=1e-4, atol=1e-5, msg=piece.key)
        layer = twin.base_model.model.get_submodule(piece.key)
        assert piece.scale == pytest.approx(layer.scaling["default"])
        assert not piece.lora_B.any()


def test_eva_whitens_each_layer_once():
    """whiten=True divides each direction by √(its singular value). PEFT 0.21 divides in place in
    the PCA it shares between layers that read the same input (q, k, v), so those get it once per
    sharing layer (here three times); its layers with their own input are the reference there."""
    model, _, _ = build("llama")
    data = eva_data()
    _, plain = peft_eva(model, data, rho=1.0)
    _, whitened = peft_eva(model, data, rho=1.0, whiten=True)
    delta = hd.inits.eva(
        copy.deepcopy(model),
        hd.LoRAConfig(r=4, alpha=8, targets=EVA_TARGETS, init="eva"),
        data,
        tau=0.9,
        rho=1.0,
        whiten=True,
    )
    for piece in delta.pieces.values():
        if piece.key.endswith("up_proj"):  # its own input: PEFT whitens it once
            torch.testing.assert_close(piece.lora_A, whitened[piece.key], rtol=1e-4, atol=1e-6)
        gain = piece.lora_A.norm(dim=1) / plain[piece.key].norm(dim=1)  # the same directions, rescaled per row
        torch.testing.assert_close(piece.lora_A, plain[piece.key] * gain[:, None], rtol=1e-4, atol=1e-6)
        if not piece.key.endswith("up_proj"):  # PEFT's = plain / s^(3/2), ours = plain / s^(1/2)
            s_ = piece.lora_A.norm(dim=1) / whitened[piece.key].norm(dim=1)
            torch.testing.assert_close(gain**-2, s_, rtol=1e-3, atol=0)
        if piece.key.endswith("q_proj"):  # q, k and v share one PCA: the same rows, whitened once
            k = delta.pieces[piece.key.replace("q_proj", "k_proj").replace(".", "-")]
            torch.testing.assert_close(k.lora_A, piece.lora_A, rtol=0, atol=0)


def test_eva_refuses_batches_too_short_for_its_pca_instead_of_waiting_forever():
    """Each layer's PCA takes a batch only when it has rank x rho counted positions; with no such
    batch it waited for one forever (found by the type checker: the directions could be None)."""
    from helpers import assert_restored, snapshot

    model, _, _ = build("llama")
    short = [{"input_ids": torch.randint(3, 96, (1, 5))}]  # 5 positions; r=4, rho=2 needs 8
    before = snapshot(model)
    with pytest.raises(hd.ConfigError, match="at least 8 counted positions.*largest batch has 5"):
        hd.inits.eva(model, hd.LoRAConfig(r=4, targets=EVA_TARGETS, init="eva"), short, rho=2.0)
    assert_restored(model, before)
    assert not hd.deltas(model)
