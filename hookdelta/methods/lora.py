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
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import (DeltaConfig, PeftCodec, Selector, check_bool, check_choice, check_float, check_int,
                      check_patterns, exact, has_callable, normalize_selector, pattern_value)
from ..engine import Piece, TiedSwap, current, first_hook_is_ours, first_input
from ..placement import layer_like, like_tensor, live_weight, real_weight
from ..roles import fused_rows, roles
from ..errors import ConfigError, HookdeltaError, MergeError, SelectorError, UnsupportedModuleError
from ..modules import (is_conv1d, is_linear_like, layer_dims, named_modules, parameter_holders,
                       resolve_site)
from ..selection import match_parameters
from ..shared_input import SharedInput
from .alora import Activation, InvocationScanner, activated

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d"
INITS = ("default", "gaussian", "orthogonal", "pissa", "olora")
RESIDUAL = ("pissa", "olora")  # inits that take a part out of the base weight (as a frozen delta here)


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
    hot_swappable: ClassVar[frozenset[str]] = frozenset({"r", "alpha", "rank_pattern", "alpha_pattern",
                                                        "use_rslora", "init"})
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
    default_targets = ("attn.q", "attn.v")

    def target_selectors(self, model: nn.Module | None = None) -> Any:
        if self.targets is None and model is not None and type(model).__module__.startswith("diffusers"):
            return ("attn.q", "attn.k", "attn.v", "attn.o")  # what diffusers' LoRA training scripts adapt
        return super().target_selectors(model)

    def validate(self) -> None:
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0)
        if not (self.init in INITS or isinstance(self.init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", self.init)):
            raise ConfigError(f"LoRAConfig.init must be one of {list(INITS)} or 'pissa_niter_K' (K >= 1 iterations), "
                              f"got {self.init!r}")
        if self.use_dora and self.bias != "none":
            raise ConfigError("LoRAConfig.bias='lora_only' does not go with use_dora=True (DoRA rescales each row, "
                              "the bias with it)")
        if self.use_dora and self.init not in ("default", "gaussian"):
            raise ConfigError(f"LoRAConfig.init={self.init!r} does not go with use_dora=True")
        check_choice(self, "bias", ["none", "lora_only"])
        for name in ("use_rslora", "tie_weights", "use_dora"):
            check_bool(self, name)
        check_patterns(self)
        if self.fused_slices is not None:
            slices = self.fused_slices
            if isinstance(slices, str) or not isinstance(slices, (list, tuple)) or not slices or any(
                    s not in ("q", "k", "v") for s in slices) or len(set(slices)) != len(slices):
                raise ConfigError(f"LoRAConfig.fused_slices must be a non-empty list of distinct 'q', 'k', 'v', "
                                  f"got {slices!r}")
            if self.use_dora:
                raise ConfigError("LoRAConfig.fused_slices does not go with use_dora=True (DoRA normalizes whole rows)")
            object.__setattr__(self, "fused_slices", tuple(s for s in ("q", "k", "v") if s in slices))
        if self.activate_after_tokens is not None:
            toks = self.activate_after_tokens
            if isinstance(toks, (str, bytes)) or not isinstance(toks, (list, tuple)) or not toks or any(
                    isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in toks):
                raise ConfigError(f"LoRAConfig.activate_after_tokens must be a non-empty list of token ids, got {toks!r}")
            if self.use_dora:
                raise ConfigError("LoRAConfig.activate_after_tokens (aLoRA) does not go with use_dora=True")
            object.__setattr__(self, "activate_after_tokens", tuple(toks))
        if self.target_parameters is not None:
            object.__setattr__(self, "target_parameters",
                               normalize_selector("target_parameters", self.target_parameters))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, key: str) -> int:
        return pattern_value(self.rank_pattern, key, self.r)

    def scale_for(self, key: str) -> float:
        r, alpha = self.rank_for(key), pattern_value(self.alpha_pattern, key, self.alpha)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def fitted(self, ranks: dict[str, int], scales: dict[str, float]) -> "LoRAConfig":
        """This config with exactly these per-site ranks and scales (exact-path patterns where a
        site differs from the most common), e.g. after zero-padding or a combination."""
        r = max(ranks.values())
        values = list(scales.values())
        common = max(values, key=values.count)
        rank_pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
        alpha_pattern = {re.escape(k): scales[k] * ranks[k] for k in ranks if ranks[k] != r or scales[k] != common}
        return dataclasses.replace(self, r=r, alpha=common * r, use_rslora=False, rank_pattern=rank_pattern or None,
                                   alpha_pattern=alpha_pattern or None)

    def select(self, model: nn.Module) -> list[str]:
        keys: list[str] = []
        if self.targets is None and self.target_parameters is None:  # no targets at all: the defaults
            # nn.MultiheadAttention keeps q/k/v in one parameter, in_proj_weight: adapt it directly
            fused = [f"{n}.in_proj_weight" for n, m in named_modules(model)
                     if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None]
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
            primary = _make_piece(self, key, module, param_name, model)
            pieces.append(primary)
            if weight is not None:
                done[id(weight)] = primary
                pieces += _tie_partners(self, sharers.get(id(weight), []), key, module, param_name or "weight", primary)
        if self.activate_after_tokens is not None:
            return _activate(self, pieces)
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
    family = {p: fam for fam, names in (("attn", ("attn.q", "attn.k", "attn.v")), ("ffn", ("ffn.in",)))
              for name in names for p in found.get(name, ())}
    groups: dict[tuple, list[LoRALinear]] = {}
    for piece in pieces:
        if type(piece) is LoRALinear and not piece.residual and piece.lora_bias is None and piece.key in family:
            a = piece.lora_A
            groups.setdefault((piece.key.rpartition(".")[0], family[piece.key], a.shape[1], a.dtype, a.device),
                              []).append(piece)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedInput(members)
            for piece in members:
                piece.siblings = shared


def _activate(cfg: LoRAConfig, pieces: list[Piece]) -> list[Piece]:
    """aLoRA: the pieces act only where a scanner on the model finds the invocation."""
    odd = [p.key for p in pieces if type(p) is not LoRALinear]
    if odd:
        raise UnsupportedModuleError(f"aLoRA (activate_after_tokens) adapts linear layers only; {odd[0]!r} is not "
                                     "one. Narrow the targets.")
    activation = Activation(cfg.activate_after_tokens)
    for p in pieces:
        p.activation = activation
        p.mergeable = False  # the update holds only from the invocation on: no weight can hold it
    return pieces + [InvocationScanner(activation, ":alora_invocation")]


def _make_piece(cfg: LoRAConfig, key: str, module: nn.Module, param_name: str | None, model: nn.Module) -> Piece:
    path = key.rpartition(".")[0] if param_name else key
    if param_name:
        like = like_tensor(model, path, module._parameters[param_name])
    elif is_linear_like(module) or isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)):
        like = layer_like(model, path, module)  # where and in what dtype it computes (quantized too)
    else:
        like = None
    if cfg.use_dora:
        if param_name is None and is_linear_like(module):
            return DoRALinear(cfg, key, module, like, real_weight(model, path))
        if param_name is None and type(module) is nn.Embedding:
            return DoRAEmbedding(cfg, key, module, like, real_weight(model, path))
        if param_name is None and type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.groups == 1:
            return DoRAConv(cfg, key, module, like, real_weight(model, path))
        raise UnsupportedModuleError(
            f"DoRA (use_dora=True) adapts linear layers, nn.Embedding and ungrouped nn.Conv1d/2d/3d; {key!r} is "
            f"{'a parameter target' if param_name else type(module).__name__}. Narrow the targets or use plain LoRA."
        )
    if param_name is not None:
        return LoRAParameter(cfg, key, module, param_name, like)
    if is_linear_like(module):
        return LoRALinear(cfg, key, module, like, real_weight(model, path) if cfg.init in RESIDUAL
                          or cfg.init.startswith("pissa_niter_") else None)
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(cfg, key, module, like)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return LoRAConv(cfg, key, module, like)
    raise UnsupportedModuleError(
        f"LoRA cannot adapt {key!r} of type {type(module).__name__}; it supports {SUPPORTED}. "
        "Narrow the selector (e.g. to the projection layers inside it), or use "
        "target_parameters=[...] to adapt one of its weights directly."
    )


