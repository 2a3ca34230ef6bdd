"""LoRA's pieces: the layer kinds (linear, its variants, fused slices, embedding, conv, any
parameter, the other end of a tied weight). Formulas only; the fused computations are in ops.py.
DoRA's pieces are in dora.py, the config, the building and PEFT's files in lora.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import inits, ops
from ..engine import Piece, TiedSwap, current, first_hook_is_ours, first_input
from ..errors import ConfigError, MergeError, UnsupportedModuleError
from ..modules import Layer, is_conv1d, layer_dims
from ..shared_input import SharedInput
from .alora import activated

if TYPE_CHECKING:
    from .lora import LoRAConfig


def _weight_for(cfg: LoRAConfig, key: str, weight: torch.Tensor | None) -> torch.Tensor:
    """The layer's weight, which an init that starts from it needs (the build passes it for those)."""
    if weight is None:
        raise UnsupportedModuleError(f"init={cfg.init!r} starts from the layer's weight, which {key!r} does not have")
    return weight


class _LoRABase(Piece):
    """Shared state: the two factors, the scale, the dropout rate."""

    hooks = frozenset({"post"})
    additive = True
    siblings: SharedInput | None = None  # layers reading the same input: one A GEMM (shared_input.py)
    scale: float | torch.Tensor  # a tensor once hot-swap holds it (hold_scale)

    def __init__(
        self,
        cfg: LoRAConfig,
        key: str,
        site_path: str,
        a_shape: Sequence[int],
        b_shape: Sequence[int],
        like: torch.Tensor,
        fan_in: int,
    ) -> None:
        super().__init__(site_path, key)
        self.r, self.scale, self.p = cfg.rank_for(key), cfg.scale_for(key), cfg.dropout
        self.weight_path_exact = not self.p  # dropout acts on the input: no weight can express it
        if not like.is_floating_point():
            raise UnsupportedModuleError(f"LoRA needs a floating-point weight at {key!r}, found {like.dtype}")
        kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter(torch.empty(*a_shape, **kw))
        self.lora_B = nn.Parameter(torch.zeros(*b_shape, **kw))
        if cfg.init != "default" and cfg.init != "gaussian" and not isinstance(self, LoRALinear):
            raise UnsupportedModuleError(
                f"LoRA init={cfg.init!r} is for linear layers; {key!r} is not one. "
                "Narrow the targets or use init='default'."
            )
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
        if isinstance(self.scale, torch.Tensor):
            return self.scale
        held = torch.tensor(self.scale, dtype=torch.float32, device=self.lora_A.device)
        del self.scale
        self.register_buffer("scale", held, persistent=False)
        return held

    def drop(self, module: Layer, x: torch.Tensor) -> torch.Tensor:
        # dropout follows the host module's mode, so model.eval() turns it off
        return F.dropout(x, self.p, training=True) if self.p and module.training else x

    def describe(self) -> str:
        return f"r={self.r} scale={float(self.scale):g}"


