"""Models as people build, load and wrap them: every promise holds there too, or the call is
refused with a HookdeltaError and the model is left untouched.

One section per case: layers whose parent bypasses their forward (nn.MultiheadAttention),
accelerate offloading and meta initialisation, other code's hooks on the same module,
torch.nn.utils.parametrize, a tied output head in also_train, torch.inference_mode(), static
caches, save errors, delta identity on save, merge advice in a stack, and smaller gaps
(BatchNorm, model heads in "all-linear", wrapper prefixes on hd.load, PEFT layers inside the
model). References are computed by hand or on an untouched copy, never by hookdelta.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf
from helpers import assert_restored, assert_same, bare_copy, perturb, same_bits, snapshot
from internals import forward_hooks, forward_pre_hooks, no_global_forward_hooks, torch_function_modes
from tiny_models import Holder, build, tied_llama

import hookdelta as hd

accelerate = pytest.importorskip("accelerate")


def lora_update(piece) -> torch.Tensor:
    """ΔW = s·B·A of a LoRA piece, by hand."""
    return piece.scale * piece.lora_B.detach() @ piece.lora_A.detach()


def assert_merge_round_trip(model, delta, run, want, snap, atol=1e-6):
    """Merged, `run()` still gives `want`; unmerge and detach then restore the model bit for bit."""
    delta.merge()
    with torch.no_grad():
        torch.testing.assert_close(run(), want, rtol=1e-5, atol=atol)
    delta.unmerge()
    delta.detach()
    assert_restored(model, snap)


# -- 1. layers whose parent never calls their forward ---------------------------------------------


class Attn(nn.Module):
    """A self-attention block built from nn.MultiheadAttention, as many vision and audio models are."""

    def __init__(self, dim: int = 8, bias: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True, bias=bias)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


def _mha_reference(model: Attn, x: torch.Tensor, weight: torch.Tensor, bias=None, part: str = "") -> torch.Tensor:
    """The untouched model's output (or its attention's, part="attn") with out_proj's tensors replaced."""
    ref = bare_copy(model)
    with torch.no_grad():
        ref.attn.out_proj.weight.copy_(weight)
        if bias is not None:
            ref.attn.out_proj.bias.copy_(bias)
        return ref.attn(x, x, x, need_weights=False)[0] if part == "attn" else ref(x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-fast-path", "grad"])
def test_lora_on_multihead_attention_out_proj_acts_through_its_weight(grad):
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, 5, 8)
    snap = snapshot(model)
    with torch.no_grad():
        bare = model(x)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["attn.out_proj"]))
    perturb(delta, std=0.3)
    piece = delta.pieces["attn-out_proj"]
    want = _mha_reference(model, x, model.attn.out_proj.weight + lora_update(piece))
    with torch.set_grad_enabled(grad):
        got = model(x)
    assert (want - bare).abs().max() > 1e-2, "the perturbed delta changes the output"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model(x).sum().backward()  # the delta gets a gradient
    assert piece.lora_A.grad is not None and piece.lora_A.grad.abs().sum() > 0
    assert_merge_round_trip(model, delta, lambda: model(x), want, snap)