def _tie_partners(cfg: LoRAConfig, holders: list[tuple[str, nn.Module, str]], key: str, module: nn.Module,
                  name: str, primary: Piece) -> list[Piece]:
    """Pieces for the other modules that share `weight` (tied embeddings), or an error."""
    partners: list[Piece] = []
    param_is_target = isinstance(primary, LoRAParameter)
    for path, other, other_name in holders:
        if other is module or other_name != name:
            continue
        if not cfg.tie_weights or cfg.use_dora:
            raise UnsupportedModuleError(
                f"{key!r} shares its {name} with {path!r} (tied weights); adapting one would untie them. "
                "Set tie_weights=True to adapt both, or exclude both."
            )
        partners.append(TiedParameter(primary, path) if param_is_target else TiedLoRA(primary, path, other))
    return partners


class _LoRABase(Piece):
    """Shared state: the two factors, the scale, the dropout rate."""

    hooks = frozenset({"post"})
    additive = True
    siblings: SharedInput | None = None  # layers reading the same input: one A GEMM (shared_input.py)

    def __init__(self, cfg: LoRAConfig, key: str, site_path: str, a_shape: Sequence[int],
                 b_shape: Sequence[int], like: torch.Tensor, fan_in: int) -> None:
        super().__init__(site_path, key)
        self.r, self.scale, self.p = cfg.rank_for(key), cfg.scale_for(key), cfg.dropout
        self.weight_path_exact = not self.p  # dropout acts on the input: no weight can express it
        if not like.is_floating_point():
            raise UnsupportedModuleError(f"LoRA needs a floating-point weight at {key!r}, found {like.dtype}")
        kw = {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter(torch.empty(*a_shape, **kw))
        self.lora_B = nn.Parameter(torch.zeros(*b_shape, **kw))
        if cfg.init != "default" and cfg.init != "gaussian" and type(self) is not LoRALinear:
            raise UnsupportedModuleError(f"LoRA init={cfg.init!r} is for linear layers; {key!r} is not one. "
                                         "Narrow the targets or use init='default'.")
        with torch.no_grad():
            if cfg.init == "gaussian":
                self.lora_A.normal_(0.0, 1.0 / self.r)
            else:  # kaiming-uniform with a=sqrt(5), as nn.Linear and PEFT do
                bound = 1.0 / math.sqrt(fan_in)
                self.lora_A.uniform_(-bound, bound)

    rank_dims = {"lora_A": 0, "lora_B": 1}  # where the rank is, for zero-padding (hot-swap)

    def pad_rank(self, r: int) -> None:
        """Zero-pad A and B to rank r: the product B·A, and so the output, stays the same."""
        for name, dim in self.rank_dims.items():
            p = getattr(self, name)
            dim = dim % p.dim()
            pad = [0, 0] * (p.dim() - 1 - dim) + [0, r - p.shape[dim]]
            setattr(self, name, nn.Parameter(F.pad(p.detach(), pad), requires_grad=p.requires_grad))
        self.r = r

    def hold_scale(self) -> torch.Tensor:
        """The scale as a (non-persistent) buffer: a new value is then data for torch.compile'd
        code, not a constant it was specialized on, so setting it does not recompile."""
        if not isinstance(self.scale, torch.Tensor):
            value = self.scale
            del self.scale
            self.register_buffer("scale", torch.tensor(value, dtype=torch.float32, device=self.lora_A.device),
                                 persistent=False)
        return self.scale

    def drop(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # dropout follows the host module's mode, so model.eval() turns it off
        return F.dropout(x, self.p, training=True) if self.p and module.training else x

    def describe(self) -> str:
        return f"r={self.r} scale={float(self.scale):g}"


class LoRALinear(_LoRABase):
    """LoRA on nn.Linear and transformers Conv1D (whose weight is stored [in, out])."""

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Module, like: torch.Tensor,
                 weight: torch.Tensor | None = None) -> None:
        self.conv1d = is_conv1d(module)
        in_f, out_f = layer_dims(module, module, key)  # the logical shape (a quantized weight is packed)
        r = cfg.rank_for(key)
        super().__init__(cfg, key, key, (r, in_f), (out_f, r), like, in_f)
        self.lora_bias = (nn.Parameter(torch.zeros(out_f, dtype=like.dtype, device=like.device))
                          if cfg.bias == "lora_only" else None)
        self.activation = None  # aLoRA: where the adapter acts (methods/alora.py)
        self.residual = False  # PiSSA / OLoRA: s·(B·A − B₀·A₀), the initial factors frozen
        if cfg.init in ("orthogonal",) or cfg.init.startswith("pissa_niter_"):
            # these draw from the global RNG: draw first what PEFT's nn.Linear(r, out) draws when it
            # makes lora_B (A's draw was made above), so a seed gives PEFT's factors exactly
            torch.empty(out_f, r).uniform_()
        if cfg.init == "orthogonal":
            self._orthogonal(in_f, out_f)
        elif cfg.init.startswith(RESIDUAL):
            self._principal(cfg.init, weight)

    def _orthogonal(self, in_f: int, out_f: int) -> None:
        """PEFT's orthogonal init, draw for draw (global RNG): A and B from one orthogonal Q."""
        r = self.r
        if r % 2:
            raise ConfigError(f"LoRA init='orthogonal' needs an even rank; {self.key!r} has r={r}")
        q, _ = torch.linalg.qr(torch.randn(r, r))
        a = torch.randn(in_f, r // 2).mm(q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, out_f).T.mm(q[1::2, :]) / 10.0
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)

    def _principal(self, init: str, weight: torch.Tensor) -> None:
        """PiSSA (the weight's top-r SVD, split as √S) or OLoRA (its QR), as PEFT computes them;
        the same factors are kept frozen as A₀, B₀ so the fresh delta adds exactly nothing."""
        w = weight.detach().float()
        w = w.T if self.conv1d else w  # [out, in]
        r, s = self.r, float(self.scale)
        if init == "olora":
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r], q[:, :r]
        else:
            if init == "pissa":
                v, sv, uh = torch.linalg.svd(w, full_matrices=False)
                v, sv, uh = v[:, :r], sv[:r], uh[:r]
            else:  # pissa_niter_K: randomized SVD with K subspace iterations
                v, sv, u = torch.svd_lowrank(w, r, niter=int(init.rpartition("_")[2]))
                uh = u.t()
            sv = sv / s
            a, b = torch.diag(sv.sqrt()) @ uh, v @ torch.diag(sv.sqrt())
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        self.register_buffer("base_A", self.lora_A.detach().clone())
        self.register_buffer("base_B", self.lora_B.detach().clone())
        self.residual = True

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        params = self._parameters  # (hot path: a dict lookup, not nn.Module.__getattr__)
        a, b = params["lora_A"], params["lora_B"]
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        if self.activation is not None:
            delta = F.linear(F.linear(x, a) * self.scale, b)
            return activated(self, output, delta if self.lora_bias is None else delta + self.lora_bias * self.scale)
        if self.residual:  # two terms that cancel bit for bit while A, B are still A₀, B₀
            delta = F.linear(F.linear(x, a) * self.scale, b) - F.linear(F.linear(x, self.base_A) * self.scale, self.base_B)
            if self.lora_bias is not None:
                delta = delta + self.lora_bias * self.scale
            return output + delta.to(output.dtype)
        compiling = torch.compiler.is_compiling()
        group = self.siblings
        # q/k/v (gate/up) share one GEMM over their A's; not in compiled code, not on inference
        # tensors (no version counter to check the input by), not with dropout (a mask per layer)
        if group is not None and not compiling and not x.is_inference() and not (self.p and module.training):
            t = group.product(self, x)
        else:
            t = F.linear(x, a)
        s = self.scale
        if self.lora_bias is None and isinstance(output, torch.Tensor) and output.dtype == b.dtype \
                and output.is_contiguous():
            # the add inside the B GEMM: one kernel, and no output-wide temporary. The scale rides
            # along as the GEMM's alpha (no kernel of its own: decoding is launch-bound) except in
            # compiled code, where inductor has dropped alpha= before (torch.add in 2.13), and for
            # a scale held as a tensor (hot-swap).
            if type(s) is float and not compiling:
                alpha = s
            else:  # the scale on the r-wide product: a pass over [.., r], not [.., out]
                t, alpha = t * s, 1.0
            if compiling:  # flat and out of place: inductor fuses it, and never tests the hook dict
                return torch.addmm(output.view(-1, output.shape[-1]), t.reshape(-1, t.shape[-1]), b.t(),
                                   alpha=alpha).view(output.shape)
            # The kernel is chosen by the call's shape alone (rank, view), never by grad mode or by
            # who holds the output: the same input gives the same bits with and without autograd,
            # and a recomputed checkpoint saves the same tensors as its forward (2-D and 3-D
            # outputs directly, for 3-D with B broadcast over the batch; addmm and addmm_ round
            # alike). In place only without autograd and when nothing else can hold the output yet:
            # under autograd, selective checkpointing may have cached the layer's output as the
            # `mm` it saved, and an in-place add would go into that cache (the recompute would add
            # the LoRA twice), so the add is out of place there.
            owned = not torch.is_grad_enabled() and first_hook_is_ours(module)
            if not output._is_view() and output.dim() == 2:
                return output.addmm_(t, b.t(), alpha=alpha) if owned else torch.addmm(output, t, b.t(), alpha=alpha)
            if not output._is_view() and output.dim() == 3:
                bt = b.t().expand(output.shape[0], -1, -1)
                return output.baddbmm_(t, bt, alpha=alpha) if owned else torch.baddbmm(output, t, bt, alpha=alpha)
            flat, t = output.view(-1, output.shape[-1]), t.reshape(-1, t.shape[-1])
            if owned:  # (without autograd the view costs nothing)
                flat.addmm_(t, b.t(), alpha=alpha)
                return output
            return torch.addmm(flat, t, b.t(), alpha=alpha).view(output.shape)
        delta = F.linear(t * s, b)
        if self.lora_bias is not None:  # B's bias, scaled with B as in PEFT: s·(B·A·x + b)
            delta = delta + self.lora_bias * s
        return output + delta.to(output.dtype)

    def lowrank(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.lora_bias is not None or (self.p and module.training) or self.activation is not None:
            return None
        return self.plain_factors() + (self.scale,)

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the same update as one plain LoRA: a residual one becomes rank 2r,
        [A; A₀] and [B, −B₀] (what PEFT's weight conversion writes)."""
        if not self.residual:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.base_A]), torch.cat([self.lora_B, -self.base_B], dim=1)

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        a, b = self.plain_factors()
        dw = (b.float() * self.scale) @ a.float()  # scale the small factor
        out = {"weight": dw.T if self.conv1d else dw}
        if self.lora_bias is not None:
            if module._parameters.get("bias") is None:
                raise MergeError(
                    f"{self.key!r} has no bias of its own, so its LoRA bias delta (bias='lora_only') "
                    "cannot be merged without adding a parameter; keep this delta unmerged"
                )
            out["bias"] = self.lora_bias.float() * self.scale
        return out

    def describe(self) -> str:
        return super().describe() + (" +bias" if self.lora_bias is not None else "")


