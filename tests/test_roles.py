"""Layer roles discovered from structure, on many transformers model types built from tiny
configs (`AutoConfig.for_model`): every role that resolves really is what it says (checked
against each block's width and the config's tensor-parallel plan), the default positions of
LoRA, Houlsby adapters and IA3 attach, a perturbed delta changes the output and detach is
exact. The model types are one list; `test_coverage` prints how many pass."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn as nn
import transformers as tf
from helpers import assert_restored, perturb, snapshot

import hookdelta as hd
from hookdelta.modules import is_linear_like, layer_dims
from hookdelta.roles import check_tp_plan

pytestmark = pytest.mark.filterwarnings("ignore")

SIZES = dict(
    hidden_size=32,
    d_model=32,
    n_embd=32,
    dim=32,
    embed_dim=32,
    hidden_dim=32,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    n_layers=2,
    encoder_layers=2,
    decoder_layers=2,
    num_decoder_layers=2,
    num_encoder_layers=2,
    num_attention_heads=4,
    n_head=4,
    n_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=2,
    num_heads=4,
    intermediate_size=64,
    d_ff=64,
    n_inner=64,
    ffn_dim=64,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    ffn_hidden_size=64,
    vocab_size=99,
    max_position_embeddings=64,
    n_positions=64,
    head_dim=8,
    d_kv=8,
    kv_channels=8,
    image_size=32,
    patch_size=8,
    num_channels=3,
)
FIXES = {  # model_type -> config fields the generic shrinking gets wrong
    "phi3": dict(pad_token_id=0),
    "glm": dict(pad_token_id=0),
    "glm4": dict(pad_token_id=0),
    "smollm3": dict(pad_token_id=0),
    "marian": dict(pad_token_id=0, decoder_start_token_id=0),
    "modernbert": dict(pad_token_id=0, global_attn_every_n_layers=2, local_attention=8),
    "whisper": dict(
        pad_token_id=0, num_mel_bins=16, max_source_positions=30, max_target_positions=32, decoder_start_token_id=0
    ),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        num_key_value_heads=4,
        head_dim=4,
        qk_head_dim=12,
    ),  # (nope + rope: transformers 4.x reads the stored sum)
    "swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, patch_size=4),
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "jamba": dict(
        num_experts=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=4,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),  # (transformers 4.x refuses the CPU otherwise)
}
MODEL_TYPES = [
    # decoders: dense, GQA, fused qkv, parallel attention, MLA, mixture of experts
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "codegen",
    "bloom",
    "falcon",
    "opt",
    "mpt",
    "stablelm",
    "olmo",
    "olmo2",
    "cohere",
    "granite",
    "starcoder2",
    "persimmon",
    "xglm",
    "biogpt",
    "gpt_bigcode",
    "helium",
    "glm",
    "glm4",
    "exaone4",
    "smollm3",
    "arcee",
    "seed_oss",
    "apertus",
    "lfm2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "phimoe",
    "minimax",
    "deepseek_v3",
    # hybrid attention / state space, and state space alone
    "falcon_h1",
    "jamba",
    "mamba",
    # encoders
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "deberta",
    "deberta-v2",
    "distilbert",
    "albert",
    "mpnet",
    "camembert",
    "ernie",
    "roformer",
    "modernbert",
    "convbert",
    "nystromformer",
    "yoso",
    "mobilebert",
    "data2vec-text",
    "megatron-bert",
    "layoutlm",
    "canine",
    "longformer",
    "big_bird",
    "rembert",
    # encoder-decoders
    "t5",
    "mt5",
    "umt5",
    "bart",
    "mbart",
    "pegasus",
    "marian",
    "blenderbot",
    "blenderbot-small",
    "led",
    "longt5",
    "m2m_100",
    "plbart",
    "bigbird_pegasus",
    "prophetnet",
    "switch_transformers",
    "pegasus_x",
    "whisper",
    # vision and audio encoders
    "vit",
    "deit",
    "beit",
    "swin",
    "dinov2",
    "vit_mae",
    "data2vec-vision",
    "vit_msn",
    "yolos",
    "ijepa",
    "dinov3_vit",
    "segformer",
    "clip_vision_model",
    "siglip_vision_model",
    "wav2vec2",
    "hubert",
    "wavlm",
    "data2vec-audio",
]
RESULTS: dict[str, str] = {}


def build(model_type: str):
    config = tf.AutoConfig.for_model(model_type)
    todo = [config]
    while todo:
        c = todo.pop()
        for key, value in SIZES.items():
            if isinstance(getattr(c, key, None), int) and not isinstance(getattr(c, key), bool):
                with contextlib.suppress(AttributeError, NotImplementedError):  # computed (Falcon's head_dim, ...)
                    setattr(c, key, value)
        todo += [
            getattr(c, k)
            for k in ("text_config", "vision_config", "encoder", "decoder")
            if isinstance(getattr(c, k, None), tf.PretrainedConfig)
        ]
    for key, value in FIXES.get(model_type, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    name = model.main_input_name
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        inputs = {"pixel_values": torch.randn(2, config.num_channels, size, size, generator=g)}
    elif name == "input_values":
        inputs = {"input_values": torch.randn(2, 1600, generator=g)}
    elif name == "input_features":
        inputs = {"input_features": torch.randn(2, config.num_mel_bins, 60, generator=g)}
    else:
        inputs = {"input_ids": torch.randint(3, 90, (2, 8), generator=g)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, 90, (2, 5), generator=g)
    return model, inputs


def first(output) -> torch.Tensor:
    return output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output[0]


def block_width(model, path: str) -> int:
    """The most common input width of the linear layers in the block around `path`."""
    parts = path.split(".")
    cut = max(i for i, p in enumerate(parts) if p.isdigit())
    block = model.get_submodule(".".join(parts[: cut + 1]))
    widths = Counter(layer_dims(m, m, n)[0] for n, m in block.named_modules() if is_linear_like(m))
    return widths.most_common(1)[0][0]


def widths(model) -> set[int]:
    """The other widths a config names: hidden and embedding sizes, MLA's compressions."""
    names = ("hidden_size", "embedding_size", "q_lora_rank", "kv_lora_rank", "d_model")
    return {getattr(model.config, n) for n in names if isinstance(getattr(model.config, n, None), int)}