def test_transformer_encoder_layer_with_a_delta_leaves_its_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model, x = Holder(layer).eval(), torch.randn(2, 5, 8)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["linear1", "self_attn.out_proj"]))
    perturb(delta, std=0.3)
    ref = bare_copy(model)
    with torch.no_grad():
        ref.layer.linear1.weight += lora_update(delta.pieces["layer-linear1"])
        ref.layer.self_attn.out_proj.weight += lora_update(delta.pieces["layer-self_attn-out_proj"])
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ia3", "bitfit", "dora", "also_train"])
def test_other_mergeable_methods_on_out_proj_act_through_the_weights(method):
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, 5, 8)
    snap = snapshot(model)
    cfg = {
        "ia3": hd.IA3Config(targets=["attn.out_proj"]),
        "bitfit": hd.BitFitConfig(targets=["attn.out_proj"]),
        "dora": hd.LoRAConfig(r=2, targets=["attn.out_proj"], use_dora=True),
        "also_train": hd.LoRAConfig(r=2, targets=["out"], also_train=["attn.out_proj"]),
    }[method]
    delta = hd.attach(model, cfg)
    perturb(delta, std=0.2)
    w, b = model.attn.out_proj.weight.detach(), model.attn.out_proj.bias.detach()
    piece = delta.pieces["attn-out_proj"]
    if method == "ia3":
        w, b = w * piece.ia3_l[:, None], b * piece.ia3_l
    elif method == "bitfit":
        b = b + piece.bias
    elif method == "dora":
        updated = w + lora_update(piece)
        w = updated * (piece.magnitude / updated.norm(dim=1))[:, None]
    else:
        w, b = piece.weight, piece.bias
    want = _mha_reference(model, x, w.detach(), b.detach())
    if method == "also_train":  # the LoRA on `out` runs too
        with torch.no_grad():
            attn = _mha_reference(model, x, w, b, part="attn")
            want = (
                want
                + F.linear(F.linear(attn, delta.pieces["out"].lora_A), delta.pieces["out"].lora_B)
                * delta.pieces["out"].scale
            )
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert_merge_round_trip(model, delta, lambda: model(x), want, snap, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        hd.LoRAConfig(r=2, dropout=0.1, targets="all-linear"),
        hd.AdapterConfig(bottleneck_dim=2, targets=["attn.out_proj"]),
    ],
    ids=["dropout", "adapter"],
)
def test_what_cannot_act_through_the_weights_is_refused_at_attach(cfg):
    model = Attn()
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError, match="without calling its forward"):
        hd.attach(model, cfg)
    assert_restored(model, snap)


def test_in_proj_weight_as_a_parameter_target_works():
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, 5, 8)
    delta = hd.attach(model, hd.LoRAConfig(r=2, target_parameters=["attn.in_proj_weight"]))
    perturb(delta, std=0.3)
    piece = delta.pieces["attn-in_proj_weight"]
    ref = bare_copy(model)
    with torch.no_grad():
        ref.attn.in_proj_weight += lora_update(piece)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


class ReadsChildWeight(nn.Module):
    """A parent that uses its child's weight directly, the way a hand-written model might."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def test_a_parent_reading_a_childs_weight_in_its_code_gets_the_weight_path():
    model, x = ReadsChildWeight(), torch.randn(3, 6)
    snap = snapshot(model)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="proj"))
    perturb(delta, std=0.3)
    ref = bare_copy(model)
    with torch.no_grad():
        ref.proj.weight += lora_update(delta.pieces["proj"])
        want = ref(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    assert_merge_round_trip(model, delta, lambda: model(x), want, snap)


def _linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


class ReadsThroughAHelper(nn.Module):
    """The weight is read by a function elsewhere: no class code shows it, the first forward does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(_linear(x, self.proj))


def test_an_unknown_bypassing_parent_is_refused_from_the_first_forward_on():
    model, x = ReadsThroughAHelper(), torch.randn(3, 6)
    hd.attach(model, hd.LoRAConfig(r=2, targets="all-linear"), name="mine")
    with pytest.raises(hd.BypassError, match=r"used the weight of 'proj' without calling its forward.*\['mine'\]"):
        model(x)
    with pytest.raises(hd.BypassError, match="'proj'"):
        model(x)  # every later forward too, while the delta acts there (nothing is watched any more)
    assert no_global_forward_hooks()
    hd.deltas(model)["mine"].disable()
    model(x)  # off: nothing lost
    hd.deltas(model)["mine"].enable()
    with pytest.raises(hd.BypassError):
        model(x)
    hd.deltas(model)["mine"].detach()
    hd.attach(model, hd.LoRAConfig(r=2, targets="head"), name="other")
    model(x)  # a delta on a layer that is called: judged anew, nothing bypassed


class FusedLossHead(nn.Module):
    """TRL's / Liger's fused-loss path: the backbone, then the loss straight from lm_head.weight
    (no call of lm_head)."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state
        return F.linear(hidden, self.lm.lm_head.weight)


def test_a_fused_loss_reading_a_tied_head_gets_the_delta_and_no_false_warning():
    """A LoRA on a tied embedding also adapts the head; a fused loss reads the head's weight in
    its own code, so the head's part acts through the weight: the logits are the plain forward's,
    and nothing warns (the warning said the embedding's delta had no effect before)."""
    model = FusedLossHead(tied_llama())
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="embed_tokens"), name="tied")
    perturb(delta, std=0.3)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        got = model(ids)
    piece = delta.pieces["lm-model-embed_tokens"]
    w = model.lm.lm_head.weight + piece.scale * (piece.lora_B @ piece.lora_A).T
    with torch.no_grad():
        hidden = model.lm.model(input_ids=ids).last_hidden_state  # (the embedding's delta in place)
        torch.testing.assert_close(got, F.linear(hidden, w), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, F.linear(hidden, model.lm.lm_head.weight), atol=1e-3)


