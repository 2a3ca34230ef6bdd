"""Mixture-of-experts layers (issue 27): the experts are first-class sites.

- roles: on every MoE type transformers ships here, ffn.in / ffn.out name the experts (fused 3-D
  tensors on transformers 5, nn.Linear per expert on 4.x), `ffn` the mixture block and
  `moe.router` the router; checked against the config (hidden size, expert count), not against
  hookdelta's own reading;
- the methods' defaults act on the experts (IA3 per expert, adapters after the mixture block);
- a LoRA on fused experts equals the per-expert formula written out here, forward and backward,
  under each of transformers' experts implementations, without building W + s·B·A;
- PEFT's target_parameters files both ways, the per-expert (vLLM) layout, and the lifecycle:
  merge / unmerge bit-exact, save / load, hot-swap, combine, detach; router-only tuning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from helpers import assert_restored, perturb, snapshot
from safetensors.torch import load_file
from test_roles import build as build_type
from tiny_models import build

import hookdelta as hd
from hookdelta import ops

pytestmark = pytest.mark.filterwarnings("ignore")

# every model type with a mixture-of-experts layer that builds from a tiny config here (the
# newer ones exist only in newer transformers releases: skipped where the release lacks them)
MOE_TYPES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
    "minimax",
    "deepseek_v2",
    "deepseek_v3",
    "jamba",
    "gpt_oss",
    "glm4_moe",
    "ernie4_5_moe",
    "llama4_text",
    "jetmoe",
    "switch_transformers",
    "qwen3_vl_moe_text",
    "exaone_moe",
    "cohere2_moe",
    "minimax_m2",
    "hy_v3",
    "solar_open",
    "lara_mini",
]
# (qwen3_next, granitemoehybrid, nemotron_h and dbrx need hybrid or nested configs that the generic
# shrinking does not give; their roles were checked by hand when this list was made)
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
SMALL = {
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 32,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}

MOE_FIXES = {
    "deepseek_v2": dict(
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        num_key_value_heads=4,
        head_dim=4,
        qk_head_dim=12,
        num_experts_per_tok=2,
        n_routed_experts=4,
        moe_intermediate_size=16,
    )
}


def moe_model(model_type: str):
    """A tiny model of the type with 4 experts, top-2 (test_roles' shrinking plus the MoE sizes)."""
    try:
        config = tf.AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        pytest.skip(f"transformers {tf.__version__} has no model type {model_type!r}")
    from test_roles import FIXES

    before = FIXES.get(model_type)
    FIXES[model_type] = {
        **{k: v for k, v in SMALL.items() if _has(config, k)},
        **MOE_FIXES.get(model_type, {}),
        **(before or {}),
    }
    try:
        try:
            return build_type(model_type)
        except (AttributeError, TypeError, ValueError) as exc:  # (transformers' own code, before any hookdelta)
            pytest.skip(f"transformers {tf.__version__} cannot build {model_type!r} from its default config: {exc}")
    finally:
        FIXES.pop(model_type) if before is None else FIXES.__setitem__(model_type, before)


def _has(config, name) -> bool:
    try:
        return isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool)
    except Exception:  # noqa: BLE001 (per-layer configs refuse a global read, in their own ways)
        return False


def _experts(model) -> set[int]:
    out = set()
    for c in [model.config] + [v for v in vars(model.config).values() if isinstance(v, tf.PretrainedConfig)]:
        out |= {getattr(c, n) for n in EXPERT_COUNTS if _has(c, n)}
    return out