def check_shapes(model, found: dict) -> None:
    """q/k/v read the block's width, o writes it; the feed-forward input reads it, its output
    writes it."""
    for role, paths in found.items():
        if role in ("norm", "ffn", "moe.router"):
            continue  # (the router and fused experts: tests/test_moe.py checks them against the config)
        for path in paths:
            if path not in dict(model.named_modules()):
                continue
            width = block_width(model, path)
            d_in, d_out = layer_dims(model, model.get_submodule(path), path)
            if role in ("attn.q", "attn.k", "attn.v"):  # (MLA reads its compressions, MobileBERT v the input)
                assert d_in in {width} | widths(model), (role, path, d_in, width)
            elif role == "attn.o":
                assert d_out == width, (role, path, d_out, width)
            elif role == "ffn.in":
                assert d_in == width, (role, path, d_in, width)
            else:
                assert d_out == width, (role, path, d_out, width)


DEFAULTS = {"lora": hd.LoRAConfig(r=2), "houlsby": hd.AdapterConfig(bottleneck_dim=4), "ia3": hd.IA3Config()}
# WavLM's attention passes out_proj's weight to torch's functional attention and never calls
# out_proj: an adapter there could not act, and is refused at attach (LoRA and IA3 act through the weight)
REFUSED = {("wavlm", "houlsby")}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_roles_and_default_positions(model_type):
    model, inputs = build(model_type)
    found = hd.roles(model)
    check_shapes(model, found)
    assert check_tp_plan(model, found) == [], "the config's tensor-parallel plan disagrees"
    has_attention = all(found.get(r) for r in ("attn.q", "attn.k", "attn.v", "attn.o"))
    with torch.no_grad():
        bare = first(model(**inputs))  # (BigBird swaps its attention module at its first forward)
    snap = snapshot(model)
    for method, cfg in DEFAULTS.items():
        if not has_attention:  # a state-space model: the defaults say what is missing
            with pytest.raises(hd.SelectorError, match="attention|no single module"):
                hd.attach(model, cfg)
            continue
        if (model_type, method) in REFUSED:
            with pytest.raises(hd.UnsupportedModuleError, match="without calling its forward"):
                hd.attach(model, cfg)
            assert_restored(model, snap)
            continue
        delta = hd.attach(model, cfg)
        perturb(delta, std=0.3)
        with torch.no_grad():
            assert not torch.allclose(first(model(**inputs)), bare, atol=1e-5), f"{method} changed nothing"
        delta.detach()
        assert_restored(model, snap)
    RESULTS[model_type] = "attention + ffn" if found.get("ffn.in") else "attention" if has_attention else "no attention"