def test_a_reader_of_a_tied_weight_outside_every_holder_names_all_of_them():
    lm = tied_llama()
    hd.attach(lm, hd.LoRAConfig(r=2, targets="embed_tokens"), name="tied")
    with pytest.raises(
        hd.BypassError,
        match=r"used the weight tied between 'model.embed_tokens' and 'lm_head' "
        r"without calling their forward.*\['tied'\]",
    ):

        def reads_head(module, args, out):
            F.linear(out[0], lm.lm_head.weight)  # a loss computed from the head's weight, not by calling it

        lm.model.register_forward_hook(reads_head)
        lm(input_ids=torch.randint(0, 50, (2, 5)))


def test_a_forward_patched_after_attach_is_watched_again():
    """TRL's fused loss replaces the model's forward with one that reads lm_head.weight without
    calling lm_head: the first call of the new forward warns, however many calls came before."""
    import types

    model, inputs, _ = build("llama")
    hd.attach(model, hd.LoRAConfig(r=2, targets="lm_head"), name="head")
    model(**inputs)  # the watched first forward: lm_head is called, all quiet
    model(**inputs)

    def fused(self, input_ids=None, **kw):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return F.linear(hidden, self.lm_head.weight)

    model.forward = types.MethodType(fused, model)
    with pytest.raises(hd.BypassError, match=r"used the weight of 'lm_head' without calling its forward.*\['head'\]"):
        model(**inputs)