def _is_module(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _sides(model, path: str) -> tuple[set[int], set[int]]:
    """The possible (input, output) widths of a role's path: a linear layer's, or a fused
    tensor's two trailing dims either way round (its orientation is checked through the output)."""
    if _is_module(model, path):
        w = model.get_submodule(path).weight
        return {w.shape[1]}, {w.shape[0]}
    owner, _, name = path.rpartition(".")
    w = getattr(model.get_submodule(owner), name)
    return {w.shape[-1], w.shape[-2]}, {w.shape[-1], w.shape[-2]}


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_roles_name_the_experts_the_mixture_block_and_the_router(model_type):
    model, inputs = moe_model(model_type)
    width, experts = model.config.hidden_size, _experts(model)
    found = hd.roles(model)
    fused = [p for r in ("ffn.in", "ffn.out") for p in found.get(r, []) if not _is_module(model, p)]
    expert_layers = [p for r in ("ffn.in", "ffn.out") for p in found.get(r, []) if ".experts." in f".{p}."]
    assert fused or expert_layers, f"no expert among ffn.in / ffn.out: {found.get('ffn.in')}"
    for path in fused:  # a fused tensor: one matrix per expert, reading or writing the model's width
        w = dict(model.named_parameters())[path]
        assert w.dim() == 3 and w.shape[0] in experts, (path, tuple(w.shape))
        assert width in w.shape[1:], (path, tuple(w.shape), width)
    for role in ("ffn.in", "ffn.out"):
        for path in found[role]:
            ins, outs = _sides(model, path)
            assert width in (ins if role == "ffn.in" else outs), (role, path, ins, outs)
    mixtures = [m for m in found["ffn"] if any(p.startswith(m + ".") for p in fused + expert_layers)]
    assert mixtures, found["ffn"]
    for path in found.get("moe.router", []):  # width -> one logit per expert
        w = model.get_submodule(path).weight if _is_module(model, path) else dict(model.named_parameters())[path]
        assert tuple(w.shape) in {(e, width) for e in experts}, (path, tuple(w.shape))
    # the defaults that name the feed-forward act on the experts: IA3 rescales each expert's input to its
    # output projection, a Houlsby adapter sits after the mixture block
    snap = snapshot(model)
    with torch.no_grad():
        bare = _first(model(**inputs))
    for cfg in (hd.IA3Config(), hd.AdapterConfig(bottleneck_dim=4), hd.LoRAConfig(r=2, targets=["ffn.in", "ffn.out"])):
        delta = hd.attach(model, cfg)
        sites = set(delta.sites)
        if isinstance(cfg, hd.IA3Config):
            assert sites & set(found["ffn.out"]), sites
        elif isinstance(cfg, hd.AdapterConfig):
            assert sites & set(mixtures) or sites & set(found["ffn.out"]), sites
        else:
            assert set(found["ffn.in"]) | set(found["ffn.out"]) <= sites
        perturb(delta, std=0.3)
        with torch.no_grad():
            assert not torch.allclose(_first(model(**inputs)), bare, atol=1e-5), f"{type(cfg).__name__} changed nothing"
        delta.detach()
        assert_restored(model, snap)


def _first(out):
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out[0]


def test_visualize_shows_the_expert_roles():
    from rich.console import Console

    model, _, _ = build("mixtral")
    console = Console(record=True, width=250)
    hd.visualize(model, show_roles=True, console=console)
    text = console.export_text()
    fused = hasattr(model, "set_experts_implementation")  # transformers 5: parameters of the experts module
    assert ("⟨ffn.in: gate_up_proj⟩" if fused else "⟨ffn.in⟩") in text
    assert ("⟨ffn.out: down_proj⟩" if fused else "⟨ffn.out⟩") in text
    assert ("⟨moe.router: weight⟩" if fused else "⟨moe.router⟩") in text and "⟨ffn⟩" in text


def test_methods_that_cannot_take_fused_experts_say_so_and_leave_the_model_untouched():
    model, _, _ = build("mixtral")
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("transformers 4 keeps one nn.Linear per expert: every method takes them")
    snap = snapshot(model)
    for cfg in (
        hd.LoHaConfig(targets="ffn.in"),
        hd.OFTConfig(oft_block_size=4, targets="ffn.out"),
        hd.BitFitConfig(targets="ffn.in"),
    ):
        with pytest.raises(hd.UnsupportedModuleError, match="fused experts tensor.*LoRA.*IA3 adapt it per expert"):
            hd.attach(model, cfg)
        assert_restored(model, snap)


# -- the formula per expert, forward and backward ---------------------------------------------------


def fused_mixtral(implementation: str = "grouped_mm"):
    model, inputs, _ = build("mixtral")
    if not hasattr(model, "set_experts_implementation"):
        pytest.skip("transformers 4 keeps one nn.Linear per expert (a plain LoRA on each: tested elsewhere)")
    model.set_experts_implementation(implementation)
    return model, inputs


def experts_by_hand(block, x, lora: dict):
    """The mixture block written out: the router's top-k per token, then for each token and chosen
    expert e, act(x·(W_gu[e] + s·B·A)ᵀ) split into gate and up, times the routing weight, through
    W_down[e] + s·B·A. One token at a time, in float64."""
    d = x.shape[-1]
    flat = x.reshape(-1, d).double()
    logits = flat @ block.gate.weight.double().T
    probs = logits.softmax(-1)
    top, idx = probs.topk(block.gate.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    ex = block.experts
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            w_gu, w_dn = ex.gate_up_proj[e].double(), ex.down_proj[e].double()
            for name in ("gate_up_proj", "down_proj"):
                a, b, s = lora[name]
                if name == "gate_up_proj":
                    w_gu = w_gu + s * b[e].double() @ a[e].double()
                else:
                    w_dn = w_dn + s * b[e].double() @ a[e].double()
            gate, up = (flat[t] @ w_gu.T).chunk(2)
            out[t] += top[t, k] * ((torch.nn.functional.silu(gate) * up) @ w_dn.T)
    return out.reshape(x.shape)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_a_lora_on_fused_experts_is_the_per_expert_formula_forward_and_backward(implementation, monkeypatch):
    model, _ = fused_mixtral(implementation)
    block = model.model.layers[0].mlp
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["ffn.in", "ffn.out"], layers=[0]))
    perturb(delta, std=0.2)
    built = []  # the fast path never builds W + s·B·A
    monkeypatch.setattr(ops.LowRankWeight, "value", lambda self: built.append(1) or self.base)
    x = torch.randn(2, 5, block.experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(3))
    got = block(x)
    assert built == []
    pieces = {p.param_name: p for p in delta.pieces.values()}
    lora = {n: (p.lora_A, p.lora_B, float(p.scale)) for n, p in pieces.items()}
    want = experts_by_hand(block, x, {n: (a.detach(), b.detach(), s) for n, (a, b, s) in lora.items()})
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)  # (float32 sums against float64)
    # backward: the gradients of the factors against autograd through the formula (float64)
    got.square().sum().backward()
    leaves = {
        n: (a.detach().double().requires_grad_(), b.detach().double().requires_grad_(), s)
        for n, (a, b, s) in lora.items()
    }
    experts_by_hand(block, x, leaves).square().sum().backward()
    for n, p in pieces.items():
        for got_g, want_g in ((p.lora_A.grad, leaves[n][0].grad), (p.lora_B.grad, leaves[n][1].grad)):
            # float32 sums of many terms against float64: a relative error of the largest gradient
            torch.testing.assert_close(got_g.double(), want_g, rtol=1e-4, atol=1e-5 * want_g.abs().max().item())


