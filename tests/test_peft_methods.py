"""The second-wave methods against PEFT's own implementations: PEFT builds an adapter (random,
non-zero), saves it; hookdelta loads the file onto the bare model and must give PEFT's outputs
and gradients (to 1e-5). Then hookdelta saves its delta in PEFT's format and PEFT's
`from_pretrained` must give hookdelta's outputs. The reference is PEFT, never our own code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from internals import peft_boft_layer, use_plain_c3a, use_plain_loha_cp
from tiny_models import build, main_output

import hookdelta as hd

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    """Conv1d and Conv2d (3×3 and 1×1, one grouped) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # [b, 8, 5, 5]
        h = self.c3(h.flatten(2))  # [b, 6, 25]
        return self.head(h.mean(-1))


def conv_model():
    torch.manual_seed(0)
    return ConvNet().eval(), {"x": torch.randn(2, 4, 5, 5)}


def model_for(arch):
    if arch == "conv":
        return conv_model()
    model, inputs, _ = build(arch)
    return model, inputs


def newer(name):
    """PEFT's config class `name`, or a skip where this PEFT predates it (the floor lane's)."""
    cls = getattr(peft, name, None)
    if cls is None:
        pytest.skip(f"PEFT {peft.__version__} has no {name}")
    return cls


# id -> (architecture, PEFT config, hookdelta mark)
CASES = {
    "loha-llama": (
        "llama",
        lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
        "loha",
    ),
    "loha-conv": ("conv", lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["c1", "c2", "c3", "head"]), "loha"),
    "loha-conv-cp": (
        "conv",
        lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["c1", "c3"], use_effective_conv2d=True),
        "loha",
    ),
    "loha-patterns": (
        "llama",
        lambda: peft.LoHaConfig(
            r=4, alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 12}
        ),
        "loha",
    ),
    "lokr-llama": (
        "llama",
        lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]),
        "lokr",
    ),
    "lokr-both": (
        "llama",
        lambda: peft.LoKrConfig(
            r=1, alpha=2, target_modules=["q_proj", "gate_proj"], decompose_both=True, decompose_factor=4
        ),
        "lokr",
    ),
    "lokr-conv": ("conv", lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["c1", "c2", "c3", "head"]), "lokr"),
    # (PEFT 0.21's LoKr with use_effective_conv2d fails on Conv1d inside torch.kron: Conv2d only)
    "lokr-conv-cp": (
        "conv",
        lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=["c1", "c2"], use_effective_conv2d=True),
        "lokr",
    ),
    "lokr-lycoris": (
        "llama",
        lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["k_proj"], init_weights="lycoris"),
        "lokr",
    ),
    "vera-llama": (
        "llama",
        lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"], projection_prng_key=3),
        "vera",
    ),
    "vera-gpt2": ("gpt2", lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), "vera"),
    "oft-llama": (
        "llama",
        lambda: peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "oft",
    ),
    "oft-exact-shared": (
        "llama",
        lambda: peft.OFTConfig(
            oft_block_size=4, target_modules=["q_proj", "o_proj"], use_cayley_neumann=False, block_share=True
        ),
        "oft",
    ),
    "oft-coft": (
        "llama",
        lambda: peft.OFTConfig(
            r=4, oft_block_size=0, target_modules=["k_proj"], coft=True, eps=2.0, num_cayley_neumann_terms=3
        ),
        "oft",
    ),
    "boft-llama": (
        "llama",
        lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj", "up_proj"]),
        "boft",
    ),
    "boft-bert": (
        "bert",
        lambda: peft.BOFTConfig(boft_block_num=4, boft_block_size=0, target_modules=["query", "dense"]),
        "boft",
    ),
    "fourierft-llama": (
        "llama",
        lambda: peft.FourierFTConfig(n_frequency=20, scaling=10.0, target_modules=["q_proj", "v_proj", "down_proj"]),
        "fourierft",
    ),
    "fourierft-gpt2": (
        "gpt2",
        lambda: peft.FourierFTConfig(
            n_frequency=12, scaling=5.0, random_loc_seed=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
        "fourierft",
    ),
    "fourierft-pattern": (
        "llama",
        lambda: peft.FourierFTConfig(
            n_frequency=20, target_modules=["q_proj", "v_proj"], n_frequency_pattern={"q_proj": 7}
        ),
        "fourierft",
    ),
    "hira-llama": ("llama", lambda: newer("HiraConfig")(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), "hira"),
    "hira-patterns": (
        "llama",
        lambda: newer("HiraConfig")(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}),
        "hira",
    ),
    "hira-gpt2": (
        "gpt2",
        lambda: newer("HiraConfig")(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "hira",
    ),
    "delora-llama": (
        "llama",
        lambda: peft.DeloraConfig(r=4, delora_lambda=3, target_modules=["q_proj", "v_proj", "up_proj"]),
        "delora",
    ),
    "delora-patterns": (
        "llama",
        lambda: peft.DeloraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
        "delora",
    ),
    "gralora-llama": (
        "llama",
        lambda: newer("GraloraConfig")(r=4, gralora_k=2, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "gralora",
    ),
    "gralora-hybrid": (
        "llama",
        lambda: newer("GraloraConfig")(r=8, gralora_k=4, hybrid_r=2, alpha=6, target_modules=["q_proj", "k_proj"]),
        "gralora",
    ),
    "gralora-gpt2": (
        "gpt2",
        lambda: newer("GraloraConfig")(r=4, gralora_k=2, target_modules=["c_attn"], fan_in_fan_out=True),
        "gralora",
    ),
    "miss-llama": ("llama", lambda: peft.MissConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), "miss"),
    "miss-uneven": ("llama", lambda: peft.MissConfig(r=5, target_modules=["q_proj", "up_proj"]), "miss"),
    "miss-mini": (
        "llama",
        lambda: peft.MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=["q_proj", "v_proj"]),
        "miss",
    ),
    "c3a-llama": (
        "llama",
        lambda: peft.C3AConfig(block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "c3a",
    ),
    "c3a-pattern": (
        "llama",
        lambda: peft.C3AConfig(block_size=8, block_size_pattern={"q_proj": 4}, target_modules=["q_proj", "v_proj"]),
        "c3a",
    ),
    "hra-llama": ("llama", lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), "hra"),
    "hra-gs": ("llama", lambda: peft.HRAConfig(r=3, apply_GS=True, target_modules=["q_proj", "o_proj"]), "hra"),
    "adalora-llama": (
        "llama",
        lambda: peft.AdaLoraConfig(
            init_r=4, target_r=2, lora_alpha=6, total_step=10, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        "adalora",
    ),
    "adalora-gpt2": (
        "gpt2",
        lambda: peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["c_attn"], fan_in_fan_out=True),
        "adalora",
    ),
    "llama-adapter-llama": (
        "llama",
        lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1),
        "llama_adapter",
    ),
    "llama-adapter-all": (
        "llama",
        lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
        "llama_adapter",
    ),
    "llama-adapter-gpt2": (
        "gpt2",
        lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2),
        "llama_adapter",
    ),
    "road-llama": (
        "llama",
        lambda: peft.RoadConfig(group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "road",
    ),
    "road-2": (
        "llama",
        lambda: peft.RoadConfig(variant="road_2", group_size=4, target_modules=["q_proj", "up_proj"]),
        "road",
    ),
    "road-4-bias": (
        "bert",
        lambda: peft.RoadConfig(variant="road_4", group_size=8, target_modules=["query", "dense"]),
        "road",
    ),
    "vblora-llama": (
        "llama",
        lambda: peft.VBLoRAConfig(
            r=4, vector_length=8, num_vectors=16, topk=2, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
        "vblora",
    ),
    "vblora-gpt2": (
        "gpt2",
        lambda: peft.VBLoRAConfig(
            r=2, vector_length=16, num_vectors=8, topk=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
        "vblora",
    ),
    "randlora-llama": (
        "llama",
        lambda: peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "randlora",
    ),
    "randlora-sparse": (
        "llama",
        lambda: peft.RandLoraConfig(r=8, sparse=True, projection_prng_key=3, target_modules=["q_proj", "up_proj"]),
        "randlora",
    ),
    "randlora-gpt2": (
        "gpt2",
        lambda: peft.RandLoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "randlora",
    ),
    "lily-llama": (
        "llama",
        lambda: newer("LilyConfig")(r=4, num_B=2, target_modules=["q_proj", "v_proj", "down_proj"]),
        "lily",
    ),
    "lily-stride": (
        "llama",
        lambda: newer("LilyConfig")(r=4, num_B=3, stride_A=2, scaling=0.5, target_modules=["q_proj", "k_proj"]),
        "lily",
    ),
    "shira-llama": ("llama", lambda: peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), "shira"),
    "shira-seed": (
        "llama",
        lambda: peft.ShiraConfig(r=3, random_seed=11, target_modules=["q_proj", "up_proj"]),
        "shira",
    ),
    "tokens-llama": (
        "llama",
        lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[3, 5, 7]),
        "trainable_tokens",
    ),
    "tokens-gpt2-tied": (
        "gpt2",
        lambda: peft.TrainableTokensConfig(target_modules=["wte"], token_indices=[0, 4]),
        "trainable_tokens",
    ),
}


