"""Deltas on quantized bases (QLoRA and friends), on CPU: bitsandbytes 4-bit (nf4, fp4) and
8-bit, torchao int8 weight-only, HQQ. A delta sees only the layer's input and output, so the
references here are the layer's own dequantized weight used by hand (W_deq·x + s·B·A·x) and
the same model dequantized in float32 with the same delta; the quantized storage must come
back bit for bit (state_dict bytes and quantization state) after detach and after unmerge.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf
from helpers import perturb, same_bits
from internals import forward_hooks, forward_pre_hooks

import hookdelta as hd
from hookdelta.quantized import dequantize_model, is_quantized

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = dict(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
BACKENDS = ["bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "hqq-4bit"]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()
    path = tmp_path_factory.mktemp("float")
    model.save_pretrained(path)
    return path


def inputs():
    return {"input_ids": torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))}


def quantized(kind: str, float_dir) -> nn.Module:
    if kind.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
        q = {
            "bnb-nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
            "bnb-fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
            "bnb-int8": dict(load_in_8bit=True),
        }[kind]
        return tf.LlamaForCausalLM.from_pretrained(
            float_dir, quantization_config=tf.BitsAndBytesConfig(**q), device_map="cpu"
        ).eval()
    model = tf.LlamaForCausalLM.from_pretrained(float_dir).eval()
    if kind == "torchao-int8":
        torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed")
        torchao.quantize_(model.model, torchao.Int8WeightOnlyConfig())
        return model
    hqq = pytest.importorskip("hqq.core.quantize", reason="hqq is not installed")
    for path, layer in list(model.model.named_modules()):
        if isinstance(layer, nn.Linear):
            owner, _, child = path.rpartition(".")
            q = hqq.HQQLinear(
                layer, hqq.BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
            )
            setattr(model.model.get_submodule(owner), child, q)
    return model


def storage(model: nn.Module) -> dict:
    """Everything the quantized model stores: state-dict tensors (packed bytes and quantization
    state), parameter identities, requires_grad flags and hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (tuple(forward_hooks(m)), tuple(forward_pre_hooks(m))) for n, m in model.named_modules()},
    }


def assert_storage(model: nn.Module, before: dict, hooks: bool = True) -> None:
    now = storage(model)
    assert now["ids"] == before["ids"] and now["flags"] == before["flags"]
    assert not hooks or now["hooks"] == before["hooks"]
    assert now["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert same_bits(now["tensors"][k], v), f"{k} changed"


def twin_on_dequantized(model: nn.Module, delta: hd.Delta) -> nn.Module:
    """The same model dequantized to float32 with a copy of the delta: the reference."""
    clone = copy.deepcopy(model)
    for d in list(hd.deltas(clone).values()):
        d.detach()
    dequantize_model(clone, torch.float32)
    twin = hd.attach(clone, delta.config)
    with torch.no_grad():
        for a, b in zip(twin.parameters(), delta.parameters(), strict=True):
            a.copy_(b.float())
    return clone


METHODS = {
    "lora": hd.LoRAConfig(r=4, targets="all-linear"),
    "dora": hd.LoRAConfig(r=4, use_dora=True),
    "ia3": hd.IA3Config(),
    "bitfit": hd.BitFitConfig(),
    "adapter": hd.AdapterConfig(bottleneck_dim=4),
}


@pytest.mark.parametrize("kind", BACKENDS)
def test_all_linear_selects_the_quantized_layers(kind, float_dir):
    model = quantized(kind, float_dir)
    plain = tf.LlamaForCausalLM.from_pretrained(float_dir)
    picked = hd.match(model, "all-linear")
    assert picked == hd.match(plain, "all-linear") and all(is_quantized(model.get_submodule(p)) for p in picked)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_deltas_on_quantized_layers_match_the_dequantized_model_and_train(kind, method, float_dir):
    model = quantized(kind, float_dir)
    x = inputs()
    with torch.no_grad():
        model(**x)  # an inference pass first (bitsandbytes repacks for CPU inference there)
    before = storage(model)
    delta = hd.attach(model, METHODS[method])
    assert all(p.is_floating_point() for p in delta.parameters())
    perturb(delta, std=0.05)
    with torch.no_grad():
        got = model(**x).logits.float()
        want = twin_on_dequantized(model, delta)(**x).logits
    tol = 5e-2 if kind == "bnb-nf4" else 2e-2 if kind == "bnb-int8" else 2e-3  # the layers' own compute precision
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    model.train()
    model(**x, labels=x["input_ids"]).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in delta.parameters())
    model.eval()
    delta.detach()
    assert_storage(model, before)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_lora_on_one_quantized_layer_is_the_formula(kind, float_dir):
    model = quantized(kind, float_dir)
    layer = model.model.layers[0].self_attn.q_proj
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["layers.0.self_attn.q_proj"]))
    perturb(delta, std=0.2)
    piece = delta.pieces["model-layers-0-self_attn-q_proj"]
    x = torch.randn(3, 128)
    with torch.no_grad():
        with delta.disabled():
            base = layer(x).float()
        want = base + 2.0 * F.linear(F.linear(x, piece.lora_A.float()), piece.lora_B.float())
        torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2)  # bf16 compute for nf4