def test_dora_and_ia3_on_fused_experts_are_their_per_expert_formulas():
    model, _ = fused_mixtral("eager")
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, block.experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(4))
    snap = snapshot(model)
    dora = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["ffn.in", "ffn.out"], layers=[0], use_dora=True))
    perturb(dora, std=0.2)
    with torch.no_grad():
        got = block(x)
    factors = {
        p.param_name: (p.lora_A.detach(), p.lora_B.detach(), float(p.scale), p.magnitude.detach())
        for p in dora.pieces.values()
    }
    dora.detach()
    assert_restored(model, snap)
    with torch.no_grad():  # m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per expert and output row
        for name, (a, b, scale, m) in factors.items():
            w = getattr(block.experts, name)
            updated = w.double() + scale * b.double() @ a.double()
            w.copy_(updated * (m.double() / updated.norm(dim=-1)).unsqueeze(-1))
        want = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model, _ = fused_mixtral("eager")
    block = model.model.layers[0].mlp
    ia3 = hd.attach(model, hd.IA3Config(targets="attn.k", feedforward_targets="ffn.out", layers=[0]))
    perturb(ia3, std=0.3)
    piece = next(p for p in ia3.pieces.values() if p.key.endswith("down_proj"))
    with torch.no_grad():
        got = block(x)
        ia3.detach()
        w = block.experts.down_proj.detach().clone()
        block.experts.down_proj.mul_(piece.ia3_l.unsqueeze(-2))  # each expert's input features scaled
        want = block(x)
        block.experts.down_proj.copy_(w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- PEFT's files, the per-expert layout, and the lifecycle ------------------------------------------


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_peft_target_parameters_files_both_ways(model_type, tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs = moe_model(model_type)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("transformers 4 keeps one nn.Linear per expert")
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    twin = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=targets)
    )
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    with torch.no_grad():
        want = _first(twin.eval()(**inputs))
    twin.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path / "peft")
    assert sorted(delta.sites) == sorted(f"layers.{i}.{t}" for i in range(2) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(_first(ours(**inputs)), want, rtol=1e-5, atol=1e-5)
    from packaging.version import Version

    if Version(peft.__version__) < Version("0.20"):
        return  # (older PEFT reads 3-D targets in another layout; hookdelta writes 0.20's, see peft_parameter_factors)
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(back(**inputs)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_the_per_expert_layout_holds_each_experts_update_under_the_checkpoint_names(model_type, tmp_path):
    model, inputs = moe_model(model_type)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("transformers 4 keeps one nn.Linear per expert: save_peft writes them as they are")
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["ffn.in", "ffn.out", "attn.q"]))
    perturb(delta, std=0.1)
    with torch.no_grad():
        adapted = _first(model(**inputs))
    delta.save_peft(tmp_path, split_experts=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "target_parameters" not in config
    # the checkpoint's names (what transformers reads from the hub and vLLM serves)
    gate, up, down, block = {
        "mixtral": ("w1", "w3", "w2", "block_sparse_moe"),
        "qwen3_moe": ("gate_proj", "up_proj", "down_proj", "mlp"),
    }[model_type]
    key = f"base_model.model.layers.0.{block}.experts.1.{gate}.lora_A.weight"
    assert key in tensors, sorted(tensors)[:8]
    # rebuild each expert's fused update from the file alone: [gate; up] rows and down, s = alpha / r
    delta.detach()
    s = config["lora_alpha"] / config["r"]
    experts = model.layers[0].mlp.experts.gate_up_proj.shape[0]
    with torch.no_grad():
        for layer in range(2):
            ex = model.layers[layer].mlp.experts
            pre = f"base_model.model.layers.{layer}.{block}.experts"

            def upd(e, name, pre=pre):
                return s * tensors[f"{pre}.{e}.{name}.lora_B.weight"] @ tensors[f"{pre}.{e}.{name}.lora_A.weight"]

            ex.gate_up_proj += torch.stack([torch.cat([upd(e, gate), upd(e, up)]) for e in range(experts)])
            ex.down_proj += torch.stack([upd(e, down) for e in range(experts)])
            attn = model.layers[layer].self_attn.q_proj
            q = f"base_model.model.layers.{layer}.self_attn.q_proj"
            attn.weight += s * tensors[q + ".lora_B.weight"] @ tensors[q + ".lora_A.weight"]
        torch.testing.assert_close(_first(model(**inputs)), adapted, rtol=1e-4, atol=1e-5)


def test_the_per_expert_layout_is_refused_where_the_checkpoint_keeps_experts_fused(tmp_path):
    model, _ = moe_model("gpt_oss")
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("transformers 4")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="ffn.in"))
    with pytest.raises(hd.UnsupportedModuleError, match="save_peft\\(\\)'s default layout"):
        delta.save_peft(tmp_path / "x", split_experts=True)
    assert not (tmp_path / "x").exists()