def plain_loha_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    """PEFT's LoHa CP weight by plain autograd. PEFT's hand-written backward (HadaWeightCP, from
    LyCORIS) builds w1_a's and t1's gradients from the *second* factor's tensors: wrong
    gradients (outputs are right), so its gradients are not a reference for that case."""
    one = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    return one * torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a) * scale


def peft_adapter(model, peft_cfg, seed=5):
    """PEFT's adapter on a copy of `model`, every trainable tensor given random values."""
    twin = peft.get_peft_model(copy.deepcopy(model), peft_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return twin.eval()


def ours_grads(delta):
    return {k: p.grad for k, p in delta.named_tensors().items()} if hasattr(delta, "named_tensors") else None


def grads_by_key(twin):
    """PEFT's gradients keyed as hookdelta keys its tensors: `<site>.<name>`."""
    out = {}
    for name, p in twin.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            if key.endswith(".vblora_vector_bank"):  # (the bank is shared: PEFT names it at its first layer)
                key = "vblora_vector_bank.bank"
            out[
                key.removesuffix(".weight")
                if ".lora_" in key or ".lily_" in key or key.endswith((".oft_R.weight", "_general.weight"))
                else key
            ] = p.grad
    return out


@pytest.mark.parametrize("case", [pytest.param(c, marks=getattr(pytest.mark, CASES[c][2])) for c in CASES])
def test_peft_file_loads_to_peft_outputs_and_gradients(case, tmp_path, monkeypatch):
    arch, make, mark = CASES[case]
    use_plain_loha_cp(monkeypatch, plain_loha_cp)
    if mark == "c3a":
        use_plain_c3a(monkeypatch)
    model, inputs = model_for(arch)
    twin = peft_adapter(model, make())
    twin.save_pretrained(tmp_path)
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path)
    theirs_out, ours_out = main_output(twin(**inputs)), main_output(ours(**inputs))
    assert not torch.allclose(theirs_out, main_output(model(**inputs)), atol=1e-3), "the adapter must do something"
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
    theirs_out.square().mean().backward()
    ours_out.square().mean().backward()
    theirs = grads_by_key(twin)
    named = {f"{p.key}.{n}": t for p in delta.pieces.values() for n, t in p.named_parameters()}
    assert set(named) == set(theirs), "hookdelta trains exactly PEFT's tensors"
    for key, t in named.items():
        torch.testing.assert_close(t.grad, theirs[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [pytest.param(c, marks=getattr(pytest.mark, CASES[c][2])) for c in CASES])
def test_saved_in_peft_format_loads_in_peft_to_our_outputs(case, tmp_path):
    arch, make, mark = CASES[case]
    model, inputs = model_for(arch)
    twin = peft_adapter(model, make())
    twin.save_pretrained(tmp_path / "theirs")
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path / "theirs")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move away from PEFT's values, so the round trip carries our tensors
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    expected = main_output(ours(**inputs)).detach()
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(back(**inputs)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.vera
def test_vera_projections_come_from_the_seed_and_are_not_saved(tmp_path):
    """hookdelta's own files hold only d and b; PEFT's file without projections
    (save_projection=False) loads the same; projections that the seed does not give are refused."""
    from safetensors.torch import load_file, save_file

    model, inputs = model_for("llama")
    twin = peft_adapter(
        model, peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=9, save_projection=False)
    )
    twin.save_pretrained(tmp_path / "noproj")
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path / "noproj")
    with torch.no_grad():
        torch.testing.assert_close(main_output(ours(**inputs)), main_output(twin(**inputs)), rtol=1e-5, atol=1e-5)
    delta.save(tmp_path / "ours")
    saved = load_file(str(tmp_path / "ours" / "delta.safetensors"))
    assert saved and all("lambda" in k for k in saved), sorted(saved)
    expected = outputs_of(ours, inputs)
    delta.detach()
    hd.load(ours, tmp_path / "ours")
    torch.testing.assert_close(outputs_of(ours, inputs), expected, rtol=0, atol=0)
    # a PEFT file whose projections differ from what its key gives
    delta2 = peft_adapter(model, peft.VeraConfig(r=8, target_modules=["q_proj"], projection_prng_key=9))
    delta2.save_pretrained(tmp_path / "proj")
    tensors = load_file(str(tmp_path / "proj" / "adapter_model.safetensors"))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2
    save_file(tensors, str(tmp_path / "proj" / "adapter_model.safetensors"))
    fresh = copy.deepcopy(model)
    with pytest.raises(hd.DeltaFileError, match="projection_prng_key"):
        hd.load_peft(fresh, tmp_path / "proj")
    assert not hd.deltas(fresh)