@pytest.mark.parametrize("kind", BACKENDS)
def test_merge_into_quantized_weights_is_refused_by_default(kind, float_dir):
    model = quantized(kind, float_dir)
    delta = hd.attach(model, hd.LoRAConfig(r=4))
    perturb(delta)
    before = storage(model)
    with pytest.raises(hd.MergeError, match=r"quantized.*lossy.*requantize=True.*merged_copy"):
        delta.merge()
    with pytest.raises(hd.MergeError):
        delta.merge_and_detach()
    assert not delta.merged
    assert_storage(model, before)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8"])
def test_requantized_merge_reports_its_error_and_unmerges_exactly(kind, float_dir):
    model = quantized(kind, float_dir)
    x = inputs()
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta, std=0.02)
    with torch.no_grad():
        unmerged = model(**x).logits
    before = storage(model)
    if kind == "torchao-int8" and type(model.model.layers[0].mlp.up_proj.weight).__name__ != "Int8Tensor":
        with pytest.raises(hd.MergeError, match="torchao 0.18 and later"):  # older torchao: its older tensor type
            delta.merge(requantize=True)
        assert_storage(model, before)
        return
    report = delta.merge(requantize=True)
    assert set(report) == {p.key for p in delta.pieces.values()} and all(v >= 0 for v in report.values())
    assert max(report.values()) > 0, "requantizing rounds: the report is not vacuous"
    assert not any(is_quantized(m) and forward_hooks(m) for m in model.modules())
    with torch.no_grad():
        merged = model(**x).logits
    assert (merged.float() - unmerged.float()).abs().max() < 1.0
    delta.unmerge()
    assert_storage(model, before, hooks=False)  # (the delta's hooks came off and back on)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, unmerged)


def test_hqq_cannot_requantize_and_says_what_to_do(float_dir):
    model = quantized("hqq-4bit", float_dir)
    delta = hd.attach(model, hd.LoRAConfig(r=4))
    before = storage(model)
    with pytest.raises(hd.MergeError, match="cannot rebuild hqq HQQLinear.*merged_copy"):
        delta.merge(requantize=True)
    assert_storage(model, before)


@pytest.mark.parametrize("kind", BACKENDS)
def test_merged_copy_is_a_plain_model_with_the_delta_baked_in(kind, float_dir):
    model = quantized(kind, float_dir)
    x = inputs()
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(delta)
    before = storage(model)
    with torch.no_grad():
        unmerged = model(**x).logits.float()
        full = delta.merged_copy(torch.float32)
        assert not any(is_quantized(m) for m in full.modules()) and hd.deltas(full) == {}
        assert getattr(full.config, "quantization_config", None) is None
        torch.testing.assert_close(full(**x).logits, unmerged, rtol=0, atol=5e-2 if kind == "bnb-nf4" else 2e-2)
    assert delta.attached and not delta.merged
    assert_storage(model, before)