def test_the_lifecycle_on_experts(tmp_path):
    model, inputs = fused_mixtral()
    snap = snapshot(model)
    ids = inputs["input_ids"]

    def out():
        with torch.no_grad():
            return model(input_ids=ids).logits

    a = hd.attach(model, hd.LoRAConfig(r=4, targets=["ffn.in", "ffn.out"]), name="a")
    b = hd.attach(model, hd.LoRAConfig(r=4, targets=["ffn.in", "ffn.out"]), name="b")
    perturb(a, std=0.1)
    perturb(b, std=0.1)
    hd.set_active(model, "a")
    oa = out()
    hd.set_active(model, "b")
    ob = out()
    hd.set_active(model, ["a", "b"])
    both = out()
    # merge / unmerge: the weights after unmerge are the same bits
    hd.set_active(model, "a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a.merge()
    torch.testing.assert_close(out(), oa, rtol=1e-5, atol=1e-6)
    a.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # save / load, hot-swap, combine
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    hd.load(model, tmp_path / "b", into="a")
    torch.testing.assert_close(out(), ob, rtol=0, atol=0)
    hd.load(model, tmp_path / "a", into="a")
    c = hd.combine(model, {"a": 1.0, "b": 1.0}, how="cat", name="c")
    hd.set_active(model, "c")
    torch.testing.assert_close(out(), both, rtol=1e-5, atol=1e-6)
    with pytest.raises(hd.UnsupportedModuleError, match="unclear whether per expert"):
        hd.combine(model, {"a": 1.0, "b": 1.0}, how="ties", density=0.5, name="d")
    # routing rows to different deltas: refused (the experts' weights are swapped for the whole call)
    hd.set_active(model, ["a", "b"])
    with pytest.raises(hd.UnsupportedModuleError, match="fused experts"), hd.route(model, ["a", "b"]):
        pass
    for d in (c, b, a):
        d.detach()
    assert_restored(model, snap)
    loaded = hd.load(model, tmp_path / "a")
    torch.testing.assert_close(out(), oa, rtol=0, atol=0)
    loaded.detach()
    assert_restored(model, snap)


def test_router_only_tuning_changes_which_experts_tokens_go_to():
    model, inputs, _ = build("mixtral")
    layer = model.model.layers[0]
    block = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe  # (transformers 5 / 4)
    chosen = []

    def run():  # (the observer is registered last, so it sees what the router's delta made of its output)
        handle = block.gate.register_forward_hook(
            lambda m, a, o: chosen.append(o[-1] if isinstance(o, tuple) else o.topk(2, dim=-1).indices)
        )
        with torch.no_grad():
            model(**inputs)
        handle.remove()

    run()
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="moe.router"))
    assert all("gate" in s for s in delta.sites) and len(delta.sites) == 2
    perturb(delta, std=2.0)
    run()
    assert not torch.equal(chosen[0], chosen[1]), "the router's delta changed no routing decision"
    assert delta.num_trainable < 1000


