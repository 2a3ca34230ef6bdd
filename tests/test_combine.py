"""hd.combine against PEFT's add_weighted_adapter on the same two adapters, loaded from PEFT files
(the reference), plus hand checks: task arithmetic cancels, DARE's masks have the right law."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same, outputs, snapshot
from tiny_models import build

import hookdelta as hd

peft = pytest.importorskip("peft")


def _peft_adapter(base, path, r, alpha, seed, targets):
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    )
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two PEFT LoRA adapters (different scales) on q/v and the embedding, ranks 4 and 4, and a rank-2 one."""
    root = tmp_path_factory.mktemp("combine")
    base, inputs, _ = build("llama")
    targets = ["q_proj", "v_proj", "embed_tokens"]
    _peft_adapter(base, root / "a", 4, 8, 1, targets)
    _peft_adapter(base, root / "b", 4, 2, 2, targets)
    _peft_adapter(base, root / "c", 2, 4, 3, targets)
    return root, base, inputs


PEFT_VERSION = tuple(int(part) for part in peft.__version__.split(".")[:2])


def _peft_combined(saved, names, weights, how, **kw):
    """PEFT's combination, the reference. hd.combine follows PEFT 0.21's arithmetic; older PEFT
    releases computed negative weights (before 0.19) and SVD merges (before 0.21) differently,
    so those cases are checked only against the releases that agree with 0.21."""
    needs = (0, 21) if "svd" in how else (0, 19) if min(weights) < 0 and how != "cat" else (0, 0)
    if needs > PEFT_VERSION:
        pytest.skip(
            f"PEFT {peft.__version__} combines {how!r} with weights {weights} differently; "
            f"the reference is PEFT >= {needs[0]}.{needs[1]}"
        )
    root, base, inputs = saved
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(root / n, adapter_name=n)
    model.add_weighted_adapter(names, weights, "mix", combination_type=how, **kw)
    model.set_adapter("mix")
    return model


def _ours(saved, names, weights, how, **kw):
    root, base, inputs = saved
    model = copy.deepcopy(base)
    for n in names:
        hd.load_peft(model, root / n, name=n)
    delta = hd.combine(model, dict(zip(names, weights, strict=True)), how=how, name="mix", **kw)
    hd.set_active(model, "mix")
    return model, delta


CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2}),
    ("svd", {"svd_clamp": 0.9}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.6}),
]


@pytest.mark.parametrize("weights", [[0.6, 0.4], [1.0, -1.0]])
@pytest.mark.parametrize("how, kw", CASES)
def test_equals_peft_add_weighted_adapter(saved, how, kw, weights):
    ref = _peft_combined(saved, ["a", "b"], weights, how, **kw)
    model, delta = _ours(saved, ["a", "b"], weights, how, **kw)
    inputs = saved[2]
    want = outputs(ref, inputs)
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)
    assert (want - outputs(saved[1], inputs)).abs().max() > 1e-3  # the combination does something
    # the sources are still there, as they were
    hd.set_active(model, "a")
    ref.set_adapter("a")
    torch.testing.assert_close(outputs(model, inputs), outputs(ref, inputs), rtol=1e-5, atol=1e-5)


def test_cat_sums_different_ranks_and_equals_peft(saved):
    ref = _peft_combined(saved, ["a", "c"], [0.5, 1.5], "cat")
    model, delta = _ours(saved, ["a", "c"], [0.5, 1.5], "cat")
    assert all(p.r == 6 for p in delta.pieces.values())
    torch.testing.assert_close(outputs(model, saved[2]), outputs(ref, saved[2]), rtol=1e-5, atol=1e-5)