class InterruptedOnce(nn.Module):
    """Reads a child's weight in its own code, and raises KeyboardInterrupt (Ctrl-C) in its first
    forward after the read: no forward hook runs then, always_call or not."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.interrupt = True

    def forward(self, x):
        h = _linear(x, self.proj)
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return self.head(h)


def test_a_keyboard_interrupt_in_the_first_forward_leaves_nothing_behind():
    import threading

    model, x = InterruptedOnce(), torch.randn(3, 6)
    other = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="all-linear"), name="mine")
    modes = list(torch_function_modes())
    hooks = [(len(forward_hooks(m)), len(forward_pre_hooks(m))) for m in model.modules()]
    with pytest.raises(KeyboardInterrupt):
        model(x)
    assert no_global_forward_hooks()  # nothing process-wide was ever installed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(x)  # an unrelated model right after: watched by no one, no warning
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_try(delta.disable)))
    worker.start()
    worker.join()
    assert errors == [None]  # a change from another thread is not refused by a forward that ended
    delta.enable()
    # the next forward is watched again (the first saw half a forward only) and the modes are gone
    with pytest.raises(hd.BypassError, match=r"used the weight of 'proj'"):
        model(x)
    assert list(torch_function_modes()) == modes
    assert [(len(forward_hooks(m)), len(forward_pre_hooks(m))) for m in model.modules()] == hooks


def test_an_interrupted_forward_is_not_counted_as_running_by_a_delta_change_in_the_same_thread():
    model, x = InterruptedOnce(), torch.randn(3, 6)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="head"), name="mine")
    with pytest.raises(KeyboardInterrupt):
        model(x)
    delta.detach()  # the interrupted forward is over: nothing to wait for
    assert list(torch_function_modes()) == []
    torch.testing.assert_close(model(x), model.head(model.proj(x)))


def _try(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reports what was raised
        return e
    return None


def _detr():
    backbone = tf.ResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = tf.DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=4,
    )
    return tf.DetrForSegmentation(config).eval()


@pytest.mark.parametrize("kind", ["detr", "wavlm"])
def test_real_transformers_models_that_read_weights_themselves(kind):
    """DETR's segmentation head uses bbox_attention.k_proj's weight as a 1x1 convolution; WavLM's
    attention hands its q/k/v/out projections' weights to a fused functional."""
    torch.manual_seed(0)
    if kind == "detr":
        model, x = _detr(), {"pixel_values": torch.randn(1, 3, 64, 64)}
        names = dict(model.named_modules())
        target = "bbox_attention.k_proj" if "bbox_attention.k_proj" in names else "bbox_attention.k_linear"  # (4.x)
        out = lambda m: m(**x).pred_masks  # noqa: E731
    else:
        config = tf.WavLMConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(8, 8),
            conv_stride=(5, 4),
            conv_kernel=(10, 4),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
        )
        model, x = tf.WavLMModel(config).eval(), {"input_values": torch.randn(1, 800)}
        target = "encoder.layers.0.attention.v_proj"
        out = lambda m: m(**x).last_hidden_state  # noqa: E731
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=[target]))
    perturb(delta, std=0.3)
    ref = bare_copy(model)
    with torch.no_grad():
        ref.get_submodule(target).weight += lora_update(next(iter(delta.pieces.values())))
        want = out(ref)
    with torch.no_grad():
        got = out(model)
    with delta.disabled(), torch.no_grad():
        assert not torch.allclose(out(model), want, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class TopOneMoE(nn.Module):
    """Four experts, each token routed to one: experts nobody is routed to do not run."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(6, 4)
        self.experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        choice = torch.zeros(x.shape[0], dtype=torch.long)  # everything to expert 0
        return torch.stack([self.experts[int(c)](row) for c, row in zip(choice, x, strict=True)])


def test_experts_that_simply_do_not_run_stay_quiet():
    model, x = TopOneMoE(), torch.randn(3, 6)
    hd.attach(model, hd.LoRAConfig(r=2, targets=["experts.*"]))
    model(x)


def test_real_architectures_raise_no_bypass_error():
    for arch in ("llama", "gpt2", "bert", "t5"):
        model, inputs, targets = build(arch)
        hd.attach(model, hd.LoRAConfig(r=2, targets="all-linear"))
        hd.attach(model, hd.LoRAConfig(r=2, targets=targets, use_dora=True))
        model(**inputs)


# -- 2. offloaded and meta-initialised models -------------------------------------------------


def _offloaded(kind: str, tmp_path):
    model, inputs, _ = build("llama")
    plain = copy.deepcopy(model)
    if kind == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    elif kind == "disk_offload":
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    else:  # an empty model, then weights loaded with a device map that offloads half of it
        torch.save(plain.state_dict(), tmp_path / "weights.bin")
        with accelerate.init_empty_weights():
            model = tf.LlamaForCausalLM(plain.config)
        device_map = {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "cpu",
        }
        model = accelerate.load_checkpoint_and_dispatch(
            model, str(tmp_path / "weights.bin"), device_map=device_map, offload_folder=str(tmp_path / "offload")
        )
        model.tie_weights()
    return model.eval(), plain.eval(), inputs


OUTPUT_SIDE = {
    "lora": hd.LoRAConfig(r=2, targets=["q_proj", "v_proj", "down_proj"]),
    "dora": hd.LoRAConfig(r=2, targets=["q_proj", "v_proj"], use_dora=True),
    "ia3": hd.IA3Config(),
    "bitfit": hd.BitFitConfig(targets=["o_proj"]),
    "adapter": hd.AdapterConfig(bottleneck_dim=4),
}


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload", "dispatch"])
@pytest.mark.parametrize("method", list(OUTPUT_SIDE))
def test_offloaded_models_get_real_deltas_that_match_the_plain_model(kind, method, tmp_path):
    model, plain, inputs = _offloaded(kind, tmp_path)
    delta = hd.attach(model, OUTPUT_SIDE[method])
    assert all(not t.is_meta and t.device.type == "cpu" for t in delta.parameters())
    perturb(delta, std=0.1)
    twin = hd.attach(plain, OUTPUT_SIDE[method])
    with torch.no_grad():
        for mine, theirs in zip(delta.parameters(), twin.parameters(), strict=True):
            theirs.copy_(mine)
        got, want = model(**inputs).logits, plain(**inputs).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in delta.named_parameters()}
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in delta.parameters() if p.requires_grad)
    with pytest.raises(hd.MergeError, match="offloaded" if method in ("lora", "dora", "ia3") else ""):
        delta.merge()  # (a merge that reached layer 0, which dispatch keeps in memory, is rolled back)
    assert not delta.merged and all(same_bits(p, before[n]) for n, p in delta.named_parameters())
    delta.save(tmp_path / "saved")
    delta.detach()
    assert hd.deltas(model) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", hd.BaseWeightsMismatchWarning)  # the fingerprint reads the real weights
        loaded = hd.load(model, tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    loaded.detach()


def test_detach_leaves_an_offloaded_model_as_it_was(tmp_path):
    model, _, inputs = _offloaded("cpu_offload", tmp_path)
    snap = snapshot(model)
    with torch.no_grad():
        before = model(**inputs).logits
    with hd.attach(model, hd.LoRAConfig(r=2)) as delta:
        perturb(delta)
        model(**inputs)
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_offloading_after_attach_is_refused_at_the_next_forward(tmp_path):
    model, inputs, _ = build("llama")
    perturb(hd.attach(model, hd.LoRAConfig(r=2)))
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))  # moves the delta's tensors to meta too
    with pytest.raises(hd.DeltaStateError, match="moved to the meta device after it was attached"):
        model(**inputs)


@pytest.mark.parametrize(
    "cfg",
    [hd.LNTuningConfig(), hd.LoRAConfig(r=2, targets=["q_proj"], also_train=["lm_head"])],
    ids=["ln_tuning", "also_train"],
)
def test_weight_swapping_deltas_are_refused_on_offloaded_layers(cfg, tmp_path):
    model, _, _ = _offloaded("cpu_offload", tmp_path)
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError, match="offloaded by accelerate"):
        hd.attach(model, cfg)
    assert_restored(model, snap)


def test_a_meta_model_without_weights_is_refused():
    config = build("llama")[0].config
    with accelerate.init_empty_weights():
        model = tf.LlamaForCausalLM(config)
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError, match="meta device.*Load the weights first"):
        hd.attach(model, hd.LoRAConfig(r=2))
    assert_restored(model, snap)


def test_attach_inside_init_empty_weights_is_refused():
    model, _, _ = build("llama")
    snap = snapshot(model)
    with accelerate.init_empty_weights(), pytest.raises(hd.UnsupportedModuleError, match="init_empty_weights"):
        hd.attach(model, hd.LoRAConfig(r=2))
    assert_restored(model, snap)


# -- 3. other code's hooks on the same module -----------------------------------------------------


def _clamp(module, args, output):
    return output.clamp(-0.05, 0.05)


def _affine(module, args, output):
    return output * 2.0 + 0.5


def _lora_on(model, layer, r=2, seed=7):
    delta = hd.attach(model, hd.LoRAConfig(r=r, targets=[layer]), name=f"d{seed}")
    perturb(delta, std=0.5, seed=seed)
    return delta


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _by_hand(model: Two, base: dict, x: torch.Tensor, order: list) -> torch.Tensor:
    """The output with layer a's steps applied in `order` (a delta adds s·B·A·x, a hook is a function)."""
    with torch.no_grad():
        h = F.linear(x, base["a.weight"], base["a.bias"])
        for step in order:
            if isinstance(step, hd.Delta):
                p = step.pieces["a"]
                h = h + p.scale * F.linear(F.linear(x, p.lora_A), p.lora_B)
            else:
                h = step(None, (x,), h)
        return model.b(torch.tanh(h))


def test_a_hook_registered_after_attach_keeps_its_place_through_disable_and_unmerge():
    model, x = Two(), torch.randn(3, 4)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = _lora_on(model, "a")
    handle = model.a.register_forward_hook(_clamp)
    want = _by_hand(model, base, x, [delta, _clamp])
    for change in ("disable", "merge"):
        getattr(delta, change)()
        getattr(delta, {"disable": "enable", "merge": "unmerge"}[change])()
        with torch.no_grad():
            torch.testing.assert_close(model(x), want)
    handle.remove()
    delta.detach()


def test_hooks_and_deltas_run_in_the_order_they_were_added():
    model, x = Two(), torch.randn(3, 4)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    first = _lora_on(model, "a", seed=1)
    model.a.register_forward_hook(_affine)
    second = _lora_on(model, "a", seed=2)
    want = _by_hand(model, base, x, [first, _affine, second])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    first.disable()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _by_hand(model, base, x, [_affine, second]))
    first.enable()
    second.disable()
    second.enable()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_merging_past_another_hook_is_refused_and_changes_nothing():
    model = Two()
    handle = model.a.register_forward_hook(_clamp)  # registered before the delta: it sees the output first
    delta = _lora_on(model, "a")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(hd.MergeError, match="forward hook registered before it"):
        delta.merge()
    assert not delta.merged and all(same_bits(t, before[n]) for n, t in model.state_dict().items())
    handle.remove()
    delta.merge()  # without the hook in the way it merges
    delta.unmerge()