def test_without_autograd_many_tokens_per_expert_take_the_built_weight_and_equal_the_formula(monkeypatch):
    """ops._builds: past rows·(in + out) = 2·experts·in·out the built W + s·B·A is the faster; the
    result is the same formula either way (here against the routed path on the same tokens)."""
    model, _ = fused_mixtral("grouped_mm")
    block = model.model.layers[0].mlp
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["ffn.in", "ffn.out"], layers=[0]))
    perturb(delta, std=0.2)
    d, e, f = (
        block.experts.gate_up_proj.shape[-1],
        block.experts.gate_up_proj.shape[0],
        block.experts.down_proj.shape[-1],
    )
    tokens = 2 * e * d * 2 * f // (d + 2 * f) + 64  # past the bound for gate_up_proj [e, 2f, d]
    x = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(5))
    built = []
    value = ops.LowRankWeight.value
    monkeypatch.setattr(ops.LowRankWeight, "value", lambda self: built.append(1) or value(self))
    with torch.no_grad():
        got = block(x)
    assert built, "the weight was not built past the bound"
    monkeypatch.setattr(ops, "_builds", lambda *a, **k: False)
    with torch.no_grad():
        routed = block(x)
    torch.testing.assert_close(got, routed, rtol=1e-5, atol=1e-6)