def test_task_arithmetic_with_itself_cancels():
    model, inputs, targets = build("llama")
    base = outputs(model, inputs)
    d = hd.attach(model, hd.LoRAConfig(r=4, targets=targets), name="a")
    torch.nn.init.normal_(d.piece("model.layers.0.self_attn.q_proj").lora_B, std=0.5)
    torch.nn.init.normal_(d.piece("model.layers.1.self_attn.v_proj").lora_B, std=0.5)
    assert (outputs(model, inputs) - base).abs().max() > 1e-3
    hd.attach(model, d.config, name="b").load_state_dict(d.state_dict())
    for how in ("linear", "cat", "svd"):
        hd.combine(model, {"a": 1.0, "b": -1.0}, how=how, name=how)
        hd.set_active(model, how)
        torch.testing.assert_close(outputs(model, inputs), base, rtol=1e-5, atol=1e-5)
        hd.set_active(model, *hd.deltas(model))


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
def test_dare_draws_the_same_law_as_peft(saved, how):
    """DARE keeps each entry with probability `density`: the share of the combined factors'
    entries that come out zero follows the same law in both libraries (and for dare_linear, the
    share where only a's entry survived is density·(1-density), as the formula says)."""
    d = 0.5
    torch.manual_seed(0)
    ref = _peft_combined(saved, ["a", "b"], [0.6, 0.4], how, density=d)
    model, delta = _ours(saved, ["a", "b"], [0.6, 0.4], how, density=d, generator=torch.Generator().manual_seed(0))
    theirs = torch.cat([p.detach().flatten() for n, p in ref.named_parameters() if ".mix" in n])
    ours = torch.cat([p.detach().flatten() for p in delta.parameters()])
    assert ours.numel() == theirs.numel() > 800
    zero_ours, zero_theirs = (ours == 0).float().mean(), (theirs == 0).float().mean()
    assert abs(zero_ours - zero_theirs) < 0.06 and abs(zero_ours - (1 - d) ** 2) < 0.06
    if how == "dare_linear":  # entries equal to a's weighted entry alone (b dropped)
        a = hd.deltas(model)["a"]
        wa = (0.6 * a.piece("model.layers.0.self_attn.q_proj").scale) ** 0.5
        got = delta.piece("model.layers.0.self_attn.q_proj").lora_A.detach()
        only_a = torch.isclose(got, a.piece("model.layers.0.self_attn.q_proj").lora_A.detach() * wa / d, atol=1e-7)
        assert abs(only_a.float().mean() - d * (1 - d)) < 0.1


@pytest.mark.parametrize(
    "call, error, match",
    [
        (dict(weights={"a": 1.0}, how="average"), hd.ConfigError, "not one of"),
        (dict(weights={"zz": 1.0}), hd.DeltaStateError, "no delta named"),
        (dict(weights={}), hd.ConfigError, "delta name: weight"),
        (dict(weights={"a": "x"}), hd.ConfigError, "must be a finite number"),
        (dict(weights={"a": float("nan"), "b": 1.0}), hd.ConfigError, "must be a finite number, got nan"),
        (dict(weights={"a": 1.0, "b": float("-inf")}), hd.ConfigError, "must be a finite number, got -inf"),
        (dict(weights={"a": 1.0, "b": 1.0}, how="ties"), hd.ConfigError, "density"),
        (dict(weights={"a": 1.0, "c": 1.0}, how="linear"), hd.ConfigError, "equal ranks"),
        (dict(weights={"a": 1.0, "ia3": 1.0}), hd.UnsupportedModuleError, "combines LoRA"),
        (dict(weights={"a": 1.0, "dora": 1.0}), hd.UnsupportedModuleError, "DoRA"),
        (dict(weights={"a": 1.0, "k": 1.0}), hd.ConfigError, "same layers"),
        (dict(weights={"a": 1.0}, name="b"), hd.DeltaStateError, "already has"),
        (dict(weights={"a": 1.0}, how="svd", svd_rank=0), hd.ConfigError, "svd_rank"),
    ],
)
def test_refusals_leave_the_model_as_it_was(call, error, match):
    model, inputs, targets = build("llama")
    for name, cfg in [
        ("a", hd.LoRAConfig(r=4, targets=targets)),
        ("b", hd.LoRAConfig(r=4, targets=targets)),
        ("c", hd.LoRAConfig(r=2, targets=targets)),
        ("ia3", hd.IA3Config()),
        ("dora", hd.LoRAConfig(r=4, use_dora=True, targets=targets)),
        ("k", hd.LoRAConfig(r=4, targets=["k_proj"])),
    ]:
        hd.attach(model, cfg, name=name)
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        hd.combine(model, **call)
    assert_same(model, snap)


@pytest.mark.parametrize("arch, targets", [("gpt2", ["c_attn", "c_proj"]), ("bert", ["query", "value"])])
@pytest.mark.parametrize("how, kw", [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5})])
def test_equals_peft_on_other_architectures(tmp_path, arch, targets, how, kw):
    base, inputs, _ = build(arch)
    _peft_adapter(base, tmp_path / "a", 4, 8, 1, targets)
    _peft_adapter(base, tmp_path / "b", 4, 2, 2, targets)
    saved = (tmp_path, base, inputs)
    ref = _peft_combined(saved, ["a", "b"], [0.7, -0.4], how, **kw)
    model, _ = _ours(saved, ["a", "b"], [0.7, -0.4], how, **kw)
    want = outputs(ref, inputs)
    torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-5, atol=1e-5)
    assert (want - outputs(base, inputs)).abs().max() > 1e-4