# -- 4. weights under torch.nn.utils.parametrize ---------------------------------------------------


def test_merge_writes_through_weight_norm_exactly():
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
    model, x = Holder(layer), torch.randn(3, 6)
    snap = snapshot(model)
    delta = _lora_on(model, "layer")
    with torch.no_grad():
        want = model(x)
    assert_merge_round_trip(model, delta, lambda: model(x), want, snap)


@pytest.mark.parametrize("constraint", ["orthogonal", "old-weight_norm"])
def test_a_parametrization_that_cannot_hold_the_merge_is_refused(constraint):
    torch.manual_seed(0)
    if constraint == "orthogonal":
        layer = nn.utils.parametrizations.orthogonal(nn.Linear(5, 5))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = nn.utils.weight_norm(nn.Linear(5, 5))
    model = Holder(layer)
    delta = _lora_on(model, "layer")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(hd.MergeError, match="parametrized|not a parameter of its own"):
        delta.merge()
    assert not delta.merged and all(same_bits(t, before[n]) for n, t in model.state_dict().items())


def test_ln_tuning_refuses_a_parametrized_norm():
    norm = nn.LayerNorm(4)
    nn.utils.parametrize.register_parametrization(norm, "weight", nn.Identity())
    model = Holder(norm)
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError, match="parametriz"):
        hd.attach(model, hd.LNTuningConfig(targets=["layer"]))
    assert_restored(model, snap)


