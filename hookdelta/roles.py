"""Semantic layer roles found from a model's structure, on any architecture.

`hd.roles(model)` maps `attn.q`, `attn.k`, `attn.v`, `attn.o`, `ffn.in`, `ffn.out`, `ffn` (the
whole feed-forward module) and `norm` to module paths, with no table of model families:

1. the repeated blocks: the elements of a ModuleList whose length is a layer count of the
   model's config (sub-configs included), or whose class transformers names in
   `_no_split_modules`; outermost ones win (a T5 block, not the layers inside it);
2. inside a block, each linear layer (nn.Linear, transformers Conv1D, quantized linears) is
   placed by the modules around it (an attention module: `attn`, `attention`, ...; a
   feed-forward one: `mlp`, `ffn`, `intermediate`, ...) and by its own name (q / query /
   q_proj / wq ..., fused qkv / c_attn / query_key_value / Wqkv ...); what names do not
   settle, shapes do, against the block's width (the most common input width of its
   linears): in the feed-forward part width -> wider is the input side and wider -> width the
   output side; in attention, layers reading the width in the order they were created are
   q, k, v and the one writing the width is o;
3. the transformers tensor-parallel plan (`base_model_tp_plan`), where the config has one,
   is checked against the result: q/k/v colwise, o rowwise.

A fused q/k/v projection (GPT-2 `c_attn`, Phi-3 `qkv_proj`, GPT-NeoX `query_key_value`,
MPT `Wqkv`) appears under each of attn.q, attn.k and attn.v. `norm` is every
normalization layer, found by type.

Mixture-of-experts layers: experts kept as fused 3-D parameters [experts, out, in] (transformers
5: `mlp.experts.gate_up_proj`, `down_proj`; `[experts, in, out]` where the module says
`is_transposed`) appear under ffn.in / ffn.out as *parameter* paths, one site holding every
expert; experts kept as modules (transformers 4) as their linear layers. `ffn` is the whole
mixture block (router, experts and any shared experts, whose layers are ordinary ffn.in /
ffn.out), and `moe.router` the router: a linear layer (width -> number of experts) or the
router module's 2-D weight (a parameter path) where the router is no linear layer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .errors import SelectorError
from .modules import exists, host, is_linear_like, layer_dims, named_modules

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out", "ffn", "moe.router", "norm")
SEMANTIC = ROLES  # the names selectors accept

_ATTN = re.compile(r"attn|attention")
_FFN = re.compile(r"mlp|ffn|^ff$|feed_?forward|intermediate|densereludense|^output$|shared_expert|^experts?$|moe")
_NAMES = {  # leaf name (lowercase) -> role inside an attention module
    "attn.q": r"q|query|q_proj|query_proj|q_lin|wq|to_q|q_b_proj|query_global|qproj",
    "attn.k": r"k|key|k_proj|key_proj|k_lin|wk|to_k|key_global|kproj",
    "attn.v": r"v|value|v_proj|value_proj|v_lin|wv|to_v|value_global|vproj",
    "attn.o": r"o|o_proj|out_proj|dense|c_proj|out_lin|wo|to_out|output|proj|out|out_proj_global",
    "fused": r"qkv|qkv_proj|c_attn|query_key_value|wqkv|in_proj|to_qkv|qkv_lin",
    "fused_kv": r"kv_b_proj|kv_proj|to_kv|wkv",
}
_FFN_NAMES = {
    "ffn.in": r"fc1|c_fc|wi|wi_\d|up_proj|gate_proj|gate_up_proj|dense_h_to_4h|w1|w3|lin1|intermediate|fc_in|up",
    "ffn.out": r"fc2|c_proj|wo|down_proj|dense_4h_to_h|w2|lin2|output|fc_out|down",
}
_ROUTER = r"gate|router|routing|classifier|moe_gate"  # names of mixture-of-experts routers (and their modules)
_LAYER_COUNTS = (
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "depth",
)
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_layer")

# model_type -> {role: paths relative to a block} where discovery alone would be wrong (see the
# closing note of the issue that added this file; empty entries are fine: discovery is right)
CORRECTIONS: dict[str, dict[str, tuple[str, ...]]] = {}


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    out: list[Any] = []
    todo = [config] if config is not None else []
    while todo:
        c = todo.pop()
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo += [
            v for k, v in vars(c).items() if hasattr(v, "to_dict") and k.endswith(("config", "encoder", "decoder"))
        ]
        layers = _field(c, "per_layer_config")  # heterogeneous configs: the per-layer ones name the expert counts
        todo += [v for v in (layers if isinstance(layers, (list, tuple)) else []) if hasattr(v, "to_dict")]
    return out


def _field(config: Any, name: str) -> Any:
    """config.name or None; configs whose fields vary per layer raise on a global read (transformers'
    heterogeneous configs), which counts as absent here."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 (a config's property may raise anything: a per-layer config refuses a global read)
        return None


