"""LoRA's initialisations (PiSSA, PiSSA with fast SVD, OLoRA, orthogonal) and lora_bias, against
PEFT's own: the same factors from the same weights; PiSSA / OLoRA applied as a frozen residual
delta, never by writing the base (so a fresh delta changes nothing and detach restores bits);
PEFT's converted files both ways on the original base."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_restored, snapshot
from tiny_models import build, main_output

import hookdelta as hd

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.lora

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def twin(model, arch, init, r=4, alpha=8, **kw):
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS[arch], init_lora_weights=init, fan_in_fan_out=arch == "gpt2", **kw
    )
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


def nudge(tensors, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


# (PEFT 0.21's OLoRA ignores fan_in_fan_out: on GPT-2's Conv1D it factors the [in, out] weight and
# gives lora_A the wrong shape, so that pair has no PEFT reference)
@pytest.mark.parametrize(
    "arch,init",
    [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "pissa_niter_4"), ("gpt2", "pissa_niter_4"), ("llama", "olora")],
)
def test_principal_inits_equal_peft_and_change_nothing_at_first(arch, init, tmp_path):
    model, inputs, _ = build(arch)
    bare, snap = out(model, inputs), snapshot(model)
    torch.manual_seed(1)
    theirs = twin(model, arch, init)
    torch.manual_seed(1)
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=TARGETS[arch], init=init))
    for piece in delta.pieces.values():
        layer = theirs.base_model.model.get_submodule(piece.key)
        torch.testing.assert_close(piece.lora_A, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(piece.lora_B, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(out(model, inputs), bare), "the residual delta adds exactly nothing while fresh"
    torch.testing.assert_close(out(theirs, inputs), bare, rtol=1e-4, atol=1e-5)  # PEFT: W_res + s·B·A ≈ W
    # the same training step on both: equal outputs (ours on W, PEFT's on its residual base)
    nudge([p.lora_A for p in delta.pieces.values()] + [p.lora_B for p in delta.pieces.values()])
    keys = [p.key for p in delta.pieces.values()]
    nudge(
        [theirs.base_model.model.get_submodule(k).lora_A["default"].weight for k in keys]
        + [theirs.base_model.model.get_submodule(k).lora_B["default"].weight for k in keys]
    )
    ours = out(model, inputs)
    assert not torch.allclose(ours, bare, atol=1e-4)
    torch.testing.assert_close(ours, out(theirs, inputs), rtol=1e-4, atol=1e-5)
    # merge is exact, detach restores the base bit for bit (nothing ever wrote it)
    delta.merge()
    torch.testing.assert_close(out(model, inputs), ours, rtol=1e-4, atol=1e-5)
    delta.unmerge()
    # saved in PEFT's format: a plain rank-2r LoRA on the ORIGINAL base, as PEFT's conversion writes
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(bare_model(arch)), tmp_path / "ours").eval()
    torch.testing.assert_close(out(back, inputs), ours, rtol=1e-4, atol=1e-5)
    # our own format keeps the frozen factors
    delta.save(tmp_path / "own")
    delta.detach()
    assert_restored(model, snap)
    hd.load(model, tmp_path / "own")
    torch.testing.assert_close(out(model, inputs), ours, rtol=0, atol=0)


def bare_model(arch):
    return build(arch)[0]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_files_of_principal_inits(init, tmp_path):
    """PEFT's converted file (path_initial_model_for_weight_conversion) loads onto the original
    base with PEFT's outputs; an unconverted one, meant for PEFT's modified base, is refused."""
    model, inputs, _ = build("llama")
    theirs = twin(model, "llama", init)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = init
    nudge([p for n, p in theirs.named_parameters() if "lora_" in n])
    expected = out(theirs, inputs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = copy.deepcopy(model)
    hd.load_peft(ours, tmp_path / "converted")
    torch.testing.assert_close(out(ours, inputs), expected, rtol=1e-4, atol=1e-5)
    theirs.save_pretrained(tmp_path / "raw")
    fresh = copy.deepcopy(model)
    with pytest.raises(hd.DeltaFileError, match="path_initial_model_for_weight_conversion"):
        hd.load_peft(fresh, tmp_path / "raw")
    assert not hd.deltas(fresh)


def test_orthogonal_init_equals_peft():
    model, inputs, _ = build("llama")
    torch.manual_seed(4)
    theirs = twin(model, "llama", "orthogonal")
    torch.manual_seed(4)
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=TARGETS["llama"], init="orthogonal"))
    for piece in delta.pieces.values():
        layer = theirs.base_model.model.get_submodule(piece.key)
        torch.testing.assert_close(piece.lora_A, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(piece.lora_B, layer.lora_B["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(out(model, inputs), out(theirs, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg,error",
    [
        (dict(r=3, init="orthogonal", targets=["q_proj"]), hd.ConfigError),
        (dict(r=4, init="pissa", targets=["embed_tokens"]), hd.UnsupportedModuleError),
        (dict(r=4, init="pissa_niter_0"), hd.ConfigError),
        (dict(r=4, init="pissa", use_dora=True), hd.ConfigError),
    ],
)
def test_inits_refused_clearly(cfg, error):
    model, _, _ = build("llama")
    snap = snapshot(model)
    with pytest.raises(error, match="init|rank"):
        hd.attach(model, hd.LoRAConfig(**cfg))
    assert_restored(model, snap)


def test_lora_bias_both_ways_with_peft(tmp_path):
    """PEFT's lora_bias (a trainable bias on B) is hookdelta's bias='lora_only'."""
    model, inputs, _ = build("llama")
    theirs = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True)
    )
    nudge([p for n, p in theirs.named_parameters() if "lora_" in n])
    theirs.save_pretrained(tmp_path / "theirs")
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path / "theirs")
    assert delta.config.bias == "lora_only"
    a, b = main_output(theirs(**inputs)), main_output(ours(**inputs))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for piece in delta.pieces.values():
        layer = theirs.base_model.model.get_submodule(piece.key)
        torch.testing.assert_close(piece.lora_bias.grad, layer.lora_B["default"].bias.grad, rtol=1e-5, atol=1e-7)
    nudge([p.lora_bias for p in delta.pieces.values()], seed=8)
    expected = out(ours, inputs)
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(out(back, inputs), expected, rtol=1e-5, atol=1e-5)
