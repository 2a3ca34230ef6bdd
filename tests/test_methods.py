"""The shared checks (DESIGN.md testing pattern) for every delta method of the family, on
tiny random BERT, GPT-2, Llama, T5 and OPT models: a fresh delta changes nothing, gradients
reach exactly the delta's tensors, training lowers a loss, merge is exact or refused,
detach restores bit-for-bit, save -> load reproduces outputs, and each method stacks with
a LoRA and detaches independently."""

import io

import pytest
import torch
from helpers import assert_restored, assert_same, outputs, perturb, snapshot
from rich.console import Console
from tiny_models import build, main_output

import hookdelta as hd

FIVE = ["bert", "gpt2", "llama", "t5", "opt"]

# method id -> (config, architectures, mergeable, no-op when fresh)
METHODS = {
    "adapter": (lambda: hd.AdapterConfig(bottleneck_dim=8), FIVE, False, True),
    "adapter_pfeiffer": (
        lambda: hd.AdapterConfig(bottleneck_dim=8, placement="pfeiffer", non_linearity="gelu"),
        FIVE,
        False,
        True,
    ),
    "parallel_adapter": (lambda: hd.ParallelAdapterConfig(bottleneck_dim=8), FIVE, False, True),
    "low_rank_adapter": (lambda: hd.LowRankAdapterConfig(bottleneck_dim=8, rank=2), FIVE, False, True),
    "compacter": (lambda: hd.CompacterConfig(bottleneck_dim=8, phm_dim=4), FIVE, False, True),
    "bitfit": (lambda: hd.BitFitConfig(), FIVE, None, True),  # merge: where every site has a bias
    "ia3": (lambda: hd.IA3Config(), FIVE, True, True),
    "ln_tuning": (lambda: hd.LNTuningConfig(), FIVE, True, True),
    "dora": (lambda: hd.LoRAConfig(r=4, alpha=8, use_dora=True), FIVE, True, True),
    "loha": (lambda: hd.LoHaConfig(r=2, alpha=4), FIVE, True, True),
    "lokr": (lambda: hd.LoKrConfig(r=2, alpha=4), FIVE, True, True),
    "pissa": (lambda: hd.LoRAConfig(r=2, alpha=4, init="pissa"), FIVE, True, True),
    "vera": (lambda: hd.VeRAConfig(r=4), FIVE, True, True),
    "trainable_tokens": (lambda: hd.TrainableTokensConfig(token_indices=list(range(60))), FIVE, True, True),
    "loreft": (lambda: hd.LoReFTConfig(r=2, positions="f1+l1"), FIVE, False, False),
    "direft": (lambda: hd.DiReFTConfig(r=2, positions="f2+l1"), FIVE, False, False),
    "oft": (lambda: hd.OFTConfig(oft_block_size=8), FIVE, True, True),
    "fourierft": (lambda: hd.FourierFTConfig(n_frequency=24, scaling=20.0, init_weights=True), FIVE, True, True),
    "hira": (lambda: hd.HiRAConfig(r=4), FIVE, True, True),
    "delora": (lambda: hd.DeLoRAConfig(r=4, delora_lambda=2.0), FIVE, True, True),
    "gralora": (lambda: hd.GraLoRAConfig(r=4, gralora_k=2, alpha=8.0), FIVE, True, True),
    "miss": (lambda: hd.MiSSConfig(r=4), FIVE, True, True),
    "c3a": (lambda: hd.C3AConfig(block_size=8, init_weights="zero"), FIVE, True, True),
    "hra": (lambda: hd.HRAConfig(r=4), FIVE, True, False),  # (its cancelling pairs: the same up to rounding)
    "adalora": (lambda: hd.AdaLoRAConfig(init_r=4, target_r=2), FIVE, True, True),
    "road": (lambda: hd.RoAdConfig(group_size=8), FIVE, True, True),
    "road_4": (lambda: hd.RoAdConfig(variant="road_4", group_size=4), ["llama", "bert"], True, True),
    "vblora": (lambda: hd.VBLoRAConfig(r=2, vector_length=4, num_vectors=8), FIVE, True, False),
    "randlora": (lambda: hd.RandLoRAConfig(r=8, randlora_alpha=16.0), FIVE, True, True),
    "lily": (lambda: hd.LilyConfig(r=4, num_B=2, stride_A=2), FIVE, False, True),
    "shira": (lambda: hd.SHiRAConfig(r=2, random_seed=1), FIVE, True, True),
    "boft": (lambda: hd.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2), FIVE, True, True),
    "soft_prompt": (lambda: hd.SoftPromptConfig(num_virtual_tokens=3), FIVE, False, False),
    "llama_adapter": (lambda: hd.LlamaAdapterConfig(adapter_len=3, adapter_layers=2), ["llama", "gpt2"], False, True),
    "p_tuning": (lambda: hd.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8), FIVE, False, False),
    "p_tuning_lstm": (
        lambda: hd.PTuningConfig(num_virtual_tokens=3, encoder="LSTM", encoder_hidden_size=8),
        ["llama"],
        False,
        False,
    ),
    "prefix": (lambda: hd.PrefixConfig(num_virtual_tokens=3), ["bert", "gpt2", "llama", "opt"], False, False),
    "prefix_mlp": (
        lambda: hd.PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
        ["llama"],
        False,
        False,
    ),
}
MARK = {
    "road_4": "road",
    "p_tuning_lstm": "p_tuning",
    "pissa": "lora",
    "adapter_pfeiffer": "adapter",
    "prefix_mlp": "prefix",
    "loreft": "reft",
    "direft": "reft",
}