class LoRASlices(_LoRABase):
    """LoRA on chosen slices of a fused q/k/v projection (loralib's MergedLinear): each slice its
    own rank-r A and B, written into that slice's output features only. lora_A is the slices'
    A's stacked [k·r, in], lora_B their B's stacked [rows, r]; `rows` are the output features."""

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Module, like: torch.Tensor,
                 slices: dict[str, torch.Tensor]) -> None:
        self.conv1d = is_conv1d(module)
        in_f, out_f = layer_dims(module, module, key)
        r = cfg.rank_for(key)
        names = list(cfg.fused_slices or ())
        rows = torch.cat([slices[n] for n in names])
        super().__init__(cfg, key, key, (len(names) * r, in_f), (len(rows), r), like, in_f)
        self.register_buffer("rows", rows.to(like.device), persistent=False)  # rebuilt from the layout
        self.rank_dims = {}  # A and B hold one block per slice: not padded at the end
        self.sizes, self.slices, self.out_features = [len(slices[n]) for n in names], tuple(names), out_f

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scale  # [.., k·r]
        parts = [F.linear(a, b) for a, b in zip(h.split(self.r, -1), self.lora_B.split(self.sizes))]
        return output.index_add(-1, self.rows, torch.cat(parts, -1).to(output.dtype))

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        dw = torch.zeros(self.out_features, self.lora_A.shape[1], device=self.lora_A.device)
        for a, b, rows in zip(self.lora_A.float().split(self.r), self.lora_B.float().split(self.sizes),
                              self.rows.split(self.sizes)):
            dw[rows] = (b * self.scale) @ a
        return {"weight": dw.T if self.conv1d else dw}

    def describe(self) -> str:
        return super().describe() + " slices " + "".join(self.slices)