# -- 5. also_train on a tied output head -------------------------------------------------------------


def test_a_tied_head_in_also_train_is_one_copy_used_by_both_ends():
    model, inputs, _ = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = snapshot(model)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["c_attn"], also_train=["lm_head"]))
    perturb(delta, std=0.2)
    copy_ = delta.pieces["lm_head"].weight
    ref = bare_copy(model)
    with torch.no_grad():
        ref.transformer.wte.weight.copy_(copy_)  # tied: input embedding and head both take the copy
        ref_lora = hd.attach(ref, hd.LoRAConfig(r=2, targets=["c_attn"]))
        for a, b in zip(ref_lora.parameters(), [p for n, p in delta.named_parameters() if "lora" in n], strict=True):
            a.copy_(b)
        want = ref(**inputs).logits
        unmerged = model(**inputs).logits
    torch.testing.assert_close(unmerged, want, rtol=1e-5, atol=1e-5)
    delta.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.transformer.wte.weight
    delta.unmerge()
    delta.detach()
    assert_restored(model, snap)


def test_an_untied_copy_of_a_tied_head_refuses_to_merge():
    model, inputs, _ = build("gpt2")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["c_attn"], also_train=["lm_head"], tie_also_train=False))
    perturb(delta, std=0.2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(hd.MergeError, match="tie_also_train=True"):
        delta.merge()
    assert not delta.merged and all(same_bits(t, before[n]) for n, t in model.state_dict().items())


def test_peft_modules_to_save_on_a_tied_head_loads_with_peft_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs, _ = build("gpt2")
    twin = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
        want = twin(**inputs).logits
    twin.save_pretrained(tmp_path)
    loaded = hd.load_peft(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(hd.MergeError):
        loaded.merge()


# -- 6. torch.inference_mode() -------------------------------------------------------------------------


def test_a_delta_attached_inside_inference_mode_trains_and_merges():
    model, inputs, _ = build("llama")
    snap = snapshot(model)
    with torch.inference_mode():
        delta = hd.attach(model, hd.LoRAConfig(r=2, also_train=["lm_head"]))
    assert all(not p.is_inference() and p.requires_grad for p in delta.parameters())
    model.train()
    opt = torch.optim.SGD(delta.parameters(), lr=0.1)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    with torch.inference_mode():
        want = model.eval()(**inputs).logits
        delta.merge()
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        delta.unmerge()
        delta.detach()
    assert_restored(model, snap)


def test_load_inside_inference_mode_gives_a_trainable_delta(tmp_path):
    model, inputs, _ = build("llama")
    perturb(hd.attach(model, hd.LoRAConfig(r=2)))
    hd.deltas(model)["lora"].save(tmp_path)
    fresh = build("llama")[0]
    with torch.inference_mode():
        loaded = hd.load(fresh, tmp_path)
    assert all(not p.is_inference() for p in loaded.parameters())


# -- 7. static caches ---------------------------------------------------------------------------------


def _generate(model, inputs, **kw):
    return model.generate(
        inputs["input_ids"],
        attention_mask=torch.ones_like(inputs["input_ids"]),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        **kw,
    )


@pytest.mark.parametrize(
    "cfg",
    [hd.PrefixConfig(num_virtual_tokens=3), hd.SoftPromptConfig(num_virtual_tokens=3)],
    ids=["prefix", "soft_prompt"],
)
def test_prompt_methods_refuse_a_static_cache_clearly(cfg):
    model, inputs, _ = build("llama")
    hd.attach(model, cfg)
    with pytest.raises(hd.UnsupportedModuleError, match="preallocated StaticCache"):
        _generate(model, inputs, cache_implementation="static")
    _generate(model, inputs)  # the dynamic cache still works


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_soft_prompt_on_an_encoder_decoder_works_with_a_static_cache(arch):
    model, inputs, _ = build(arch)  # the prompt goes to the encoder; the decoder's cache is untouched
    model.generation_config.update(decoder_start_token_id=0, eos_token_id=None, pad_token_id=0)
    perturb(hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=3)), std=0.5)
    assert torch.equal(_generate(model, inputs, cache_implementation="static"), _generate(model, inputs))