def test_coverage():
    """Printed with -s; at least 60 types must pass (run after the parametrized test)."""
    if len(RESULTS) < len(MODEL_TYPES):
        pytest.skip("run together with test_roles_and_default_positions")
    kinds = Counter(RESULTS.values())
    print(f"\nroles discovered on {len(RESULTS)} model types: {dict(kinds)}")
    print({k: sorted(t for t, v in RESULTS.items() if v == k) for k in kinds if k != "attention + ffn"})
    assert len(RESULTS) >= 60


def test_discovery_failure_names_what_it_found():
    model, _ = build("mamba")
    with pytest.raises(
        hd.SelectorError,
        match=r"found no attention or feed-forward layers in MambaModel.*2 repeated "
        r"blocks.*hd.roles",
    ):
        hd.match(model, "attn.q")


def test_visualize_shows_the_roles():
    from rich.console import Console

    model, _ = build("llama")
    console = Console(record=True, width=200)
    hd.visualize(model, show_roles=True, console=console)
    text = console.export_text()
    assert "⟨attn.q⟩" in text and "⟨ffn.out⟩" in text


# -- LoRA on slices of fused q/k/v projections ------------------------------------------------------


def _split_qkv(model_type, model, out):
    """The fused output split into q, k, v from the config alone, by the layout each model's attention
    code documents (written out here, so the check does not lean on hookdelta's layouts or on the
    models' private helpers)."""
    config = model.config
    b, s, _ = out.shape
    if model_type == "gpt2":
        return out.split(config.n_embd, dim=-1)
    if model_type == "gpt_bigcode":
        q, kv = out.split((config.n_embd, 2 * (config.n_embd // config.n_head)), dim=-1)
        return (q, *kv.chunk(2, dim=-1))
    if model_type == "phi3":
        hd = config.hidden_size // config.num_attention_heads
        q_end = config.num_attention_heads * hd
        return (
            out[..., :q_end],
            out[..., q_end : q_end + config.num_key_value_heads * hd],
            out[..., q_end + config.num_key_value_heads * hd :],
        )
    if model_type in ("gpt_neox", "bloom"):  # per head: [h0: q k v | h1: q k v | ...]
        heads = config.num_attention_heads if model_type == "gpt_neox" else config.n_head
        return out.view(b, s, heads, 3, -1).unbind(3)
    # falcon: per kv-group [q.. k v] (new architecture), per head [q k v], or multi-query [q.. | k | v]
    heads = config.num_attention_heads
    if config.new_decoder_architecture:
        grouped = out.view(b, s, config.num_kv_heads, heads // config.num_kv_heads + 2, -1)
        return grouped[..., :-2, :], grouped[..., -2, :], grouped[..., -1, :]
    if not config.multi_query:
        return out.view(b, s, heads, 3, -1).unbind(3)
    flat = out.view(b, s, heads + 2, -1)
    return flat[..., :-2, :], flat[..., -2, :], flat[..., -1, :]


FUSED = {
    "gpt2": {},
    "gpt_bigcode": {},
    "phi3": {},
    "gpt_neox": {},
    "bloom": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "falcon-per-head": {},
    "falcon-multi-query": {"new_decoder_architecture": False, "multi_query": True},
}


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_slices_touch_only_their_slices(case):
    model_type = case.split("-")[0]
    FIXES_BACKUP = dict(FIXES.get(model_type, {}))
    FIXES[model_type] = {**FIXES_BACKUP, **FUSED[case]}
    try:
        model, inputs = build(model_type)
    finally:
        FIXES[model_type] = FIXES_BACKUP
    fused = hd.roles(model)["attn.q"][0]
    assert fused in hd.roles(model)["attn.v"]
    snap = snapshot(model)
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=[fused], fused_slices=["v", "q"]))
    perturb(delta, std=0.3)
    seen = []  # registered after the delta, so it sees the delta's output
    handle = model.get_submodule(fused).register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    with torch.no_grad():
        with delta.disabled():
            model(**inputs)
        adapted = first(model(**inputs))
    handle.remove()
    changed = [
        (a - b).abs().max().item()
        for a, b in zip(_split_qkv(model_type, model, seen[1]), _split_qkv(model_type, model, seen[0]), strict=True)
    ]
    assert changed[0] > 1e-4 and changed[1] == 0.0 and changed[2] > 1e-4, changed  # q and v, never k
    delta.merge()
    with torch.no_grad():
        torch.testing.assert_close(first(model(**inputs)), adapted, rtol=1e-4, atol=1e-5)
    delta.unmerge()
    with pytest.raises(hd.UnsupportedModuleError, match="fused_slices"):
        delta.save_peft("unused")
    delta.detach()
    assert_restored(model, snap)


def test_fused_slices_refuse_an_unknown_layout():
    model, _ = build("mpt")
    model.config.model_type = "unknown-mpt"
    with pytest.raises(hd.SelectorError, match="layout hookdelta does not know"):
        hd.attach(model, hd.LoRAConfig(r=2, targets=["attn.q"], fused_slices=["q"]))


def test_blocks_that_are_plain_sequentials_get_roles_and_take_deltas():
    """Layers named only by their index (a ModuleList of nn.Sequential(Linear, Tanh, Linear))."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)) for _ in range(3)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 4)
    assert hd.roles(model) == {
        "ffn.in": [f"blocks.{i}.0" for i in range(3)],
        "ffn.out": [f"blocks.{i}.2" for i in range(3)],
    }
    snap, bare = snapshot(model), model(x).detach()
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets=nn.Linear))
    perturb(delta, std=0.3)
    assert not torch.allclose(model(x), bare)
    delta.detach()
    assert_restored(model, snap)


def test_a_mixture_block_with_two_expert_modules_is_one_mixture_with_one_router():
    """Found by mypy (issue 31): the check that a mixture block was already recorded compared a
    path with (path, experts) pairs, so it never matched, and a block holding two fused-expert
    modules was scanned twice (its router listed twice before roles() removed the repeat)."""
    from collections import defaultdict

    from hookdelta.roles import _fused_experts

    def experts() -> nn.Module:
        m = nn.Module()
        m.gate_up_proj = nn.Parameter(torch.zeros(4, 32, 16))
        m.down_proj = nn.Parameter(torch.zeros(4, 16, 32))
        return m

    router = nn.Module()
    router.weight = nn.Parameter(torch.zeros(4, 16))
    members = {"mlp": nn.Module(), "mlp.experts_a": experts(), "mlp.experts_b": experts(), "mlp.gate": router}
    out: dict[str, list[str]] = defaultdict(list)
    mixtures = _fused_experts("layers.0", members, {4}, 16, out)
    assert mixtures == ["mlp"]
    assert out["moe.router"] == ["layers.0.mlp.gate.weight"]
    assert sorted(out["ffn.in"]) == ["layers.0.mlp.experts_a.gate_up_proj", "layers.0.mlp.experts_b.gate_up_proj"]