class DoRALinear(LoRALinear):
    """DoRA: the LoRA-updated weight, renormalized per output row and scaled by a trained
    magnitude. Computed on the output side as PEFT does: with c = m / ‖W + ΔW‖ (the norm
    detached from the graph, as the DoRA paper recommends),
    y = base(x) + (c − 1)·(W·x) + c·s·B·A·x, so W + ΔW is never applied to the input."""

    merges_by = "value"  # merging rescales the weight; only the kept original undoes it
    additive = False
    reads_weight = True  # the norm of W + ΔW

    def lowrank(self, module: nn.Module) -> None:
        return None  # the magnitude rescales the base term too

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Module, like: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__(cfg, key, module, like)
        with torch.no_grad():
            self.magnitude = nn.Parameter(self._rows(weight.detach()).norm(dim=1).to(like.device, like.dtype))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.conv1d else weight  # [out, in]

    def _scale(self, module: nn.Module) -> torch.Tensor:
        with torch.no_grad():  # the norm is a constant for autograd (as the paper and PEFT do): no graph, no
            w = self._rows(live_weight(module)).to(self.lora_A.dtype)  # saved copy of the weight
            norm = (w + (self.lora_B @ self.lora_A) * self.scale).norm(dim=1)
        return self.magnitude / norm

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_input(args, kwargs).to(self.lora_A.dtype)
        c = self._scale(module)
        dropped = self.drop(module, x)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scale
        if dropped is x:  # the host output already holds W·x (+ bias)
            bias = module._parameters.get("bias")
            base = output.to(c.dtype) - (bias.to(c.dtype) if bias is not None else 0)
        else:  # PEFT computes the base term on the dropped-out input
            base = F.linear(dropped, self._rows(live_weight(module)).to(c.dtype))
        delta = (c - 1) * base + c * lora
        return output + delta.to(output.dtype)

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = self._rows(current(module, "weight")).float()  # differentiable: also the weight path (see Piece)
        updated = w + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        merged = updated * (self.magnitude.float() / updated.norm(dim=1).detach()).unsqueeze(1)
        out = {"weight": merged.T if self.conv1d else merged}
        return out

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()