def test_lora_generates_the_same_tokens_with_a_static_cache():
    model, inputs, _ = build("llama")
    perturb(hd.attach(model, hd.LoRAConfig(r=2)), std=0.3)
    assert torch.equal(_generate(model, inputs, cache_implementation="static"), _generate(model, inputs))


# -- 8. errors from the filesystem ----------------------------------------------------------------------


@pytest.mark.parametrize("save", ["save", "save_peft"])
def test_saving_under_a_path_that_is_a_file_is_a_hookdelta_error(save, tmp_path):
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(hd.DeltaFileError) as info:
        getattr(delta, save)(tmp_path / "file" / "sub")
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("save", ["save", "save_peft"])
def test_a_read_only_directory_is_a_hookdelta_error_and_the_old_save_stays(save, tmp_path, monkeypatch):
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2))
    getattr(delta, save)(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    perturb(delta)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    if os.geteuid() != 0:  # a real read-only directory where the OS enforces it (root ignores modes)
        tmp_path.chmod(0o555)
    else:
        monkeypatch.setattr(os, "replace", read_only)
        monkeypatch.setattr("pathlib.Path.write_text", read_only)
    try:
        with pytest.raises(hd.DeltaFileError, match="cannot write") as info:
            getattr(delta, save)(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_a_safetensors_error_is_a_hookdelta_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import hookdelta.persistence as persistence

    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2))

    def fail(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem })")

    monkeypatch.setattr(persistence, "save_file", fail)
    with pytest.raises(hd.DeltaFileError) as info:
        delta.save(tmp_path / "out")
    assert isinstance(info.value.__cause__, SafetensorError)


# -- 9. a delta's identity on save ---------------------------------------------------------------------


@pytest.mark.parametrize("save", ["save", "save_peft"])
def test_two_deltas_with_the_same_name_do_not_overwrite_each_other(save, tmp_path):
    first = hd.attach(build("llama")[0], hd.LoRAConfig(r=2))
    second = hd.attach(build("llama")[0], hd.LoRAConfig(r=2))
    assert first.name == second.name == "lora"
    getattr(first, save)(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(hd.DeltaFileError, match="overwrite=True"):
        getattr(second, save)(tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    perturb(first)
    getattr(first, save)(tmp_path)  # the same delta saving again (a checkpoint loop) is fine
    getattr(second, save)(tmp_path, overwrite=True)


def test_identity_survives_save_and_load_but_not_a_copy(tmp_path):
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2))
    delta.save(tmp_path)
    delta.detach()
    loaded = hd.load(model, tmp_path)
    perturb(loaded)
    loaded.save(tmp_path)  # it is the same delta, so this is a checkpoint, not a clash
    clone = copy.deepcopy(model)
    with pytest.raises(hd.DeltaFileError, match="overwrite=True"):
        hd.deltas(clone)["lora"].save(tmp_path)


# -- 10. consistent advice in a stack ------------------------------------------------------------------


def test_lora_and_dora_on_one_layer_give_one_true_instruction():
    model, _, _ = build("llama")
    lora = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name="plain")
    dora = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"], use_dora=True), name="dora")
    perturb(lora)
    messages = []
    for d in (lora, dora):
        with pytest.raises(hd.MergeError) as info:
            d.merge()
        messages.append(str(info.value))
    assert all("neither can be merged" in m and "Detach one of them" in m for m in messages)
    assert not any("first" in m for m in messages)