def test_the_cli_merges_a_quantized_checkpoint_into_a_plain_one(float_dir, tmp_path):
    model = quantized("bnb-nf4", float_dir)
    model.save_pretrained(tmp_path / "base4bit")
    delta = hd.attach(model, hd.LoRAConfig(r=4))
    perturb(delta)
    delta.save(tmp_path / "delta")
    want = delta.merged_copy(torch.bfloat16)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hookdelta",
            "merge",
            str(tmp_path / "base4bit"),
            str(tmp_path / "delta"),
            str(tmp_path / "merged"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    merged = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", torch_dtype="auto"
    )  # (4.x: float32 otherwise)
    assert merged.dtype == torch.bfloat16 and getattr(merged.config, "quantization_config", None) is None
    x = inputs()
    with torch.no_grad():
        assert torch.equal(merged(**x).logits, want(**x).logits)


def test_qlora_training_holds_no_dequantized_weight_for_backward(float_dir):
    model = quantized("bnb-nf4", float_dir)
    delta = hd.attach(model, hd.LoRAConfig(r=16, targets="all-linear"))
    full_sizes = {m.out_features * m.in_features for m in model.modules() if is_quantized(m)}
    saved = []

    def pack(t):  # the elements its storage holds (an expanded LoRA factor is not a full weight)
        saved.append((t.shape, t.dtype, t.untyped_storage().nbytes() // t.element_size()))
        return t

    model.train()
    x = inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**x, labels=x["input_ids"]).loss
    loss.backward()
    assert delta.pieces["model-layers-0-self_attn-q_proj"].lora_A.grad is not None
    held = [s for s in saved if s[1].is_floating_point and s[2] in full_sizes]
    assert not held, f"dequantized weights saved for backward: {held[:3]}"


def test_a_peft_qlora_adapter_loads_with_peft_outputs(float_dir, tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(
        quantized("bnb-nf4", float_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        want = theirs(**inputs()).logits
    theirs.save_pretrained(tmp_path)
    model = quantized("bnb-nf4", float_dir)
    hd.load_peft(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, want, rtol=0, atol=1e-2)


def test_bitsandbytes_packing_is_held_off_while_attached_and_given_back(float_dir):
    model = quantized("bnb-nf4", float_dir)
    layer = model.model.layers[0].self_attn.q_proj
    switch = layer.support_avx512bf16_for_cpu
    delta = hd.attach(model, hd.LoRAConfig(r=4))
    assert layer.support_avx512bf16_for_cpu is False
    delta.detach()
    assert layer.support_avx512bf16_for_cpu == switch


def test_a_bitsandbytes_release_without_the_cpu_unpacking_is_refused_clearly(float_dir, monkeypatch):
    """hookdelta reads bitsandbytes' CPU-packed 4-bit layout back with a private bitsandbytes
    function (hookdelta/compat.py). Where a release lacks it, a training forward over a layer
    packed before the attach is one clear UnsupportedModuleError, and inference still runs."""
    import hookdelta.compat as compat

    model = quantized("bnb-nf4", float_dir)
    x = inputs()
    with torch.no_grad():
        model(**x)  # inference first: bitsandbytes repacks here, where the CPU supports it
    layer = model.model.layers[0].self_attn.q_proj
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU or bitsandbytes release does not repack 4-bit weights for inference")
    monkeypatch.setattr(compat, "BNB_CPU_UNPACK", "bitsandbytes.functional.no_such_inverse")
    delta = hd.attach(model, hd.LoRAConfig(r=4))
    perturb(delta, std=0.05)
    with torch.no_grad():
        assert torch.isfinite(model(**x).logits).all()
    model.train()
    with pytest.raises(hd.UnsupportedModuleError, match=r"repacked by bitsandbytes .* no no_such_inverse"):
        model(**x, labels=x["input_ids"])
    monkeypatch.undo()
    model(**x, labels=x["input_ids"]).loss.backward()  # with the function there, the same call trains
    assert all(p.grad is not None for p in delta.parameters())