def _counts(model: nn.Module, names: tuple[str, ...]) -> set[int]:
    return {v for c in _configs(model) for n in names for v in [_field(c, n)] if isinstance(v, int) and v > 0}


def blocks(model: nn.Module, paths: list[tuple[str, nn.Module]]) -> list[str]:
    """The repeated blocks: elements of module lists whose class transformers / diffusers name in
    `_no_split_modules` (the innermost such: a diffusers transformer block, not the U-Net stage
    around it), else elements of lists as long as a layer count of the config (the outermost:
    a T5 block, not the two layers inside it), else any list elements holding linear layers."""
    counts = _counts(model, _LAYER_COUNTS)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    named, counted, other = [], [], []
    for path, module in paths:
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not len(module):
            continue
        for name, kid in module._modules.items():
            full = f"{path}.{name}" if path else name
            if type(kid).__name__ in no_split:
                named.append(full)
            elif len(module) in counts:
                counted.append(full)
            elif any(is_linear_like(m) for m in kid.modules()):
                other.append(full)
    if named:
        return [p for p in named if not any(q.startswith(p + ".") for q in named)]
    found = counted or other
    found.sort(key=len)
    outer: list[str] = []
    for path in found:
        if not any(path.startswith(o + ".") for o in outer):
            outer.append(path)
    return outer


def _full(pattern: str, text: str) -> bool:
    return re.fullmatch(f"(?:{pattern})", text) is not None


def _ffn_name(leaf: str) -> str | None:
    """The feed-forward role a layer's (or expert tensor's) own name says, if any."""
    return next((r for r, pat in _FFN_NAMES.items() if _full(pat, leaf)), None)


def _classify_block(
    block: str, members: list[tuple[str, nn.Module]], experts: set[int], members_by_rel: dict[str, nn.Module]
) -> dict[str, list[str]]:
    """Roles of the linear layers of one block (paths relative to the model)."""
    dims = {rel: layer_dims(m, m, rel) for rel, m in members}
    width = Counter(i for i, _ in dims.values()).most_common(1)[0][0] if dims else 0
    out: dict[str, list[str]] = {r: [] for r in ROLES}
    attn: dict[str, list[str]] = {}  # attention module -> its unnamed members, in creation order
    named_attn: set[str] = set()  # attention modules whose layers names placed
    ffn_side: dict[str, list[str]] = {}
    for rel, _ in members:
        parts = rel.split(".")
        named_parts = [p for p in parts if not p.isdigit()]  # to_out.0 is named to_out; ff.net.2 net
        # (a block that is a plain nn.Sequential has layers named only by their index: no leaf name)
        leaf, owners = (named_parts[-1].lower(), [p.lower() for p in named_parts[:-1]]) if named_parts else ("", [])
        d_in, d_out = dims[rel]
        path = f"{block}.{rel}"
        in_router = bool(experts) and any(_full(_ROUTER, o) for o in owners)
        if (
            d_out in experts
            and d_in == width
            and (in_router or re.search(_ROUTER, leaf) and not any(_full(pat, leaf) for pat in _FFN_NAMES.values()))
        ):
            out["moe.router"].append(path)  # (width -> one logit per expert: no feed-forward layer)
            continue
        if in_router:
            continue  # the hidden layers of a router that is a small MLP
        in_attn = any(_ATTN.search(p) for p in owners)
        if in_attn:
            named = next((r for r, pat in _NAMES.items() if _full(pat, leaf)), None)
            module_path = ".".join(named_parts[:-1])
            if named is None:
                attn.setdefault(module_path, []).append(path)
                continue
            named_attn.add(module_path)
            for role in {"fused": ("attn.q", "attn.k", "attn.v"), "fused_kv": ("attn.k", "attn.v")}.get(
                named, (named,)
            ):
                out[role].append(path)
            continue
        in_ffn = any(_FFN.search(p) for p in owners) or not owners or _FFN.search(leaf) is not None
        if not in_ffn:
            continue  # a state-space mixer, a convolution module, ...: no role
        named = _ffn_name(leaf)
        if named is None and owners and _full(_FFN_NAMES["ffn.in"], owners[-1]):
            named = "ffn.in"  # BERT: intermediate.dense
        if named is None and owners and owners[-1] == "output" and leaf == "dense":
            named = "ffn.out"  # BERT: output.dense
        if named is None:
            named = (
                "ffn.in" if d_in == width and d_out > width else "ffn.out" if d_out == width and d_in > width else None
            )
        if named is not None:
            out[named].append(path)
            ffn_side.setdefault(named, []).append(rel)
    for module_path, paths in attn.items():
        if module_path not in named_attn:  # (else its other layers are compressions, convolutions, gates)
            _by_shape(block, paths, dims, width, out)
    ffn = _ffn_module(ffn_side, members_by_rel)
    mixtures = _fused_experts(block, members_by_rel, experts, width, out)
    if ffn and not any(ffn == m or ffn.startswith(m + ".") for m in mixtures):  # (shared experts are inside)
        out["ffn"].append(f"{block}.{ffn}")
    if not mixtures and ffn and out["moe.router"]:
        mixtures = [ffn]  # experts kept as modules: the feed-forward module is the mixture block
    out["ffn"] += [f"{block}.{m}" for m in mixtures if f"{block}.{m}" not in out["ffn"]]
    return out