class LoRAEmbedding(_LoRABase):
    """LoRA on nn.Embedding: looks up rows of Aᵀ, then projects with Bᵀ."""

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Embedding, like: torch.Tensor) -> None:
        num, dim = module.weight.shape
        r = cfg.rank_for(key)
        super().__init__(cfg, key, key, (r, num), (dim, r), like, num)
        if cfg.bias != "none":
            raise UnsupportedModuleError(f"bias='lora_only' is not available for the embedding {key!r}")

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = first_input(args, kwargs)
        after_a = F.embedding(ids, self.lora_A.T, module.padding_idx)
        return output + ((after_a * self.scale) @ self.lora_B.T).to(output.dtype)

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": ((self.lora_B.float() * self.scale) @ self.lora_A.float()).T}


class LoRAConv(_LoRABase):
    """LoRA on Conv1d/2d/3d (grouped and 1×1 included): A is a grouped conv with the host's
    kernel, stride, padding and dilation; B a grouped 1×1 conv. Exact for any groups."""

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Module, like: torch.Tensor) -> None:
        w = module.weight  # [out, in/g, *k]
        g = module.groups
        kernel = tuple(w.shape[2:])
        fan_in = w.shape[1] * math.prod(kernel)
        r = cfg.rank_for(key)
        a_shape, b_shape = (g * r, w.shape[1], *kernel), (w.shape[0], r, *([1] * len(kernel)))
        super().__init__(cfg, key, key, a_shape, b_shape, like, fan_in)
        self.groups = g
        if g > 1:
            self.rank_dims = {}  # A holds g blocks of r rows: not padded at the end
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
        if cfg.bias != "none":
            raise UnsupportedModuleError(f"bias='lora_only' is not available for the conv layer {key!r}")

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs)).to(self.lora_A.dtype)
        h = module._conv_forward(x, self.lora_A, None)  # host's padding mode, stride, ... and groups
        return output + (self.conv(h, self.lora_B, groups=self.groups) * self.scale).to(output.dtype)

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w = module.weight
        g, r = self.groups, self.r
        a = self.lora_A.float().reshape(g, r, -1)
        b = self.lora_B.float().reshape(g, w.shape[0] // g, r)
        return {"weight": torch.bmm(b, a).reshape(w.shape) * self.scale}


class DoRAEmbedding(LoRAEmbedding):
    """DoRA on nn.Embedding, as PEFT computes it: the magnitude m and the norm are per embedding
    dimension (a column of the [num, dim] table), c = m / ‖W + ΔW‖ (the norm detached), and the
    lookup becomes c ⊙ (W[ids] + s·(Aᵀ[ids])·Bᵀ)."""

    merges_by, additive, reads_weight = "value", False, True

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Embedding, like: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__(cfg, key, module, like)
        with torch.no_grad():
            self.magnitude = nn.Parameter(weight.detach().float().norm(dim=0).to(like.device, like.dtype))

    def lowrank(self, module: nn.Module) -> None:
        return None  # the magnitude rescales the looked-up rows too

    def _updated(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + ((self.lora_B @ self.lora_A) * self.scale).T.to(weight.dtype)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        with torch.no_grad():  # the norm is a constant for autograd, as in DoRA and PEFT
            norm = self._updated(live_weight(module).to(self.lora_A.dtype)).norm(dim=0)
        c = self.magnitude / norm
        lora = F.embedding(first_input(args, kwargs), self.lora_A.T, module.padding_idx) @ self.lora_B.T * self.scale
        return (c * output.to(c.dtype) + c * lora).to(output.dtype)

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        updated = self._updated(current(module, "weight").float())
        return {"weight": updated * (self.magnitude.float() / updated.norm(dim=0).detach())[None, :]}

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()


class DoRAConv(LoRAConv):
    """DoRA on an ungrouped Conv1d/2d/3d, as PEFT computes it: c = m / ‖W + ΔW‖ per output
    channel (the norm detached), y = base(x) + (c − 1)·(W ⊛ x) + c·s·B ⊛ A ⊛ x."""

    merges_by, additive, reads_weight = "value", False, True

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Module, like: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__(cfg, key, module, like)
        shape = (1, -1) + (1,) * (weight.dim() - 2)  # PEFT's layout: [1, out, 1, ...]
        with torch.no_grad():
            self.magnitude = nn.Parameter(weight.detach().float().flatten(1).norm(dim=1).reshape(shape)
                                          .to(like.device, like.dtype))

    def lowrank(self, module: nn.Module) -> None:
        return None

    def _updated(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.r
        dw = (self.lora_B.reshape(-1, r) @ self.lora_A.reshape(r, -1)).reshape(weight.shape) * self.scale
        return weight + dw.to(weight.dtype)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        with torch.no_grad():
            norm = self._updated(live_weight(module).to(self.lora_A.dtype)).flatten(1).norm(dim=1)
        c = self.magnitude / norm.reshape(self.magnitude.shape)
        x = self.drop(module, first_input(args, kwargs)).to(self.lora_A.dtype)
        lora = self.conv(module._conv_forward(x, self.lora_A, None), self.lora_B) * self.scale
        if self.p and module.training:  # PEFT computes the base term on the dropped-out input
            base = module._conv_forward(x, live_weight(module).to(c.dtype), None)
        else:  # the host output already holds W ⊛ x (+ bias)
            bias = module._parameters.get("bias")
            base = output.to(c.dtype) - (bias.to(c.dtype).reshape(self.magnitude.shape) if bias is not None else 0)
        return output + ((c - 1) * base + c * lora).to(output.dtype)

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        updated = self._updated(current(module, "weight").float())
        norm = updated.flatten(1).norm(dim=1).detach()
        out = self.magnitude.float().reshape(-1) / norm
        return {"weight": updated * out.reshape((-1,) + (1,) * (updated.dim() - 1))}

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()


class LoRAParameter(_LoRABase):
    """LoRA on any parameter of 2 or more dims, swapped in for the call: W + s·B·A over the
    last two dims, one update per leading index (per expert of a fused MoE weight)."""

    hooks = frozenset()  # it only swaps
    rank_dims = {"lora_A": -2, "lora_B": -1}

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Module, name: str, like: torch.Tensor) -> None:
        w = module._parameters[name]
        if w.dim() < 2:
            raise UnsupportedModuleError(
                f"LoRA needs a parameter with at least 2 dims; {key!r} has shape {tuple(w.shape)}"
            )
        if cfg.bias != "none":
            raise UnsupportedModuleError(f"bias='lora_only' is not available for the parameter target {key!r}")
        *lead, m, n = w.shape
        r = cfg.rank_for(key)
        super().__init__(cfg, key, key.rpartition(".")[0], (*lead, r, n), (*lead, m, r), like, n)
        self.swaps = (name,)
        self.param_name = name
        if cfg.dropout:
            raise ConfigError("LoRA dropout acts on layer inputs; it is not available with target_parameters (set dropout=0)")

    def update(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.update().to(weight.dtype)

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {self.param_name: (self.lora_B.float() * self.scale) @ self.lora_A.float()}

    def describe(self) -> str:
        return f"{self.param_name}: " + super().describe()


class TiedLoRA(Piece):
    """The other end of a tied weight: applies the primary piece's update in this module too.

    Holds no tensors of its own (the primary owns them, and writes the shared weight once
    on merge), so the two modules stay tied."""

    hooks = frozenset({"post"})
    additive = True

    def __init__(self, primary: Piece, site_path: str, module: nn.Module) -> None:
        super().__init__(site_path, key=site_path)
        object.__setattr__(self, "primary", primary)  # not a submodule: its tensors are saved once
        plain = isinstance(primary, LoRAEmbedding) or (isinstance(primary, LoRALinear) and not primary.conv1d)
        if not plain or not isinstance(module, (nn.Linear, nn.Embedding)):
            raise UnsupportedModuleError(
                f"{site_path!r} ({type(module).__name__}) shares its weight with {primary.key!r}; hookdelta "
                "ties LoRA only between nn.Linear and nn.Embedding layers. Exclude both or set tie_weights=False."
            )

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        p = self.primary
        x = first_input(args, kwargs)
        if isinstance(p, LoRAEmbedding) and isinstance(module, nn.Linear):  # ΔW=(B·A)ᵀ as a linear: x·B·A
            delta = F.linear(F.linear(p.drop(module, x).to(p.lora_A.dtype), p.lora_B.T), p.lora_A.T)
        elif isinstance(p, LoRALinear) and isinstance(module, nn.Embedding):  # ΔW=B·A looked up: B[ids]·A
            delta = F.embedding(x, p.lora_B, module.padding_idx) @ p.lora_A
        elif isinstance(p, LoRAEmbedding):  # embedding tied to embedding
            delta = F.embedding(x, p.lora_A.T, module.padding_idx) @ p.lora_B.T
        else:  # linear tied to linear
            delta = F.linear(F.linear(p.drop(module, x).to(p.lora_A.dtype), p.lora_A), p.lora_B)
        return output + (delta * p.scale).to(output.dtype)

    def describe(self) -> str:
        return f"tied to {self.primary.key}"


class TiedParameter(TiedSwap):
    """The other holder of a tied weight targeted as a parameter: the primary's swap there too."""

    additive = True

    def __init__(self, primary: "LoRAParameter", site_path: str) -> None:
        super().__init__(primary, site_path, key=site_path + "." + primary.param_name)


class LoRACodec(PeftCodec):
    """PEFT's LORA files (LoRA, rsLoRA, DoRA): lora_A / lora_B (lora_embedding_A / _B on
    embeddings) and lora_magnitude_vector, in the same layouts as hookdelta's."""

    peft_type = "LORA"
    understood = frozenset({"r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                            "fan_in_fan_out", "layers_to_transform", "modules_to_save", "bias", "lora_bias",
                            "alora_invocation_tokens"})
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_embedding_A": "lora_A",
                ".lora_embedding_B": "lora_B", ".lora_magnitude_vector": "magnitude", ".lora_B.bias": "lora_bias"}

    def refuse(self, peft_config: dict[str, Any]) -> list[str]:
        out = self.refuse_bias(peft_config)
        init = peft_config.get("init_lora_weights")
        if isinstance(init, str) and (init.startswith(RESIDUAL) or init in ("corda", "loftq")):
            # trained against PEFT's *changed* base (W minus its principal part): on the original
            # base it would give other outputs, silently
            out.append(f"init_lora_weights={init!r} (an adapter for PEFT's modified base weights: save it with "
                       "save_pretrained(path_initial_model_for_weight_conversion=...) to get one for the original base)")
        return out

    def to_config(self, model: nn.Module, peft_config: dict[str, Any], named: dict[str, dict[str, torch.Tensor]],
                  common: dict[str, Any]) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        r, alpha = int(peft_config.get("r", 8)), float(peft_config.get("lora_alpha", 8))
        ranks = {s: int(t["lora_A"].shape[0]) for s, t in named.items() if "lora_A" in t}
        alphas = {re.escape(s): float(v) for s in named
                  if (v := pattern_value(peft_config.get("alpha_pattern"), s, None)) is not None}
        cfg = LoRAConfig(
            r=r, alpha=alpha, use_rslora=bool(peft_config.get("use_rslora")),
            bias="lora_only" if peft_config.get("lora_bias") else "none",
            activate_after_tokens=peft_config.get("alora_invocation_tokens") or None,
            use_dora=bool(peft_config.get("use_dora")), dropout=float(peft_config.get("lora_dropout") or 0.0),
            tie_weights=True, targets=[exact(s) for s in named],
            rank_pattern={re.escape(s): k for s, k in ranks.items() if k != r} or None,
            alpha_pattern=alphas or None, **common)
        return cfg, self.flat(named)

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: LoRAConfig = delta.config
        pieces = [p for p in pieces if not isinstance(p, InvocationScanner)]  # aLoRA's: no tensors
        odd = [p.key for p in pieces if isinstance(p, (TiedLoRA, TiedParameter, LoRAParameter, LoRASlices))]
        if odd:
            raise UnsupportedModuleError(
                f"delta {delta.name!r} uses LoRA features PEFT's files cannot express here (tied weights, parameter "
                f"targets or fused_slices) at {odd[:3]}; save it with delta.save() instead"
            )
        residual = any(getattr(p, "residual", False) for p in pieces)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        factor = (2 ** 0.5 if cfg.use_rslora else 2) if residual else 1  # alpha for the doubled rank
        for piece in pieces:
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
            alpha = cfg.scale_for(piece.key) * (r ** 0.5 if cfg.use_rslora else r)
            if abs(alpha - cfg.alpha * factor) > 1e-12 * max(1.0, abs(cfg.alpha)):
                alphas[re.escape(piece.key)] = alpha
        fields = {"peft_type": "LORA", "r": cfg.r * (2 if residual else 1), "lora_alpha": cfg.alpha * factor,
                  "lora_dropout": cfg.dropout, "rank_pattern": ranks, "alpha_pattern": alphas,
                  "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora, "bias": "none",
                  "lora_bias": cfg.bias == "lora_only", "init_lora_weights": True, "layers_to_transform": None,
                  **({"alora_invocation_tokens": list(cfg.activate_after_tokens), "task_type": "CAUSAL_LM"}
                     if cfg.activate_after_tokens else {}),
                  **self.tuner_fields(delta, pieces)}
        return fields, tensors


LoRAConfig.peft_codec = LoRACodec()
