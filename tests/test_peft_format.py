"""PEFT's adapter files both ways, with PEFT itself as the reference: adapters saved by PEFT
load into hookdelta with PEFT's outputs; hookdelta's save_peft loads into PEFT with ours."""

import copy
import json
import warnings

import pytest
import torch
import transformers as tf
from helpers import assert_restored, outputs, perturb, snapshot
from tiny_models import TEXT, build

import hookdelta as hd

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.lora, pytest.mark.filterwarnings("ignore:The following rank_pattern keys")]

CASES = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"]),
}
VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "patterns": dict(rank_pattern={"layers?.1.*": 2, "h.1.*": 2}, alpha_pattern={"0.*": 3.0}),
}


def peft_adapter(arch, variant, tmp_path, seed=3):
    """A PEFT LoRA adapter with random (non-zero) weights, saved; returns (dir, PeftModel)."""
    model, inputs, _ = build(arch)
    kw = {**CASES[arch], **VARIANTS[variant]}
    if variant == "dora" and arch == "bert":
        kw["target_modules"] = ["query", "value"]  # PEFT's DoRA on embeddings is its own variant
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", pm.eval(), inputs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(CASES))
def test_peft_adapter_loads_with_peft_outputs(arch, variant, tmp_path):
    directory, pm, inputs = peft_adapter(arch, variant, tmp_path)
    expected = outputs(pm, inputs)
    model = build(arch)[0]
    snap = snapshot(model)
    delta = hd.load_peft(model, directory)
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=1e-5, atol=1e-5)
    delta.detach()
    assert_restored(model, snap)


@pytest.mark.parametrize("variant", ["lora", "dora", "patterns"])
@pytest.mark.parametrize("arch", list(CASES))
def test_save_peft_loads_in_peft_and_round_trips(arch, variant, tmp_path):
    directory, _, inputs = peft_adapter(arch, variant, tmp_path)
    model = build(arch)[0]
    first = hd.load_peft(model, directory)
    ours = outputs(model, inputs)
    first.save_peft(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(arch)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(theirs, inputs), ours, rtol=1e-5, atol=1e-5)
    # hookdelta -> PEFT -> hookdelta is lossless
    theirs.save_pretrained(tmp_path / "again")
    first.detach()
    second = hd.load_peft(model, tmp_path / "again")
    assert torch.equal(outputs(model, inputs), ours)
    for key, piece in second.pieces.items():
        for name, t in piece.state_dict().items():
            assert torch.equal(t, first.pieces[key].state_dict()[name])


def test_hookdelta_trained_delta_saves_for_peft(tmp_path):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=16, targets=["q_proj", "o_proj"], use_rslora=True))
    perturb(delta, std=0.2)
    delta.save_peft(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    theirs = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "p").eval()
    torch.testing.assert_close(outputs(theirs, inputs), outputs(model, inputs), rtol=1e-5, atol=1e-5)


def test_wrapper_prefix_is_resolved_and_said(tmp_path):
    """An adapter trained on LlamaForCausalLM loads onto the bare LlamaModel, and the reverse."""
    directory, pm, inputs = peft_adapter("llama", "lora", tmp_path)
    full = build("llama")[0]
    bare = copy.deepcopy(full.model)
    with pytest.warns(hd.PathPrefixWarning, match="without the 'model.' prefix"):
        d = hd.load_peft(bare, directory)
    assert d.sites[0].startswith("layers.0.")
    d.save_peft(tmp_path / "bare")
    with pytest.warns(hd.PathPrefixWarning, match="with the 'model.' prefix"):
        back = hd.load_peft(full, tmp_path / "bare")
    torch.testing.assert_close(outputs(full, inputs), outputs(pm, inputs), rtol=1e-5, atol=1e-5)
    back.detach()


def test_adapter_for_another_model_is_refused_with_the_paths(tmp_path):
    directory, _, _ = peft_adapter("llama", "lora", tmp_path)
    model = build("bert")[0]
    snap = snapshot(model)
    with pytest.raises(hd.DeltaFileError, match="no module at .*q_proj"):
        hd.load_peft(model, directory)
    assert_restored(model, snap)


def test_adapter_for_another_size_is_refused(tmp_path):
    directory, _, _ = peft_adapter("llama", "lora", tmp_path)
    wide = tf.LlamaForCausalLM(
        tf.LlamaConfig(**{**TEXT, "hidden_size": 48}, num_key_value_heads=2, max_position_embeddings=32)
    )
    snap = snapshot(wide)
    with pytest.raises(hd.DeltaFileError, match="shape"):
        hd.load_peft(wide, directory)
    assert_restored(wide, snap)