def _fused_experts(
    block: str, members_by_rel: dict[str, nn.Module], experts: set[int], width: int, out: dict[str, list[str]]
) -> list[str]:
    """Fused expert tensors ([experts, out, in], or [experts, in, out] where the module says
    `is_transposed`) as ffn.in / ffn.out parameter paths, by name and else by which side reads the
    width; routers that are no linear layer (a 2-D weight [experts, width]) as moe.router
    parameter paths. Returns the mixture blocks (relative paths): the parents of the experts."""
    mixtures: list[tuple[str, str]] = []  # (the mixture block, its experts module), relative paths
    for rel, module in members_by_rel.items():
        if not rel or any(_ATTN.search(p) for p in rel.lower().split(".")):
            continue  # (experts inside attention, JetMoE's mixture of attention heads, are no feed-forward)
        fused = [
            (n, p)
            for n, p in module._parameters.items()
            if p is not None and p.dim() == 3 and (p.shape[0] in experts or "expert" in rel.rpartition(".")[2].lower())
        ]
        if not fused:
            continue
        transposed = _transposed(module, fused, width)
        for name, p in fused:
            d_in, d_out = (p.shape[-2], p.shape[-1]) if transposed else (p.shape[-1], p.shape[-2])
            named = _ffn_name(name.lower())
            if named is not None and (d_in if named == "ffn.in" else d_out) != width:
                named = None  # the name says one side, the shape the other: shapes decide
            if named is None:
                named = "ffn.in" if d_in == width else "ffn.out" if d_out == width else None
            if named is not None:
                out[named].append(f"{block}.{rel}.{name}")
        parent = rel.rpartition(".")[0]
        if all(parent != m for m, _ in mixtures):  # (one mixture block, however many experts modules)
            mixtures.append((parent, rel))
    for mixture, experts_rel in mixtures:
        inside = [
            (rel, m)
            for rel, m in members_by_rel.items()
            if (rel.startswith(mixture + ".") or not mixture) and not rel.startswith(experts_rel)
        ]
        for rel, module in inside:
            w = module._parameters.get("weight")
            if (
                w is not None
                and w.dim() == 2
                and not is_linear_like(module)
                and not is_norm(rel, module)
                and w.shape[0] in experts
                and w.shape[1] == width
            ):
                out["moe.router"].append(f"{block}.{rel}.weight")
    return list(dict.fromkeys(m for m, _ in mixtures))