class LoRALinear(_LoRABase):
    """LoRA on nn.Linear and transformers Conv1D (whose weight is stored [in, out]): the plain
    update s·B·A·x, added inside the B GEMM (ops.lowrank_add); siblings reading the same input
    share one A GEMM (shared_input.py). The variants below change the term or where it acts."""

    residual = False  # PiSSA / OLoRA (ResidualLoRALinear)
    lora_bias: nn.Parameter | None  # bias="lora_only" (BiasedLoRALinear); None here
    activation = None  # aLoRA (ActivatedLoRALinear)

    def __init__(
        self,
        cfg: LoRAConfig,
        key: str,
        module: Layer,
        like: torch.Tensor,
        weight: torch.Tensor | None = None,
        activation: Any = None,
    ) -> None:
        self.conv1d = is_conv1d(module)
        in_f, out_f = layer_dims(module, module, key)  # the logical shape (a quantized weight is packed)
        r = cfg.rank_for(key)
        super().__init__(cfg, key, key, (r, in_f), (out_f, r), like, in_f)
        self.out_features = out_f
        self.lora_bias = None
        if cfg.init in ("orthogonal", "lora_ga") or cfg.init.startswith("pissa_niter_"):
            # these draw from the global RNG: draw first what PEFT's nn.Linear(r, out) draws when it
            # makes lora_B (A's draw was made above), so a seed gives PEFT's factors exactly
            torch.empty(out_f, r).uniform_()
        if cfg.init == "orthogonal":
            self._orthogonal(in_f, out_f)
        if cfg.init == "loftq" and (data := inits.supplied("loftq", key)) is not None:
            a, b = inits.loftq_factors(
                data, _weight_for(cfg, key, weight), r, float(self.scale), self.conv1d, self.lora_A.dtype
            )
            with torch.no_grad():
                self.lora_A.copy_(a)
                self.lora_B.copy_(b)
        if cfg.init == "eva" and (data := inits.supplied("eva", key)) is not None:
            with torch.no_grad():  # (B stays zero: a fresh EVA delta changes nothing)
                self.lora_A.copy_(data)

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

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """The update for input x (in the factors' dtype), by the formula; variants extend it."""
        return F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        params = self._parameters  # (hot path: a dict lookup, not nn.Module.__getattr__)
        a, b = params["lora_A"], params["lora_B"]
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        group = self.siblings
        # q/k/v (gate/up) share one GEMM over their A's where it pays (ops.stack_pays); not in
        # compiled code, not on inference tensors (no version counter to check the input by), not
        # with dropout (a mask per layer)
        if (
            group is not None
            and ops.fast()
            and not torch.compiler.is_compiling()
            and not x.is_inference()
            and not (self.p and module.training)
            and ops.stack_pays(x)
        ):
            t = group.product(self, x)
        else:
            t = F.linear(x, a)
        # in place only where nothing but this hook can hold the output: no autograd (selective
        # checkpointing may have cached it as the `mm` it saved) and no hook before ours
        owned = not torch.is_grad_enabled() and first_hook_is_ours(module)
        return ops.lowrank_add(output, t, b, self.scale, owned)

    def lowrank(self, module: Layer) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor] | None:
        if self.p and module.training:
            return None
        return self.plain_factors() + (self.scale,)

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the same update as one plain LoRA."""
        return self.lora_A, self.lora_B

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        a, b = self.plain_factors()
        dw = (b.float() * self.scale) @ a.float()  # scale the small factor
        return {"weight": dw.T if self.conv1d else dw}


class _TermLoRALinear(LoRALinear):
    """A variant whose update is more than s·B·A·x: added by the plain formula, no grouping."""

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        return output + self.term(x.to(self.lora_A.dtype)).to(output.dtype)


class BiasedLoRALinear(_TermLoRALinear):
    """bias="lora_only" (PEFT's lora_bias): a trainable bias b on B, s·(B·A·x + b)."""

    lora_bias: nn.Parameter

    def __init__(self, cfg: LoRAConfig, key: str, module: Layer, like: torch.Tensor, *rest: Any) -> None:
        super().__init__(cfg, key, module, like, *rest)
        self.lora_bias = nn.Parameter(torch.zeros(self.out_features, dtype=like.dtype, device=like.device))

    def term(self, x: torch.Tensor) -> torch.Tensor:
        return super().term(x) + self.lora_bias * self.scale

    def lowrank(self, module: Layer) -> None:
        return None  # the bias is not a low-rank term

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        out = super().delta_weights(module)
        if module._parameters.get("bias") is None:
            raise MergeError(
                f"{self.key!r} has no bias of its own, so its LoRA bias delta (bias='lora_only') "
                "cannot be merged without adding a parameter; keep this delta unmerged"
            )
        out["bias"] = self.lora_bias.float() * self.scale
        return out

    def describe(self) -> str:
        return super().describe() + " +bias"


class ResidualLoRALinear(_TermLoRALinear):
    """PiSSA (the weight's top-r SVD, split as √S), OLoRA (its QR), LoRA-GA and CorDA (from data,
    hookdelta/inits.py), as PEFT computes them. PEFT takes that principal part out of the base
    weight; hookdelta never writes the base, so the same factors are kept frozen as A₀, B₀ and the
    update is s·(B·A − B₀·A₀): nothing at first."""

    residual = True

    def __init__(
        self,
        cfg: LoRAConfig,
        key: str,
        module: Layer,
        like: torch.Tensor,
        weight: torch.Tensor | None = None,
        *rest: Any,
    ) -> None:
        super().__init__(cfg, key, module, like, weight, *rest)
        weight = _weight_for(cfg, key, weight)
        w = weight.detach().float()
        w = w.T if self.conv1d else w  # [out, in]
        r, s = self.r, float(self.scale)
        if cfg.init in ("lora_ga", "corda"):  # from data gathered by hd.inits (None: a saved delta loads)
            data = inits.supplied(cfg.init, key)
            make = inits.lora_ga_factors if cfg.init == "lora_ga" else inits.corda_factors
            a, b = (
                make(data, weight, r, s, self.conv1d, self.lora_A.dtype)
                if data is not None
                else (torch.zeros_like(self.lora_A), torch.zeros_like(self.lora_B))
            )
        elif cfg.init == "olora":
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r], q[:, :r]
        else:
            if cfg.init == "pissa":
                v, sv, uh = torch.linalg.svd(w, full_matrices=False)
                v, sv, uh = v[:, :r], sv[:r], uh[:r]
            else:  # pissa_niter_K: randomized SVD with K subspace iterations
                v, sv, u = torch.svd_lowrank(w, r, niter=int(cfg.init.rpartition("_")[2]))
                uh = u.t()
            sv = sv / s
            a, b = torch.diag(sv.sqrt()) @ uh, v @ torch.diag(sv.sqrt())
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        self.register_buffer("base_A", self.lora_A.detach().clone())
        self.register_buffer("base_B", self.lora_B.detach().clone())

    def term(self, x: torch.Tensor) -> torch.Tensor:  # two terms that cancel bit for bit at first
        return super().term(x) - F.linear(F.linear(x, self.base_A) * self.scale, self.base_B)

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 2r, [A; A₀] and [B, −B₀] (what PEFT's weight conversion writes)."""
        return torch.cat([self.lora_A, self.base_A]), torch.cat([self.lora_B, -self.base_B], dim=1)


class BiasedResidualLoRALinear(ResidualLoRALinear, BiasedLoRALinear):
    """PiSSA / OLoRA with bias="lora_only"."""


class ActivatedLoRALinear(_TermLoRALinear):
    """aLoRA (PEFT's alora_invocation_tokens): the update acts only from the last occurrence of
    the invocation tokens on, found by the InvocationScanner (methods/alora.py) before the call."""

    mergeable = False  # the update holds only from the invocation on: no weight can hold it

    def __init__(self, *args: Any, activation: Any = None) -> None:
        super().__init__(*args)
        self.activation = activation

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        return activated(self, output, self.term(x.to(self.lora_A.dtype)))

    def lowrank(self, module: Layer) -> None:
        return None


class ActivatedBiasedLoRALinear(ActivatedLoRALinear, BiasedLoRALinear):
    """aLoRA with bias="lora_only"."""


class ActivatedResidualLoRALinear(ActivatedLoRALinear, ResidualLoRALinear):
    """aLoRA with a PiSSA / OLoRA start."""


class ActivatedBiasedResidualLoRALinear(ActivatedLoRALinear, ResidualLoRALinear, BiasedLoRALinear):
    """aLoRA with a PiSSA / OLoRA start and bias="lora_only"."""


# (activated, residual, biased) -> the class: every combination is a class of its own, so what a
# piece computes is what its type says
LINEAR_VARIANTS = {
    (False, False, False): LoRALinear,
    (False, False, True): BiasedLoRALinear,
    (False, True, False): ResidualLoRALinear,
    (False, True, True): BiasedResidualLoRALinear,
    (True, False, False): ActivatedLoRALinear,
    (True, False, True): ActivatedBiasedLoRALinear,
    (True, True, False): ActivatedResidualLoRALinear,
    (True, True, True): ActivatedBiasedResidualLoRALinear,
}


class LoRASlices(_LoRABase):
    """LoRA on chosen slices of a fused q/k/v projection (loralib's MergedLinear): each slice its
    own rank-r A and B, written into that slice's output features only. lora_A is the slices'
    A's stacked [k·r, in], lora_B their B's stacked [rows, r]; `rows` are the output features."""

    def __init__(
        self, cfg: LoRAConfig, key: str, module: Layer, like: torch.Tensor, slices: dict[str, torch.Tensor]
    ) -> None:
        self.conv1d = is_conv1d(module)
        in_f, out_f = layer_dims(module, module, key)
        r = cfg.rank_for(key)
        names = list(cfg.fused_slices or ())
        rows = torch.cat([slices[n] for n in names])
        super().__init__(cfg, key, key, (len(names) * r, in_f), (len(rows), r), like, in_f)
        self.register_buffer("rows", rows.to(like.device), persistent=False)  # rebuilt from the layout
        self.rank_dims = {}  # A and B hold one block per slice: not padded at the end
        self.sizes, self.slices, self.out_features = [len(slices[n]) for n in names], tuple(names), out_f

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scale  # [.., k·r]
        parts = [F.linear(a, b) for a, b in zip(h.split(self.r, -1), self.lora_B.split(self.sizes), strict=True)]
        return output.index_add(-1, self.rows, torch.cat(parts, -1).to(output.dtype))

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        dw = torch.zeros(self.out_features, self.lora_A.shape[1], device=self.lora_A.device)
        for a, b, rows in zip(
            self.lora_A.float().split(self.r),
            self.lora_B.float().split(self.sizes),
            self.rows.split(self.sizes),
            strict=True,
        ):
            dw[rows] = (b * self.scale) @ a
        return {"weight": dw.T if self.conv1d else dw}

    def describe(self) -> str:
        return super().describe() + " slices " + "".join(self.slices)


class LoRAEmbedding(_LoRABase):
    """LoRA on nn.Embedding: looks up rows of Aᵀ, then projects with Bᵀ."""

    def __init__(self, cfg: LoRAConfig, key: str, module: nn.Embedding, like: torch.Tensor) -> None:
        num, dim = module.weight.shape
        r = cfg.rank_for(key)
        super().__init__(cfg, key, key, (r, num), (dim, r), like, num)
        if cfg.bias != "none":
            raise UnsupportedModuleError(f"bias='lora_only' is not available for the embedding {key!r}")

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = first_input(args, kwargs)
        after_a = F.embedding(ids, self.lora_A.T, module.padding_idx)
        return output + ((after_a * self.scale) @ self.lora_B.T).to(output.dtype)

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return {"weight": ((self.lora_B.float() * self.scale) @ self.lora_A.float()).T}


class LoRAConv(_LoRABase):
    """LoRA on Conv1d/2d/3d (grouped and 1×1 included): A is a grouped conv with the host's
    kernel, stride, padding and dilation; B a grouped 1×1 conv. Exact for any groups."""

    def __init__(self, cfg: LoRAConfig, key: str, module: Layer, like: torch.Tensor) -> None:
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

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs)).to(self.lora_A.dtype)
        h = module._conv_forward(x, self.lora_A, None)  # host's padding mode, stride, ... and groups
        return output + (self.conv(h, self.lora_B, groups=self.groups) * self.scale).to(output.dtype)

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        w = module.weight
        g, r = self.groups, self.r
        a = self.lora_A.float().reshape(g, r, -1)
        b = self.lora_B.float().reshape(g, w.shape[0] // g, r)
        return {"weight": torch.bmm(b, a).reshape(w.shape) * self.scale}


class LoRAParameter(_LoRABase):
    """LoRA on any parameter of 2 or more dims, swapped in for the call: W + s·B·A over the
    last two dims, one update per leading index (per expert of a fused MoE weight)."""

    hooks = frozenset()  # it only swaps
    rank_dims = {"lora_A": -2, "lora_B": -1}

    def __init__(self, cfg: LoRAConfig, key: str, module: Layer, name: str, like: torch.Tensor) -> None:
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
            raise ConfigError(
                "LoRA dropout acts on layer inputs; it is not available with target_parameters (set dropout=0)"
            )

    def update(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def swap(self, module: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        # fused experts: the products with W + s·B·A are taken on each expert's routed tokens
        # (ops.lowrank_weight; its plain twin builds W + s·B·A, as here for 2-D weights)
        return ops.lowrank_weight(weight, self.lora_A, self.lora_B, self.scale)

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return {self.param_name: (self.lora_B.float() * self.scale) @ self.lora_A.float()}

    def describe(self) -> str:
        return f"{self.param_name}: " + super().describe()


class DoRAParameter(LoRAParameter):
    """DoRA on a fused experts tensor, per expert: m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per
    output feature of each expert (over the input dim: the last one, or the middle one where the
    tensor is stored [experts, in, out]) and detached, as DoRALinear. Acts as the weight it would
    merge (swapped in for the call): the norm needs W + s·B·A built anyway."""

    merges_by = "value"
    additive = False
    reads_weight = True

    def __init__(
        self,
        cfg: LoRAConfig,
        key: str,
        module: Layer,
        name: str,
        like: torch.Tensor,
        weight: torch.Tensor,
        transposed: bool,
    ) -> None:
        super().__init__(cfg, key, module, name, like)
        self.in_dim = -2 if transposed else -1
        with torch.no_grad():
            self.magnitude = nn.Parameter(weight.detach().norm(dim=self.in_dim).to(like.device, like.dtype))

    def _value(self, weight: torch.Tensor) -> torch.Tensor:
        updated = weight.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return updated * (self.magnitude.float() / updated.norm(dim=self.in_dim).detach()).unsqueeze(self.in_dim)

    def swap(self, module: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._value(weight).to(weight.dtype)

    def merged_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return {self.param_name: self._value(current(module, self.param_name))}

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()


class TiedLoRA(Piece):
    """The other end of a tied weight: applies the primary piece's update in this module too.

    Holds no tensors of its own (the primary owns them, and writes the shared weight once
    on merge), so the two modules stay tied."""

    hooks = frozenset({"post"})
    additive = True

    def __init__(self, primary: Piece, site_path: str, module: Layer) -> None:
        super().__init__(site_path, key=site_path)
        object.__setattr__(self, "primary", primary)  # not a submodule: its tensors are saved once
        self.weight_path_exact = primary.weight_path_exact  # (dropout acts on inputs: no weight holds it)
        # the update of the shared weight is s·B·A: a PiSSA/OLoRA residual or aLoRA's activation
        # would have to act at this end too, so those are refused (lora_bias is the primary's own
        # output bias, not part of the shared weight: it stays there)
        plain = type(primary) is LoRAEmbedding or (
            type(primary) in (LoRALinear, BiasedLoRALinear) and not primary.conv1d
        )
        if not plain or not isinstance(module, (nn.Linear, nn.Embedding)):
            raise UnsupportedModuleError(
                f"{site_path!r} ({type(module).__name__}) shares its weight with {primary.key!r}; hookdelta "
                "ties LoRA only between nn.Linear and nn.Embedding layers. Exclude both or set tie_weights=False."
            )

    def weight_values(self, module: Layer) -> dict[str, torch.Tensor]:
        """The shared weight with the primary's update, for a parent that reads this layer's
        weight without calling it (a fused loss reading a tied head): W + s·B·A in the shared
        layout (the embedding's (B·A)ᵀ), differentiable in the primary's factors."""
        p = self.primary
        dw = (p.lora_B * p.scale) @ p.lora_A
        if isinstance(p, LoRAEmbedding):
            dw = dw.T
        w = current(module, "weight")
        return {"weight": w + dw.to(w.dtype)}

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
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

    def __init__(self, primary: LoRAParameter, site_path: str) -> None:
        super().__init__(primary, site_path, key=site_path + "." + primary.param_name)


class TensorParallelLoRALinear(LoRALinear):
    """LoRA on a tensor-parallel linear layer (its weight a DTensor on a 1-D mesh, as
    parallelize_module's ColwiseParallel / RowwiseParallel or transformers' tp_plan make it),
    with its factors sharded to match, as PEFT's tensor-parallel LoRA does:

    - column-parallel (W split by output rows, Shard(0)): B is split by rows, A replicated; each
      rank adds its own output features' part, no communication;
    - row-parallel (W split by input columns, Shard(1)): A is split by columns, B replicated; the
      rank-r partial products A·x are reduced once (the layer's own output is reduced by its style).

    Built when the delta is attached after parallelizing (every rank attaches, with the same seed).
    The formula is LoRALinear's; the plain fast paths (fused add, sibling stacks) are not used."""

    tensor_parallel = True
    siblings = None

    def __init__(self, cfg: LoRAConfig, key: str, module: Layer, like: torch.Tensor, *rest: Any) -> None:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        super().__init__(cfg, key, module, like, *rest)
        weight = module._parameters["weight"]
        mesh, placements = weight.device_mesh, tuple(weight.placements)
        dim = placements[0].dim if len(placements) == 1 and isinstance(placements[0], Shard) else None
        if self.conv1d or dim not in (0, 1) or self.p:
            raise UnsupportedModuleError(
                f"{key!r} is tensor-parallel with placements {placements} on a {mesh.ndim}-D mesh; hookdelta's "
                "LoRA matches column-parallel (Shard(0)) and row-parallel (Shard(1)) nn.Linear weights on a 1-D "
                "mesh, without dropout (a replicated input would get another mask on each rank)"
            )
        self.colwise = dim == 0
        a_place, b_place = (Replicate(), Shard(0)) if self.colwise else (Shard(1), Replicate())
        self.lora_A = nn.Parameter(distribute_tensor(self.lora_A.detach(), mesh, [a_place]))
        self.lora_B = nn.Parameter(distribute_tensor(self.lora_B.detach(), mesh, [b_place]))

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        a, b = self._parameters["lora_A"], self._parameters["lora_B"]
        x = first_input(args, kwargs)
        if not isinstance(x, DTensor):  # (the layer's input, as the parallel style laid it out)
            x = DTensor.from_local(x, cast(DTensor, a).device_mesh, [Replicate() if self.colwise else Shard(-1)])
        if isinstance(output, DTensor):
            raise UnsupportedModuleError(
                f"{self.key!r} returns a DTensor (a parallel style with use_local_output=False); hookdelta's "
                "tensor-parallel LoRA adds to the local output the default styles return"
            )
        h = cast(DTensor, F.linear(x.to(a.dtype), a))  # column-parallel: whole; row-parallel: a partial sum
        if not self.colwise:
            h = h.redistribute(h.device_mesh, [Replicate()])  # the layer's output is reduced: reduce ours once
        return output + cast(DTensor, F.linear(h * self.scale, b)).to_local().to(output.dtype)

    def lowrank(self, module: Layer) -> None:
        return None  # (no plain fast path over sharded factors)