@pytest.mark.parametrize(
    "field,value",
    [
        ("use_qalora", True),
        ("layer_replication", [[0, 1]]),
        ("bias", "all"),
        ("init_lora_weights", "pissa"),
        ("trainable_token_indices", [1, 2]),
    ],
)
def test_unsupported_peft_fields_are_named(field, value, tmp_path):
    directory, _, _ = peft_adapter("llama", "lora", tmp_path)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(hd.DeltaFileError, match=field):
        hd.load_peft(build("llama")[0], directory)


def test_other_peft_types_and_pickles(tmp_path):
    directory, _, _ = peft_adapter("llama", "lora", tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "POLY"}))
    with pytest.raises(hd.DeltaFileError, match="POLY"):
        hd.load_peft(build("llama")[0], directory)
    (directory / "adapter_config.json").write_text(json.dumps(config))

    # a .bin that only holds tensors loads through the weights-only unpickler
    from safetensors.torch import load_file

    tensors = load_file(directory / "adapter_model.safetensors")
    (directory / "adapter_model.safetensors").unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    model, inputs, _ = build("llama")
    hd.load_peft(model, directory).detach()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, directory / "adapter_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(hd.DeltaFileError, match="unpickling"):
            hd.load_peft(model, directory)
    assert not hd.deltas(model)


def assert_both_ways(pm, arch, inputs, method, tmp_path):
    """PEFT's saved adapter loads into hookdelta with PEFT's outputs, and hookdelta's
    save_peft loads back into PEFT with the same outputs."""
    pm.save_pretrained(tmp_path / "peft")
    expected = outputs(pm.eval(), inputs)
    ours = build(arch)[0]
    delta = hd.load_peft(ours, tmp_path / "peft")
    assert delta.method == method
    torch.testing.assert_close(outputs(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    delta.save_peft(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(arch)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(theirs, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.p_tuning
@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_is_peft_prompt_encoder_and_its_files_go_both_ways(encoder, tmp_path):
    """PEFT's trainable P-tuning model and ours with PEFT's encoder tensors copied in: same outputs
    and gradients; PEFT's file (the encoder's output) loads as that prompt, and ours loads in PEFT."""
    model, inputs, _ = build("llama")
    pm = peft.get_peft_model(
        copy.deepcopy(model),
        peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=12, encoder_reparameterization_type=encoder
        ),
    )
    ours = copy.deepcopy(model)
    delta = hd.attach(ours, hd.PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden_size=12))
    (piece,) = delta.pieces.values()
    theirs = dict(pm.prompt_encoder["default"].named_parameters())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, t in piece.named_parameters():
            source = theirs["embedding.weight" if name == "prompt_embedding" else name]
            source.copy_(torch.randn(source.shape, generator=g) * 0.5)
            t.copy_(source)
    labels = inputs["input_ids"]
    a, b = pm(**inputs, labels=labels), ours(**inputs, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    a.loss.backward(), b.loss.backward()
    for name, t in piece.named_parameters():
        want = theirs["embedding.weight" if name == "prompt_embedding" else name].grad
        torch.testing.assert_close(t.grad, want, rtol=1e-4, atol=1e-6, msg=name)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = outputs(ours, inputs)
    fresh = build("llama")[0]
    loaded = hd.load_peft(fresh, tmp_path / "peft")
    assert loaded.method == "soft_prompt"  # the file holds the encoder's output only
    torch.testing.assert_close(outputs(fresh, inputs), expected, rtol=1e-5, atol=1e-5)
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(back, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.ia3
@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
        (
            "gpt2",
            dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
        ),
    ],
)
def test_ia3_adapters_both_ways(arch, kw, tmp_path):
    model, inputs, _ = build(arch)
    pm = peft.get_peft_model(model, peft.IA3Config(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    assert_both_ways(pm, arch, inputs, "ia3", tmp_path)


@pytest.mark.soft_prompt
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_prompt_tuning_adapters_both_ways(arch, tmp_path):
    model, inputs, _ = build(arch)
    task = "CAUSAL_LM" if arch == "llama" else "SEQ_CLS"
    pm = peft.get_peft_model(model, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    assert_both_ways(pm, arch, inputs, "soft_prompt", tmp_path)