def experts_transposed(model: nn.Module, key: str) -> bool:
    """Whether the fused experts tensor at `key` is stored [experts, in, out] (see `_transposed`;
    the width is the config's hidden size)."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    width = next((v for c in _configs(model) for v in [_field(c, "hidden_size")] if isinstance(v, int)), 0)
    fused = module._parameters[name]
    return fused is not None and _transposed(module, [(name, fused)], width)


def _transposed(module: nn.Module, fused: Sequence[tuple[str, torch.Tensor]], width: int) -> bool:
    """Whether fused experts store [experts, in, out]: as the module says (transformers'
    `is_transposed`), else as their names read against the width (Llama 4's gate_up_proj
    [experts, width, 2·inner] reads the width on its middle dim)."""
    said = getattr(module, "is_transposed", None)
    if isinstance(said, bool):
        return said
    votes: Counter[bool] = Counter()
    for name, p in fused:
        named = _ffn_name(name.lower())
        if named is not None and p.shape[-1] != p.shape[-2]:
            plain = (p.shape[-1] if named == "ffn.in" else p.shape[-2]) == width
            flipped = (p.shape[-2] if named == "ffn.in" else p.shape[-1]) == width
            if plain != flipped:
                votes[flipped] += 1
    return bool(votes) and votes.most_common(1)[0][0]  # (ties: the first vote cast)


def _by_shape(
    block: str, paths: list[str], dims: dict[str, tuple[int, int]], width: int, out: dict[str, list[str]]
) -> None:
    """An attention module whose layers no name placed: q, k, v are the first three that read
    the block's width (creation order), o the last other one that writes it."""
    reads = [p for p in paths if dims[p[len(block) + 1 :]][0] == width]
    writes = [p for p in paths if dims[p[len(block) + 1 :]][1] == width and p not in reads[:3]]
    for role, path in zip(("attn.q", "attn.k", "attn.v"), reads[:3], strict=False):
        out[role].append(path)
    if writes:
        out["attn.o"].append(writes[-1])