def outputs_of(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


class EmbedConv(nn.Module):
    """An embedding feeding a Conv1d and a Conv2d (1×1 and 3×3), for DoRA beyond linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, ids):
        h = self.c1(self.emb(ids).transpose(1, 2))  # [b, 8, seq=4]
        h = self.c2(h.reshape(h.shape[0], 2, 4, 4))  # [b, 4, 4, 4]
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.dora
@pytest.mark.parametrize("targets", [["emb"], ["c1", "c2"], ["emb", "c1", "c2", "head"]])
def test_dora_on_embedding_and_conv_matches_peft(targets, tmp_path):
    torch.manual_seed(0)
    model, inputs = EmbedConv().eval(), {"ids": torch.randint(0, 20, (3, 4))}
    twin = peft_adapter(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True))
    twin.save_pretrained(tmp_path)
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path)
    theirs_out, ours_out = twin(**inputs), ours(**inputs)
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)
    theirs_out.square().mean().backward()
    ours_out.square().mean().backward()
    theirs = grads_by_key(twin)
    for piece in delta.pieces.values():
        for name, t in piece.named_parameters():
            peft_name = {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": "lora_magnitude_vector"}[name]
            want = (
                theirs.get(f"{piece.key}.{peft_name}")
                if f"{piece.key}.{peft_name}" in theirs
                else theirs.get(f"{piece.key}.lora_embedding_{name[-1]}")
                if name != "magnitude"
                else theirs[f"{piece.key}.lora_magnitude_vector.weight"]
            )
            torch.testing.assert_close(t.grad, want.reshape(t.shape), rtol=1e-4, atol=1e-6, msg=f"{piece.key}.{name}")
    # merge is exact, unmerge restores; saved back in PEFT's format, PEFT loads our outputs
    expected = ours(**inputs).detach()
    delta.merge()
    torch.testing.assert_close(ours(**inputs), expected, rtol=1e-4, atol=1e-5)
    delta.unmerge()
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.boft
def test_boft_butterfly_factors_follow_peft_arithmetic():
    """Several butterfly factors (PEFT runs them only with its CUDA kernel): the rotation equals
    PEFT's own permutations and product, built here from PEFT's functions."""
    BOFTLayer = peft_boft_layer()

    model, inputs = model_for("llama")
    delta = hd.attach(model, hd.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, targets=["q_proj"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    piece = next(iter(delta.pieces.values()))
    n, (m, d, h, _) = 32, piece.boft_R.shape
    perms = torch.stack(
        [BOFTLayer.perm2mat(None, BOFTLayer.block_butterfly_perm(None, n, d // 2**i, h // 2, m - 1)) for i in range(m)]
    )
    data = piece.boft_R.detach().reshape(m * d, h, h)
    rot = BOFTLayer.cayley_batch(None, data).reshape(m, d, h, h)
    bd = torch.stack([torch.block_diag(*rot[i].unbind(0)) for i in range(m)])
    batch = torch.bmm(perms, torch.bmm(bd, perms.permute(0, 2, 1)))
    want = batch[0]
    for i in range(1, m):
        want = batch[i] @ want
    torch.testing.assert_close(piece.rotation().detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(want.T @ want, torch.eye(n), rtol=1e-5, atol=1e-5)
    out = outputs_of(model, inputs)
    delta.merge()
    torch.testing.assert_close(outputs_of(model, inputs), out, rtol=1e-4, atol=1e-5)
    delta.unmerge()
    assert torch.equal(outputs_of(model, inputs), out)


@pytest.mark.oft
def test_oft_files_with_another_parametrization_are_refused(tmp_path):
    import json

    model, _ = model_for("llama")
    twin = peft_adapter(model, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    twin.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for change, words in ((dict(peft_version="0.17.1"), "changed in 0.18"), (dict(peft_version=None), "before 0.18")):
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(hd.DeltaFileError, match=words):
            hd.load_peft(copy.deepcopy(model), tmp_path)
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "oft_block_size"}))
    with pytest.raises(hd.DeltaFileError, match="before 0.14"):
        hd.load_peft(copy.deepcopy(model), tmp_path)


@pytest.mark.oft
def test_an_input_rewrite_acts_before_every_delta_at_its_layer():
    """OFT rotates the layer's input for every delta there, attached before or after it (IA3 on
    inputs likewise). Merging the rotation would stop it feeding the others, so that merge (and
    its unmerge, and a new delta beside a merged rotation) is refused; merging the others is not."""
    from helpers import assert_same, snapshot

    model, inputs = model_for("llama")
    lora = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]))
    oft = hd.attach(model, hd.OFTConfig(oft_block_size=8, targets=["q_proj"]))
    late = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name="late")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(lora.parameters()) + list(oft.parameters()) + list(late.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    rot = torch.block_diag(*oft.piece("model.layers.0.self_attn.q_proj").blocks_R().detach())
    want = (x @ rot) @ layer.weight.T
    for d in (lora, late):
        lp = d.piece("model.layers.0.self_attn.q_proj")
        want = want + lp.scale * (x @ rot) @ lp.lora_A.T @ lp.lora_B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(hd.MergeError):  # the LoRAs would lose the rotation
        oft.merge()
    with pytest.raises(hd.MergeError, match="neither can be merged"):  # merged after the rotation it reads
        late.merge()
    late.detach()
    out = outputs_of(model, inputs)
    lora.merge()
    oft.merge()  # nothing unmerged left to feed
    torch.testing.assert_close(outputs_of(model, inputs), out, rtol=1e-4, atol=1e-5)
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError, match="is merged"):
        hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]))
    assert_same(model, snap)
    oft.unmerge()
    lora.unmerge()
    with pytest.raises(hd.MergeError, match="Merge 'lora' first"):
        oft.merge()
    assert torch.equal(outputs_of(model, inputs), out)
    for d in list(hd.deltas(model).values()):
        d.detach()
    one = hd.attach(model, hd.IA3Config(targets=["k_proj"], feedforward_targets=["down_proj"]), name="one")
    hd.attach(model, hd.IA3Config(targets=["k_proj"], feedforward_targets=["down_proj"]), name="two")
    one.merge()  # rescalings commute


def test_malformed_second_wave_peft_files_give_one_clear_error(tmp_path):
    """A config value of the wrong type, or a shared tensor without its partner, is a
    DeltaFileError naming the problem, never a raw exception; the model is untouched."""
    import json

    from helpers import assert_restored, snapshot
    from safetensors.torch import load_file, save_file

    model, _ = model_for("llama")
    snap = snapshot(model)
    twin = peft_adapter(model, peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    twin.save_pretrained(tmp_path / "oft")
    path = tmp_path / "oft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_cayley_neumann_terms": "many"}))
    with pytest.raises(hd.DeltaFileError, match="malformed|num_cayley"):
        hd.load_peft(model, tmp_path / "oft")
    assert_restored(model, snap)
    twin = peft_adapter(model, peft.VeraConfig(r=4, target_modules=["q_proj"]))
    twin.save_pretrained(tmp_path / "vera")
    weights = tmp_path / "vera" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["base_model.vera_B"]
    save_file(tensors, str(weights))
    with pytest.raises(hd.DeltaFileError, match="partner"):
        hd.load_peft(model, tmp_path / "vera")
    assert_restored(model, snap)


@pytest.mark.reft
def test_reft_positions_callable_giving_nonsense_is_a_config_error():
    model, inputs = model_for("llama")
    hd.attach(model, hd.LoReFTConfig(r=2, positions=lambda h: "first", layers=[0]))
    with pytest.raises(hd.ConfigError, match="positions"):
        model(**inputs)


@pytest.mark.llama_adapter
def test_llama_adapter_refuses_what_peft_does_not_build_or_would_get_wrong():
    import transformers as tf
    from tiny_models import TEXT

    opt, _, _ = build("opt")
    with pytest.raises(hd.UnsupportedModuleError, match="llama"):
        hd.attach(opt, hd.LlamaAdapterConfig(adapter_layers=1))
    biased = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, num_key_value_heads=2, attention_bias=True))
    with pytest.raises(hd.UnsupportedModuleError, match="bias"):
        hd.attach(biased, hd.LlamaAdapterConfig(adapter_layers=1))
    llama, _, _ = build("llama")
    with pytest.raises(hd.ConfigError, match="adapter_layers"):
        hd.attach(llama, hd.LlamaAdapterConfig(adapter_layers=3))
    with pytest.raises(hd.ConfigError, match="targets"):
        hd.LlamaAdapterConfig(targets=["q_proj"])
    assert not hd.deltas(opt) and not hd.deltas(biased) and not hd.deltas(llama)


@pytest.mark.randlora
@pytest.mark.parametrize("kw", [{}, {"sparse": True}, {"very_sparse": True}], ids=["dense", "sparse", "very_sparse"])
def test_randlora_draws_the_bases_peft_draws_from_the_same_key(kw):
    model, _ = model_for("llama")
    twin = peft.get_peft_model(
        copy.deepcopy(model),
        peft.RandLoraConfig(r=4, projection_prng_key=7, target_modules=["q_proj", "down_proj"], **kw),
    )
    ours = hd.attach(
        copy.deepcopy(model), hd.RandLoRAConfig(r=4, projection_prng_key=7, targets=["q_proj", "down_proj"], **kw)
    )
    # (named once, under the first layer that holds them)
    theirs = {n.split(".")[-2]: b for n, b in twin.named_buffers() if ".randlora_" in n}
    bases = ours.pieces["randlora_bases"]
    is_bf16_available = pytest.importorskip("accelerate.utils").is_bf16_available

    if not kw and not is_bf16_available():
        pytest.skip("PEFT draws its bases in float16 where bfloat16 is unavailable")
    torch.testing.assert_close(bases.randlora_A, theirs["randlora_A"].float(), rtol=0, atol=0)
    torch.testing.assert_close(bases.randlora_B, theirs["randlora_B"].float(), rtol=0, atol=0)


@pytest.mark.lily
def test_lily_shares_by_kind_and_refuses_a_peft_file_that_cannot_say_so(tmp_path):
    model, _ = model_for("llama")
    delta = hd.attach(model, hd.LilyConfig(r=2, num_B=2, stride_A=2, targets=["q_proj", "v_proj"]))
    first = next(p for p in delta.pieces.values() if p.key == "model.layers.0.self_attn.q_proj")
    shared = {p.key: p.factor("lily_A") is first.factor("lily_A") for p in delta.pieces.values()}
    assert shared == {
        "model.layers.0.self_attn.q_proj": True,
        "model.layers.1.self_attn.q_proj": True,
        "model.layers.0.self_attn.v_proj": False,
        "model.layers.1.self_attn.v_proj": False,
    }
    delta.detach()
    part = hd.attach(model, hd.LilyConfig(r=2, targets=["q_proj"], layers=[1]))
    with pytest.raises(hd.UnsupportedModuleError, match="all of them"):
        part.save_peft(tmp_path / "part")
    assert not (tmp_path / "part").exists()


@pytest.mark.shira
def test_a_shira_file_with_another_mask_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = model_for("llama")
    twin = peft_adapter(model, peft.ShiraConfig(r=2, random_seed=5, target_modules=["q_proj"]))
    twin.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("shira_indices"))
    tensors[key] = tensors[key].flip(1).contiguous()  # the same entries, listed in another order: another mapping
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = copy.deepcopy(model)
    with pytest.raises(hd.DeltaFileError, match="random_seed"):
        hd.load_peft(fresh, tmp_path)
    assert not hd.deltas(fresh)
