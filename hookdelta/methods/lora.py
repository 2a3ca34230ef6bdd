"""LoRA (Hu et al. 2021): a low-rank update W + s·B·A, added on the output side.

For a layer y = W x the delta adds s·B(A(dropout(x))) to y in a forward hook, so the
cost is the rank-r work only and W + BA is never built. Any other `nn.Parameter`
(e.g. fused 3-D MoE expert weights) is reparametrized for the call: W -> W + s·B·A,
one rank-r update per leading index (per expert).

Layouts follow PEFT's so adapter files map one-to-one:
  Linear / Conv1D   lora_A [r, in]            lora_B [out, r]
  Embedding         lora_A [r, num]           lora_B [dim, r]      ΔW = (B·A)ᵀ
  ConvNd (groups g) lora_A [g·r, in/g, *k]    lora_B [out, r, 1..] ΔW per group B_j·A_j
  parameter [..., m, n]  lora_A [..., r, n]   lora_B [..., m, r]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import (
    MAX_ALPHA,
    DeltaConfig,
    PeftCodec,
    Selector,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_patterns,
    exact,
    file_rank,
    has_callable,
    normalize_selector,
    pattern_value,
)
from ..engine import Piece
from ..errors import ConfigError, DeltaFileError, HookdeltaError, SelectorError, UnsupportedModuleError
from ..modules import Layer, is_linear_like, layer_dims, named_modules, parameter_holders, resolve_site
from ..placement import layer_like, like_tensor, real_weight
from ..roles import experts_transposed, fused_rows, roles
from ..selection import match_parameters
from ..sharding import tensor_parallel_sites
from ..shared_input import SharedInput
from .alora import Activation, InvocationScanner
from .dora import DoRAConv, DoRAEmbedding, DoRALinear
from .lora_layers import (
    LINEAR_VARIANTS,
    ActivatedLoRALinear,
    DoRAParameter,
    LoRAConv,
    LoRAEmbedding,
    LoRALinear,
    LoRAParameter,
    LoRASlices,
    TensorParallelLoRALinear,
    TiedLoRA,
    TiedParameter,
)

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d"
INITS = ("default", "gaussian", "orthogonal", "pissa", "olora", "lora_ga", "corda", "loftq", "eva")
# inits that take a part out of the base weight (as a frozen delta here)
RESIDUAL = ("pissa", "olora", "lora_ga", "corda")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(DeltaConfig):
    """Low-rank adaptation.

    r: rank; alpha: scale numerator (scale = alpha/r, or alpha/sqrt(r) with use_rslora);
    dropout: on the delta's input, active only while the host module is training;
    target_parameters: selectors over parameter paths, for weights used outside a layer
    (e.g. "mlp.experts.gate_up_proj"); init: "default" (A kaiming-uniform, B zero), "gaussian",
    "orthogonal" (even r; A and B from one random orthogonal matrix, PEFT's), or, on linear layers,
    "pissa" / "pissa_niter_K" (the weight's top-r singular triplets, exact or K-iteration
    randomized SVD) and "olora" (the weight's QR): these take the principal part out of the base,
    which hookdelta never writes, so the delta adds s·(B·A − B₀·A₀) with the initial factors A₀, B₀
    kept frozen (a fresh delta changes nothing; in PEFT's files it becomes a plain LoRA of rank 2r
    on the original base, as PEFT's path_initial_model_for_weight_conversion writes it);
    bias: "none" or "lora_only" (a trainable bias b on B, so the layer gains s·(B·A·x + b): PEFT's
    lora_bias, for LoRAs extracted from full fine-tunes; not with DoRA);
    tie_weights: a weight shared by several modules (tied embedding and output head) is
    adapted in all of them (True) or refused (False), never in one only.
    use_dora: DoRA (Liu et al. 2024), W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ per output row, with
    a trained magnitude m; linear layers only.
    rank_pattern / alpha_pattern: {regex: value} overriding r / alpha for the sites whose
    path ends with a match (PEFT's semantics), e.g. {"layers.0.self_attn.q_proj": 16}.
    fused_slices: on fused q/k/v projections (GPT-2 c_attn, Phi-3 qkv_proj, GPT-NeoX / Bloom
    query_key_value, Falcon), adapt only these slices, e.g. ("q", "v"), each with its own
    rank-r A and B, as loralib's MergedLinear; other sites get plain LoRA.
    activate_after_tokens: aLoRA (PEFT's alora_invocation_tokens): the adapter acts only from the
    last occurrence of this token sequence on (linear layers; not mergeable; see methods/alora.py).
    Default targets: the attention query and value projections of the model's family.
    """

    # a hot-swap zero-pads the rank and holds the scale as a tensor (hotswap.py); the init only
    # made the first values, and a residual (PiSSA, OLoRA) is a tensor the files must share
    hot_swappable: ClassVar[frozenset[str]] = frozenset(
        {"r", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init"}
    )
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_parameters: Selector | None = None
    use_rslora: bool = False
    init: str = "default"
    bias: str = "none"
    tie_weights: bool = True
    use_dora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    fused_slices: Sequence[str] | None = None
    activate_after_tokens: Sequence[int] | None = None

    method = "lora"
    expert_sites = "parameter"
    default_targets = ("attn.q", "attn.v")

    def target_selectors(self, model: nn.Module | None = None) -> Any:
        if self.targets is None and model is not None and type(model).__module__.startswith("diffusers"):
            return ("attn.q", "attn.k", "attn.v", "attn.o")  # what diffusers' LoRA training scripts adapt
        return super().target_selectors(model)

    def validate(self) -> None:
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True, high=MAX_ALPHA, high_open=False)
        check_float(self, "dropout", low=0.0, high=1.0)
        if not (self.init in INITS or isinstance(self.init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", self.init)):
            raise ConfigError(
                f"LoRAConfig.init must be one of {list(INITS)} or 'pissa_niter_K' (K >= 1 iterations), "
                f"got {self.init!r}"
            )
        if self.use_dora and self.bias != "none":
            raise ConfigError(
                "LoRAConfig.bias='lora_only' does not go with use_dora=True (DoRA rescales each row, the bias with it)"
            )
        if self.use_dora and self.init not in ("default", "gaussian"):
            raise ConfigError(f"LoRAConfig.init={self.init!r} does not go with use_dora=True")
        check_choice(self, "bias", ["none", "lora_only"])
        for name in ("use_rslora", "tie_weights", "use_dora"):
            check_bool(self, name)
        check_patterns(self)
        if self.fused_slices is not None:
            slices = self.fused_slices
            if (
                isinstance(slices, str)
                or not isinstance(slices, (list, tuple))
                or not slices
                or any(s not in ("q", "k", "v") for s in slices)
                or len(set(slices)) != len(slices)
            ):
                raise ConfigError(
                    f"LoRAConfig.fused_slices must be a non-empty list of distinct 'q', 'k', 'v', got {slices!r}"
                )
            if self.use_dora:
                raise ConfigError("LoRAConfig.fused_slices does not go with use_dora=True (DoRA normalizes whole rows)")
            object.__setattr__(self, "fused_slices", tuple(s for s in ("q", "k", "v") if s in slices))
        if self.activate_after_tokens is not None:
            toks = self.activate_after_tokens
            if (
                isinstance(toks, (str, bytes))
                or not isinstance(toks, (list, tuple))
                or not toks
                or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in toks)
            ):
                raise ConfigError(
                    f"LoRAConfig.activate_after_tokens must be a non-empty list of token ids, got {toks!r}"
                )
            if self.use_dora:
                raise ConfigError("LoRAConfig.activate_after_tokens (aLoRA) does not go with use_dora=True")
            object.__setattr__(self, "activate_after_tokens", tuple(toks))
        if self.target_parameters is not None:
            object.__setattr__(
                self, "target_parameters", normalize_selector("target_parameters", self.target_parameters)
            )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, key: str) -> int:
        return pattern_value(self.rank_pattern, key, self.r)

    def scale_for(self, key: str) -> float:
        r, alpha = self.rank_for(key), pattern_value(self.alpha_pattern, key, self.alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def fitted(self, ranks: dict[str, int], scales: dict[str, float]) -> LoRAConfig:
        """This config with exactly these per-site ranks and scales (exact-path patterns where a
        site differs from the most common), e.g. after zero-padding or a combination."""
        r = max(ranks.values())
        values = list(scales.values())
        common = max(values, key=values.count)
        rank_pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
        alpha_pattern = {re.escape(k): scales[k] * ranks[k] for k in ranks if ranks[k] != r or scales[k] != common}
        return dataclasses.replace(
            self,
            r=r,
            alpha=common * r,
            use_rslora=False,
            rank_pattern=rank_pattern or None,
            alpha_pattern=alpha_pattern or None,
        )

    def select(self, model: nn.Module) -> list[str]:
        keys: list[str] = []
        if self.targets is None and self.target_parameters is None:  # no targets at all: the defaults
            # nn.MultiheadAttention keeps q/k/v in one parameter, in_proj_weight: adapt it directly
            fused = [
                f"{n}.in_proj_weight"
                for n, m in named_modules(model)
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None
            ]
            try:
                keys += super().select(model)
            except SelectorError:
                if not fused:
                    raise
            return keys + [k for k in fused if k not in keys]
        if self.targets is not None:
            keys += super().select(model)
        if self.target_parameters is not None:
            keys += match_parameters(model, self.target_parameters, self.exclude, self.layers)
        return keys

    def portable(self, delta: Any) -> dict[str, Any]:
        data = super().portable(delta)
        if has_callable(self.to_dict()) and self.target_parameters is not None:
            params = [k for k in delta.sites if resolve_site(delta.model, k)[1] is not None]
            data["target_parameters"] = [exact(k) for k in params] or None
        return data

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces: list[Piece] = []
        done: dict[int, Piece] = {}  # id(shared weight) -> its primary piece
        sharers = parameter_holders(model)
        fused: set[str] = set()
        activation = Activation(self.activate_after_tokens) if self.activate_after_tokens is not None else None
        if self.fused_slices is not None:
            found = roles(model)
            fused = set(found.get("attn.q", [])) & set(found.get("attn.k", [])) & set(found.get("attn.v", []))
        for key in sites:
            module, param_name = resolve_site(model, key)
            weight = module._parameters.get(param_name or "weight")
            if weight is not None and id(weight) in done:
                continue  # the other end of a tie that was already covered
            if key in fused:
                like = layer_like(model, key, module)
                rows = fused_rows(model, key, layer_dims(module, module, key)[1])
                pieces.append(LoRASlices(self, key, module, like, rows))
                continue
            primary = _make_piece(self, key, module, param_name, model, activation)
            pieces.append(primary)
            if weight is not None:
                done[id(weight)] = primary
                pieces += _tie_partners(self, sharers.get(id(weight), []), key, module, param_name or "weight", primary)
        if activation is not None:
            return _activate(self, pieces, activation)
        _group_siblings(model, pieces)
        return pieces


def _group_siblings(model: nn.Module, pieces: list[Piece]) -> None:
    """Plain LoRA pieces on layers that read the same input by design (attn.q/k/v of one
    attention module, the ffn.in layers of one feed-forward module, same input width, dtype and
    device) share one A GEMM (shared_input.py). Only an optimisation: where the roles cannot be
    found, every piece computes alone."""
    if sum(type(p) is LoRALinear for p in pieces) < 2:
        return  # (no roles discovery for a single layer)
    try:
        found = roles(model)
    except HookdeltaError:
        return
    family = {
        p: fam
        for fam, names in (("attn", ("attn.q", "attn.k", "attn.v")), ("ffn", ("ffn.in",)))
        for name in names
        for p in found.get(name, ())
    }
    groups: dict[tuple, list[LoRALinear]] = {}
    for piece in pieces:
        if type(piece) is LoRALinear and piece.key in family:  # (the plain class: no variant groups)
            a = piece.lora_A
            groups.setdefault(
                (piece.key.rpartition(".")[0], family[piece.key], a.shape[1], a.dtype, a.device), []
            ).append(piece)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedInput(members)
            for piece in members:
                piece.siblings = shared


def _activate(cfg: LoRAConfig, pieces: list[Piece], activation: Activation) -> list[Piece]:
    """aLoRA: the pieces act only where a scanner on the model finds the invocation."""
    odd = [p.key for p in pieces if not isinstance(p, ActivatedLoRALinear)]
    if odd:
        raise UnsupportedModuleError(
            f"aLoRA (activate_after_tokens) adapts linear layers only; {odd[0]!r} is not one. Narrow the targets."
        )
    return pieces + [InvocationScanner(activation, ":alora_invocation")]


def _make_piece(
    cfg: LoRAConfig,
    key: str,
    module: Layer,
    param_name: str | None,
    model: nn.Module,
    activation: Activation | None = None,
) -> Piece:
    path = key.rpartition(".")[0] if param_name else key
    if param_name:
        like = like_tensor(model, path, module._parameters[param_name])
    elif is_linear_like(module) or isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)):
        like = layer_like(model, path, module)  # where and in what dtype it computes (quantized too)
    else:
        raise _unsupported(cfg, key, module, param_name)
    if cfg.use_dora:
        if param_name is not None and module._parameters[param_name].dim() == 3:  # fused experts
            return DoRAParameter(
                cfg, key, module, param_name, like, real_weight(model, path, param_name), experts_transposed(model, key)
            )
        if param_name is None and is_linear_like(module):
            return DoRALinear(cfg, key, module, like, real_weight(model, path))
        if param_name is None and type(module) is nn.Embedding:
            return DoRAEmbedding(cfg, key, module, like, real_weight(model, path))
        if param_name is None and type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.groups == 1:
            return DoRAConv(cfg, key, module, like, real_weight(model, path))
        raise _unsupported(cfg, key, module, param_name)
    if param_name is not None:
        return LoRAParameter(cfg, key, module, param_name, like)
    if is_linear_like(module):
        residual = cfg.init in RESIDUAL or cfg.init.startswith("pissa_niter_")
        cls = LINEAR_VARIANTS[(activation is not None, residual, cfg.bias == "lora_only")]
        if tensor_parallel_sites(model, [(key, module)]):
            if cls is not LoRALinear:
                raise UnsupportedModuleError(
                    f"{key!r} is tensor-parallel; hookdelta's LoRA there is the plain one (no PiSSA/OLoRA init, "
                    "lora_only bias or aLoRA yet): attach those before parallelizing is not possible either"
                )
            return TensorParallelLoRALinear(cfg, key, module, like)
        weight = real_weight(model, path) if residual or cfg.init == "loftq" else None
        return (
            cls(cfg, key, module, like, weight, activation=activation)
            if activation
            else cls(cfg, key, module, like, weight)
        )
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(cfg, key, module, like)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(
        module, nn.modules.conv._ConvTransposeNd
    ):
        return LoRAConv(cfg, key, module, like)
    raise _unsupported(cfg, key, module, param_name)


def _unsupported(cfg: LoRAConfig, key: str, module: nn.Module, param_name: str | None) -> UnsupportedModuleError:
    if cfg.use_dora:
        return UnsupportedModuleError(
            f"DoRA (use_dora=True) adapts linear layers, nn.Embedding, ungrouped nn.Conv1d/2d/3d and fused experts "
            f"tensors; {key!r} is "
            f"{'a parameter target' if param_name else type(module).__name__}. Narrow the targets or use plain LoRA."
        )
    return UnsupportedModuleError(
        f"LoRA cannot adapt {key!r} of type {type(module).__name__}; it supports {SUPPORTED}. "
        "Narrow the selector (e.g. to the projection layers inside it), or use "
        "target_parameters=[...] to adapt one of its weights directly."
    )


def _tie_partners(
    cfg: LoRAConfig, holders: list[tuple[str, nn.Module, str]], key: str, module: nn.Module, name: str, primary: Piece
) -> list[Piece]:
    """Pieces for the other modules that share `weight` (tied embeddings), or an error."""
    partners: list[Piece] = []
    for path, other, other_name in holders:
        if other is module or other_name != name:
            continue
        if not cfg.tie_weights or cfg.use_dora:
            raise UnsupportedModuleError(
                f"{key!r} shares its {name} with {path!r} (tied weights); adapting one would untie them. "
                "Set tie_weights=True to adapt both, or exclude both."
            )
        partners.append(
            TiedParameter(primary, path) if isinstance(primary, LoRAParameter) else TiedLoRA(primary, path, other)
        )
    return partners


class LoRACodec(PeftCodec):
    """PEFT's LORA files (LoRA, rsLoRA, DoRA): lora_A / lora_B (lora_embedding_A / _B on
    embeddings) and lora_magnitude_vector, in the same layouts as hookdelta's."""

    peft_type = "LORA"
    understood = frozenset(
        {
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
            "fan_in_fan_out",
            "layers_to_transform",
            "modules_to_save",
            "bias",
            "lora_bias",
            "alora_invocation_tokens",
            "target_parameters",
        }
    )
    suffixes = {
        ".lora_A.weight": "lora_A",
        ".lora_B.weight": "lora_B",
        ".lora_embedding_A": "lora_A",
        ".lora_embedding_B": "lora_B",
        ".lora_magnitude_vector": "magnitude",
        ".lora_B.bias": "lora_bias",
    }

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        out = self.refuse_bias(peft_config)
        init = peft_config.get("init_lora_weights")
        if isinstance(init, str) and (init.startswith(RESIDUAL) or init == "loftq"):
            # trained against PEFT's *changed* base (W minus its principal part): on the original
            # base it would give other outputs, silently
            out.append(
                f"init_lora_weights={init!r} (an adapter for PEFT's modified base weights: save it with "
                "save_pretrained(path_initial_model_for_weight_conversion=...) to get one for the original base)"
            )
        return out

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        alpha = float(peft_config.get("lora_alpha", 8))
        alphas = {
            re.escape(s): float(v)
            for s in named
            if (v := pattern_value(peft_config.get("alpha_pattern"), s, None)) is not None
        }
        params = [s for s in named if resolve_site(model, s)[1] is not None]
        for site in params:  # PEFT's target_parameters: its factor layout, ours (see peft_parameter_factors)
            a, b = named[site]["lora_A"], named[site]["lora_B"]
            named[site] = {
                **named[site],
                **dict(
                    zip(
                        ("lora_A", "lora_B"),
                        peft_parameter_factors(model, site, a, b, version=peft_config.get("peft_version")),
                        strict=True,
                    )
                ),
            }
        ranks = {s: int(t["lora_A"].shape[-2 if s in params else 0]) for s, t in named.items() if "lora_A" in t}
        r = file_rank(peft_config, ranks, 8)
        cfg = LoRAConfig(
            r=r,
            alpha=alpha,
            use_rslora=bool(peft_config.get("use_rslora")),
            bias="lora_only" if peft_config.get("lora_bias") else "none",
            activate_after_tokens=peft_config.get("alora_invocation_tokens") or None,
            use_dora=bool(peft_config.get("use_dora")),
            dropout=float(peft_config.get("lora_dropout") or 0.0),
            tie_weights=True,
            targets=[exact(s) for s in named if s not in params] or None,
            target_parameters=[exact(s) for s in params] or None,
            rank_pattern={re.escape(s): k for s, k in ranks.items() if k != r} or None,
            alpha_pattern=alphas or None,
            **common,
        )
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: LoRAConfig = delta.config
        pieces = [p for p in pieces if not isinstance(p, InvocationScanner)]  # aLoRA's: no tensors
        odd = [p.key for p in pieces if isinstance(p, (TiedLoRA, TiedParameter, DoRAParameter, LoRASlices))]
        if odd:
            raise UnsupportedModuleError(
                f"delta {delta.name!r} uses LoRA features PEFT's files cannot express here (tied weights, parameter "
                f"targets or fused_slices) at {odd[:3]}; save it with delta.save() instead"
            )
        residual = any(getattr(p, "residual", False) for p in pieces)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        factor = (2**0.5 if cfg.use_rslora else 2) if residual else 1  # alpha for the doubled rank
        params = [p for p in pieces if isinstance(p, LoRAParameter)]
        for piece in pieces:
            if isinstance(piece, LoRAParameter):  # PEFT's ParamWrapper: its layout and nesting
                nested = peft_parameter_key(delta.model, piece.key, [p.key for p in params])
                fa, fb = peft_parameter_factors(delta.model, piece.key, piece.lora_A, piece.lora_B, to_peft=True)
                tensors[nested + ".lora_A.weight"], tensors[nested + ".lora_B.weight"] = (
                    fa.contiguous(),
                    fb.contiguous(),
                )
                if piece.r != cfg.r:
                    ranks[re.escape(piece.key)] = piece.r
                alpha = cfg.scale_for(piece.key) * (piece.r**0.5 if cfg.use_rslora else piece.r)
                if abs(alpha - cfg.alpha) > 1e-12 * max(1.0, abs(cfg.alpha)):
                    alphas[re.escape(piece.key)] = alpha
                continue
            embedding = isinstance(delta.model.get_submodule(piece.key), nn.Embedding)
            a, b = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
            # PiSSA / OLoRA: the rank-2r plain LoRA of the same update on the original base (PEFT's
            # path_initial_model_for_weight_conversion), so the config's r and alpha double too
            fa, fb = piece.plain_factors() if isinstance(piece, LoRALinear) else (piece.lora_A, piece.lora_B)
            tensors[piece.key + a] = fa.detach().contiguous()
            tensors[piece.key + b] = fb.detach().contiguous()
            if hasattr(piece, "magnitude"):
                tensors[piece.key + ".lora_magnitude_vector"] = piece.magnitude.detach().contiguous()
            if getattr(piece, "lora_bias", None) is not None:
                tensors[piece.key + ".lora_B.bias"] = piece.lora_bias.detach().contiguous()
            r = fa.shape[0]
            if r != cfg.r * (2 if residual else 1):
                ranks[re.escape(piece.key)] = r
            alpha = cfg.scale_for(piece.key) * (r**0.5 if cfg.use_rslora else r)
            if abs(alpha - cfg.alpha * factor) > 1e-12 * max(1.0, abs(cfg.alpha)):
                alphas[re.escape(piece.key)] = alpha
        fields = {
            "peft_type": "LORA",
            "r": cfg.r * (2 if residual else 1),
            "lora_alpha": cfg.alpha * factor,
            "lora_dropout": cfg.dropout,
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "use_rslora": cfg.use_rslora,
            "use_dora": cfg.use_dora,
            "bias": "none",
            "lora_bias": cfg.bias == "lora_only",
            "init_lora_weights": True,
            "layers_to_transform": None,
            **(
                {"alora_invocation_tokens": list(cfg.activate_after_tokens), "task_type": "CAUSAL_LM"}
                if cfg.activate_after_tokens
                else {}
            ),
            **self.tuner_fields(delta, [p for p in pieces if p not in params]),
            # the layout of 3-D parameter targets that PEFT 0.20 and later read (see peft_parameter_factors)
            **({"target_parameters": [p.key for p in params], "peft_version": "0.20.0"} if params else {}),
        }
        return fields, tensors


def peft_parameter_key(model: nn.Module, key: str, targets: list[str]) -> str:
    """Where PEFT keeps the factors of a parameter target: it wraps the module once per targeted
    parameter, in the module's parameter order, each wrapper around the last, so the first one
    sits deepest: `<module>` + `.base_layer` × (number of targets on it after this one)."""
    owner, _, name = key.rpartition(".")
    on_module = [n for n in model.get_submodule(owner)._parameters if f"{owner}.{n}" in targets]
    return owner + ".base_layer" * (len(on_module) - 1 - on_module.index(name))


def peft_parameter_factors(
    model: nn.Module, key: str, a: torch.Tensor, b: torch.Tensor, to_peft: bool = False, version: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_A [r·E, k] / lora_B [j, r·E] of a parameter target <-> ours, A [E, r, n] and
    B [E, m, r] with ΔW = B·A over a tensor stored [E, m, n]. Expert e has A_e = lora_A[e·r:(e+1)·r]
    and B_e = lora_B[:, e::E] (B is reshaped [j, r, E]); PEFT's update in the stored layout is
    either B_e·A_e ("e o i": k = n) or its transpose ("e i o": k = m). Which one PEFT takes has
    changed: 0.18 always "e i o", 0.19 "e o i" where the module says `is_transposed`, 0.20 and later
    "e o i" where it does not. A file's shapes say which when m ≠ n; for square expert matrices
    only the writer's version does, and a file from before 0.20 (or without a version) is refused.
    hookdelta writes the 0.20 layout. A 2-D tensor is a plain [out, in] weight in every version."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    weight = module._parameters.get(name)
    if weight is None:
        raise DeltaFileError(f"the delta's {key!r} names no parameter of the model")
    if weight.dim() == 2:
        return a, b
    experts, m, n = weight.shape[0], weight.shape[-2], weight.shape[-1]
    current = not getattr(module, "is_transposed", False)  # "e o i" in PEFT 0.20 and later
    if to_peft:
        r = a.shape[-2]
        if not current:  # "e i o": ΔW_e = A_eᵀ·B_eᵀ in the stored layout: our B is PEFT's Aᵀ, our A its Bᵀ
            return b.transpose(1, 2).reshape(experts * r, -1), a.permute(2, 1, 0).reshape(-1, r * experts)
        return a.reshape(experts * r, -1), b.permute(1, 2, 0).reshape(b.shape[1], r * experts)
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[0] % experts
        or b.shape[1] != a.shape[0]
        or {a.shape[1], b.shape[0]} != {m, n}
    ):
        raise DeltaFileError(
            f"PEFT's factors for the parameter target {key!r} ({experts} experts of [{m}, {n}]) "
            f"have shapes {tuple(a.shape)} and {tuple(b.shape)}; expected [r·{experts}, in] and "
            f"[out, r·{experts}]"
        )
    if m != n:
        eoi = a.shape[1] == n
    else:
        release = tuple(int(p) for p in re.findall(r"\d+", str(version or "").partition("@")[0])[:2])
        if len(release) < 2 or release < (0, 20):
            raise DeltaFileError(
                f"{key!r} holds square expert matrices [{m}, {n}], and PEFT has read such a tensor's factors in "
                f"different layouts over its releases; this file says peft_version={version!r}, so its layout is "
                "unknown. Re-save it with PEFT 0.20 or later"
            )
        eoi = current
    r = a.shape[0] // experts
    pa, pb = a.reshape(experts, r, -1), b.reshape(b.shape[0], r, experts)
    if eoi:
        return pa, pb.permute(2, 0, 1)
    return pb.permute(2, 1, 0), pa.transpose(1, 2)


LoRAConfig.peft_codec = LoRACodec()