def _ffn_module(ffn_side: dict[str, list[str]], members_by_rel: dict[str, nn.Module]) -> str:
    """The feed-forward module (relative path): the deepest common owner of its in and out
    layers that is not a container; "" where there is none."""
    if not (ffn_side.get("ffn.in") and ffn_side.get("ffn.out")):
        return ""
    both = [r.split(".")[:-1] for r in ffn_side["ffn.in"] + ffn_side["ffn.out"]]
    common = []
    for parts in zip(*both, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    while common and isinstance(members_by_rel.get(".".join(common)), (nn.ModuleList, nn.ModuleDict)):
        common.pop()  # a container is never called: its parent is the feed-forward module
    return ".".join(common)


def discover(model: nn.Module) -> dict[str, list[str]]:
    """role -> module paths, in model order (see the module docstring). `norm` included."""
    paths = named_modules(model)
    found = blocks(model, paths)
    experts = _counts(model, _EXPERT_COUNTS)
    roles: dict[str, list[str]] = {r: [] for r in ROLES}
    members: dict[str, list[tuple[str, nn.Module]]] = {b: [] for b in found}
    ordered = sorted(found, key=len, reverse=True)
    for path, module in paths:
        if is_linear_like(module):
            owner = next((b for b in ordered if path.startswith(b + ".")), None)
            if owner is not None:
                members[owner].append((path[len(owner) + 1 :], module))
    fixes = CORRECTIONS.get(getattr(getattr(model, "config", None), "model_type", None) or "", {})
    for block in found:
        inside = dict(model.get_submodule(block).named_modules())
        for role, hits in _classify_block(block, members[block], experts, inside).items():
            if role in fixes:
                hits = [f"{block}.{rel}" for rel in fixes[role] if exists(model, f"{block}.{rel}")]
            roles[role] += hits
    roles["norm"] = [p for p, m in paths if is_norm(p, m)]
    order = {p: i for i, (p, _) in enumerate(paths)}
    return {r: sorted(dict.fromkeys(v), key=lambda p: order.get(p, -1)) for r, v in roles.items() if v}


def check_tp_plan(model: nn.Module, roles: dict[str, list[str]]) -> list[str]:
    """Where the config's tensor-parallel plan disagrees with the roles (q/k/v colwise, o
    rowwise); empty when it agrees or there is no plan."""
    plan = next(
        (getattr(c, "base_model_tp_plan", None) for c in _configs(model) if getattr(c, "base_model_tp_plan", None)),
        None,
    )
    if not plan:
        return []
    want = {
        "attn.q": "colwise",
        "attn.k": "colwise",
        "attn.v": "colwise",
        "attn.o": "rowwise",
        "ffn.in": "colwise",
        "ffn.out": "rowwise",
    }
    wrong = []
    for role, style in want.items():
        for path in roles.get(role, []):
            for pattern, kind in plan.items():
                regex = re.escape(pattern).replace(r"\*", r"\d+")
                if re.search(rf"(^|\.){regex}$", path) and isinstance(kind, str) and style not in kind:
                    wrong.append(f"{path}: {role} but the plan says {kind}")
    return wrong


def roles(model: nn.Module) -> dict[str, list[str]]:
    """The discovered semantic roles of `model`: role -> module paths (see the module docstring)."""
    return discover(host(model))


def is_semantic(selector: Any) -> bool:
    return isinstance(selector, str) and selector in SEMANTIC


def expand(model: nn.Module, name: str) -> list[Any]:
    """The module paths a semantic name stands for on this model, or a SelectorError that says
    what discovery found and what is missing."""
    if name == "norm":
        return [is_norm]
    found = discover(model)
    if found.get(name):
        return found[name]
    have = sorted(r for r in found if r != "norm")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not have:
        counted = len(blocks(model, named_modules(model)))
        raise SelectorError(
            f"hookdelta found no attention or feed-forward layers in {type(model).__name__} (model_type "
            f"{model_type!r}; {counted} repeated blocks found), so {name!r} and the methods' default positions are "
            "unknown there; pass explicit targets, e.g. targets=['q_proj', 'v_proj'] (hd.match(model, ...) tries "
            "selectors without attaching, hd.roles(model) shows what was found)"
        )
    raise SelectorError(
        f"{type(model).__name__} has no single module for {name!r} (it has {', '.join(have)}); pass explicit targets "
        "(hd.roles(model) shows what was found)"
    )


def is_norm(name: str, module: nn.Module) -> bool:
    """Normalization layers with a weight: LayerNorm, RMSNorm, GroupNorm, BatchNorm (affine),
    InstanceNorm (affine) and look-alikes (T5LayerNorm, ...)."""
    kinds = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    if isinstance(module, kinds) or type(module).__name__.endswith(("Norm", "LayerNorm")):
        return isinstance(getattr(module, "weight", None), nn.Parameter)
    return False


# -- the q / k / v rows of fused projections -------------------------------------------------------

# how fused q/k/v projections order their output features, by model_type: "contiguous" is
# [q | k | v] (with grouped-query sizes), "per_head" is [h0: q k v | h1: q k v | ...], "per_group"
# is, per kv head, its query heads then its k and its v (Falcon's new decoder architecture)
FUSED_LAYOUTS = {
    "gpt2": "contiguous",
    "gpt_bigcode": "contiguous",
    "phi3": "contiguous",
    "mpt": "contiguous",
    "gpt_neox": "per_head",
    "bloom": "per_head",
    "persimmon": "per_head",
    "deberta": "per_head",
    "falcon": "falcon",
}


def fused_rows(model: nn.Module, path: str, out_features: int) -> dict[str, Any]:
    """{"q": rows, "k": rows, "v": rows} (LongTensors of output features) of the fused q/k/v
    projection at `path`, from the model's layout and head counts; a SelectorError where the
    layout is unknown or the sizes do not add up (a guess would be silently wrong)."""
    config: Any = getattr(model, "config", None)
    kind = FUSED_LAYOUTS.get(getattr(config, "model_type", None) or "")
    heads = next(
        (
            getattr(config, n)
            for n in ("num_attention_heads", "n_head", "n_heads")
            if isinstance(getattr(config, n, None), int)
        ),
        None,
    )
    if kind is None or heads is None:
        raise SelectorError(
            f"{path!r} is a fused q/k/v projection whose layout hookdelta does not know for {type(model).__name__} "
            f"(model_type {getattr(config, 'model_type', None)!r}); known: {sorted(FUSED_LAYOUTS)}. Adapt the whole "
            "projection (drop fused_slices)"
        )
    if kind == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kind, kv = "per_group", config.num_kv_heads
        elif getattr(config, "multi_query", False):
            kind, kv = "contiguous", 1
        else:
            kind, kv = "per_head", heads
    else:
        kv = next(
            (
                getattr(config, n)
                for n in ("num_key_value_heads", "kv_n_heads")
                if isinstance(getattr(config, n, None), int)
            ),
            heads,
        )
        if getattr(config, "multi_query", False):
            kv = 1
    head_dim = out_features // (heads + 2 * kv) if out_features % (heads + 2 * kv) == 0 else None
    if head_dim is None:
        raise SelectorError(
            f"{path!r} has {out_features} outputs, which is not (heads + 2 kv heads) x head_dim for "
            f"{heads} heads and {kv} kv heads; adapt the whole projection (drop fused_slices)"
        )
    index = torch.arange(out_features)
    if kind == "contiguous":
        q, k = heads * head_dim, kv * head_dim
        return {"q": index[:q], "k": index[q : q + k], "v": index[q + k :]}
    if kind == "per_head":
        grid = index.view(heads, 3, head_dim)
        return {"q": grid[:, 0].reshape(-1), "k": grid[:, 1].reshape(-1), "v": grid[:, 2].reshape(-1)}
    grid = index.view(kv, heads // kv + 2, head_dim)
    return {"q": grid[:, :-2].reshape(-1), "k": grid[:, -2].reshape(-1), "v": grid[:, -1].reshape(-1)}