CASES = [
    pytest.param(m, a, id=f"{m}-{a}", marks=getattr(pytest.mark, MARK.get(m, m)))
    for m, (_, archs, _, _) in METHODS.items()
    for a in archs
]


def render(model):
    out = io.StringIO()
    hd.visualize(model, console=Console(file=out, width=160))
    return out.getvalue()


def last_position(out):
    return out.reshape(out.shape[0], -1, out.shape[-1])[:, -1]


@pytest.mark.parametrize("method,arch", CASES)
def test_lifecycle(method, arch, tmp_path):
    make, _, mergeable, noop = METHODS[method]
    model, inputs, _ = build(arch)
    snap = snapshot(model)
    bare = outputs(model, inputs)

    delta = hd.attach(model, make())
    if noop:  # zero-initialized (up-projection / bias / LoRA B zero, IA3 ones): no change at all
        assert torch.equal(outputs(model, inputs), bare)
    perturb(delta, std=0.3)
    out = outputs(model, inputs)
    assert not torch.allclose(last_position(out), last_position(bare)), "the perturbed delta must change the output"
    text = render(model)
    assert f"({delta.method})" in text, "the tree shows the delta on its sites"

    with delta.disabled():
        assert torch.equal(outputs(model, inputs), bare)
    assert torch.equal(outputs(model, inputs), out)

    # merge: exact (within rounding) where the method is linear in the weights, refused elsewhere
    has_bias = all(getattr(model.get_submodule(s), "bias", None) is not None for s in delta.sites)
    can_merge = mergeable if mergeable is not None else has_bias
    if can_merge:
        delta.merge()
        torch.testing.assert_close(outputs(model, inputs), out, rtol=1e-4, atol=1e-5)
        delta.unmerge()
        assert torch.equal(outputs(model, inputs), out)
    else:
        before = snapshot(model)
        with pytest.raises(hd.MergeError):
            delta.merge()
        assert_same(model, before)
        assert torch.equal(outputs(model, inputs), out)

    delta.save(tmp_path / "d")
    delta.detach()
    assert_restored(model, snap)
    loaded = hd.load(model, tmp_path / "d")
    assert torch.equal(outputs(model, inputs), out), "save -> load must reproduce the outputs exactly"
    loaded.detach()
    assert_restored(model, snap)


@pytest.mark.parametrize("method,arch", CASES)
def test_gradients_reach_only_the_delta_and_training_lowers_the_loss(method, arch):
    make = METHODS[method][0]
    model, inputs, _ = build(arch)
    delta = hd.attach(model, make())
    perturb(delta, std=0.3)
    target = torch.randn_like(last_position(outputs(model, inputs)), generator=None)

    def loss():
        return (last_position(main_output(model(**inputs))) - target).pow(2).mean()

    loss().backward()
    mine = {id(p) for p in delta.parameters()}
    for name, p in model.named_parameters():
        if id(p) in mine:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"backbone parameter {name} got a gradient"

    opt = torch.optim.Adam(delta.parameters(), lr=1e-2)
    first = loss().item()
    for _ in range(10):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < first