def test_merge_first_advice_is_true_when_given():
    model, _, _ = build("llama")
    scale = hd.attach(model, hd.IA3Config(targets=["q_proj"]), name="scale")
    lora = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]), name="plain")
    perturb(scale)
    perturb(lora)
    with pytest.raises(hd.MergeError, match="Merge 'scale' first"):
        lora.merge()
    scale.merge()  # following the advice works
    lora.merge()


# -- 11. smaller gaps ----------------------------------------------------------------------------------


def _resnet():
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return tf.ResNetForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)


def test_bitfit_defaults_work_on_a_conv_net_with_batchnorm():
    model, x = _resnet()
    snap = snapshot(model)
    delta = hd.attach(model, hd.BitFitConfig())
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and set(bns) <= {p.key for p in delta.pieces.values()}
    perturb(delta)
    with torch.no_grad():
        want = model(pixel_values=x).logits
    # BatchNorm has a bias of its own: BitFit merges into it
    assert_merge_round_trip(model, delta, lambda: model(pixel_values=x).logits, want, snap, atol=1e-5)


def test_ln_tuning_covers_batchnorm():
    model, x = _resnet()
    delta = hd.attach(model, hd.LNTuningConfig())
    assert any(isinstance(model.get_submodule(p.key), nn.BatchNorm2d) for p in delta.pieces.values())


class TimmLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize(
    "arch,head", [("bert", "classifier"), ("vit", "classifier"), ("timm", "head"), ("resnet", "classifier.1")]
)
def test_all_linear_leaves_out_the_model_head(arch, head):
    model = TimmLike() if arch == "timm" else _resnet()[0] if arch == "resnet" else build(arch)[0]
    assert isinstance(model.get_submodule(head), nn.Linear)
    picked = hd.match(model, nn.Linear)
    assert head in picked
    try:
        assert head not in hd.match(model, "all-linear")
    except hd.SelectorError:  # the head was its only linear layer
        assert arch == "resnet"


def test_hd_load_matches_a_wrapper_prefix(tmp_path):
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    masked = tf.BertForMaskedLM(config).eval()
    bare = masked.bert
    delta = hd.attach(bare, hd.LoRAConfig(r=2))
    perturb(delta)
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        want = bare(input_ids=ids).last_hidden_state
    delta.save(tmp_path)
    delta.detach()
    with pytest.warns(hd.PathPrefixWarning, match="with the 'bert.' prefix"):
        hd.load(masked, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(masked.bert(input_ids=ids).last_hidden_state, want)


def test_a_model_carrying_a_peft_adapter_explains_the_refusal():
    peft = pytest.importorskip("peft")
    model, inputs, _ = build("llama")
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), model)
    assert not any(".lora_" in n for n in hd.match(model, "all-linear"))
    snap = snapshot(model)
    with pytest.raises(hd.UnsupportedModuleError, match=r"another adapter library.*q_proj\.base_layer"):
        hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj"]))
    assert_same(model, snap)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=["q_proj.base_layer"]))  # the model's own layer
    perturb(delta, std=0.3)
    with torch.no_grad():
        with delta.disabled():
            off = model(**inputs).logits
        assert not torch.equal(model(**inputs).logits, off)


def test_a_layer_replaced_after_attach_is_noticed():
    model = Two()
    snap = snapshot(model)
    delta = _lora_on(model, "a")
    original = model.a
    model.a = nn.Linear(4, 4)
    for call in (delta.disable, delta.merge, lambda: delta.save("unused"), lambda: model(torch.randn(2, 4))):
        with pytest.raises(hd.DeltaStateError, match="was replaced after the delta was attached"):
            call()
    delta.detach()  # always possible, and leaves the old layer as it was
    model.a = original
    assert_restored(model, snap)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_resize_token_embeddings_after_attach_is_refused_at_the_next_forward(target):
    """transformers puts new embedding / head modules in place: a delta on the old one would run
    nowhere (silently) or index out of range; the next forward says so, detach still works."""
    model, inputs, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=[target]))
    perturb(delta, std=0.3)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(hd.DeltaStateError, match="resize_token_embeddings"):
        model(**inputs)
    with pytest.raises(hd.DeltaStateError, match="was replaced"):
        delta.merge()
    delta.detach()
    assert hd.deltas(model) == {} and model(**inputs).logits.shape[-1] == model.config.vocab_size