@pytest.mark.parametrize("first_out", [True, False], ids=["method-out-first", "lora-out-first"])
@pytest.mark.parametrize("method,arch", [c for c in CASES if c.values[1] in ("llama", "t5")])
def test_stacks_with_lora_and_detaches_independently(method, arch, first_out):
    make = METHODS[method][0]
    model, inputs, _ = build(arch)
    snap = snapshot(model)
    bare = outputs(model, inputs)
    first = hd.attach(model, make())
    perturb(first, std=0.3, seed=1)
    only_first = outputs(model, inputs)
    lora = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    perturb(lora, std=0.3, seed=2)
    both = outputs(model, inputs)
    assert not torch.allclose(last_position(both), last_position(only_first))
    with first.disabled():
        only_lora = outputs(model, inputs)
    assert not torch.allclose(last_position(only_lora), last_position(bare))
    if first_out:
        first.detach()
        assert torch.equal(outputs(model, inputs), only_lora)
        lora.detach()
    else:
        lora.detach()
        assert torch.equal(outputs(model, inputs), only_first)
        first.detach()
    assert_restored(model, snap)


@pytest.mark.ia3
def test_ia3_with_callable_selectors_saves_and_loads(tmp_path):
    model, inputs, _ = build("llama")
    d = hd.attach(
        model,
        hd.IA3Config(
            targets=lambda n, m: n.endswith("v_proj"), feedforward_targets=lambda n, m: n.endswith("down_proj")
        ),
    )
    perturb(d, std=0.3)
    out = outputs(model, inputs)
    d.save(tmp_path / "d")
    d.detach()
    loaded = hd.load(model, tmp_path / "d")
    assert {p.key: p.on_input for p in loaded.pieces.values()} == {p.key: p.on_input for p in d.pieces.values()}
    assert torch.equal(outputs(model, inputs), out)


@pytest.mark.parametrize(
    "first,second,merge,allowed",
    [
        ("lora", "ia3", "lora", True),  # IA3 attached later wraps LoRA's sum: merging LoRA below it keeps l⊙(Wx+BAx)
        ("lora", "ia3", "ia3", False),  # merging IA3 would give lW·x + BAx instead of l⊙(Wx + BAx)
        ("ia3", "lora", "ia3", True),  # l⊙Wx + BAx either way
        ("ia3", "lora", "lora", False),  # merging LoRA would scale its term by l
        ("lora", "bitfit", "lora", True),  # two additive terms commute
        ("bitfit", "lora", "lora", True),
        ("lora", "dora", "lora", False),  # DoRA reads the weight: a merge below it changes its norm
    ],
)
def test_merge_in_a_stack_is_exact_or_refused(first, second, merge, allowed):
    """Merging one of two deltas on the same layers keeps the output (checked against the
    unmerged stack), or is refused with the model unchanged."""
    make = {
        "lora": lambda: hd.LoRAConfig(r=2, targets="layer"),
        "ia3": lambda: hd.IA3Config(targets="layer"),
        "bitfit": lambda: hd.BitFitConfig(targets="layer"),
        "dora": lambda: hd.LoRAConfig(r=2, targets="layer", use_dora=True),
    }
    from tiny_models import Holder

    torch.manual_seed(0)
    model, x = Holder(torch.nn.Linear(6, 5)), torch.randn(3, 6)
    deltas = {}
    for i, kind in enumerate((first, second)):
        deltas[kind] = hd.attach(model, make[kind](), name=f"{kind}{i}")
        perturb(deltas[kind], std=0.4, seed=i)
    with torch.no_grad():
        stacked = model(x)
    before = snapshot(model)
    if allowed:
        deltas[merge].merge()
        with torch.no_grad():
            torch.testing.assert_close(model(x), stacked, rtol=1e-5, atol=1e-6)
        deltas[merge].unmerge()
        assert torch.equal(model.layer.weight, before["params"]["layer.weight"])
        with torch.no_grad():
            assert torch.equal(model(x), stacked)
    else:
        with pytest.raises(hd.MergeError, match="does not commute"):
            deltas[merge].merge()
        assert_same(model, before)
