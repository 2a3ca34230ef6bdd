"""The fast paths: every fused or grouped computation hookdelta does, each beside its plain twin.

Methods hold formulas; this module holds the torch tricks. Each fast function says why it equals
its twin (bit for bit, or within a stated rounding) and when it runs; where its conditions do not
hold it calls the twin itself. `plain()` forces every twin (tests compare the two, see
tests/conformance/; also a way to bisect a suspected fast-path bug).

Rules every fast path here keeps:
- nothing derived is kept between calls (an optimizer step or a `.data` write changes a factor
  without a trace: version counters and data pointers are not proof);
- an in-place write only into a tensor nothing else can hold yet: not under autograd (selective
  checkpointing may have cached the very tensor, functorch may wrap it), never while compiling;
- the kernel is chosen by shapes, dtypes and grad mode only, so a checkpoint's recompute issues
  the same ops as its forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

_forced_plain = [False]


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """Run every op below as its plain twin inside the block (an internal switch, process-wide:
    for tests and bisecting, not for production use)."""
    before = _forced_plain[0]
    _forced_plain[0] = True
    try:
        yield
    finally:
        _forced_plain[0] = before


def fast() -> bool:
    """Whether fast paths may run (not inside `plain()`)."""
    return not _forced_plain[0]


# -- the add of a low-rank term: out + s·(t·Bᵀ) -------------------------------------------------


def lowrank_add(
    output: torch.Tensor, t: torch.Tensor, b: torch.Tensor, s: float | torch.Tensor, owned: bool = False
) -> torch.Tensor:
    """output + s·(t·Bᵀ), t = A·x [.., r], B [out, r]: the add inside the B GEMM (addmm /
    baddbmm), one kernel and no output-wide temporary.

    Equal to `lowrank_add_plain` up to rounding: the GEMM accumulates s·t·Bᵀ onto the output in
    one pass instead of rounding t·Bᵀ first (≤ 1 ulp of the sum per element in float32). In place
    (`addmm_`, bit for bit equal to the out-of-place `addmm`) only when `owned`: no autograd and
    nothing but the caller holds the output (the caller knows: its hook runs first on the layer).
    Runs when the output is a contiguous tensor of B's dtype; else the twin."""
    if not (fast() and isinstance(output, torch.Tensor) and output.dtype == b.dtype and output.is_contiguous()):
        return lowrank_add_plain(output, t, b, s)
    compiling = torch.compiler.is_compiling()
    # the scale rides along as the GEMM's alpha (no kernel of its own: decoding is launch-bound)
    # except in compiled code, where inductor has dropped alpha= before (torch.add in 2.13), and
    # for a scale held as a tensor (hot-swap): then it scales the r-wide product instead
    if type(s) is float and not compiling:
        alpha = s
    else:
        t, alpha = t * s, 1.0
    if compiling:  # flat and out of place: inductor fuses it
        return torch.addmm(output.view(-1, output.shape[-1]), t.reshape(-1, t.shape[-1]), b.t(), alpha=alpha).view(
            output.shape
        )
    if not output._is_view() and output.dim() == 2:
        return output.addmm_(t, b.t(), alpha=alpha) if owned else torch.addmm(output, t, b.t(), alpha=alpha)
    if not output._is_view() and output.dim() == 3:  # B broadcast over the batch: no flattening copy
        bt = b.t().expand(output.shape[0], -1, -1)
        return output.baddbmm_(t, bt, alpha=alpha) if owned else torch.baddbmm(output, t, bt, alpha=alpha)
    flat, t = output.view(-1, output.shape[-1]), t.reshape(-1, t.shape[-1])
    if owned:  # (without autograd the view costs nothing)
        flat.addmm_(t, b.t(), alpha=alpha)
        return output
    return torch.addmm(flat, t, b.t(), alpha=alpha).view(output.shape)


def lowrank_add_plain(output: torch.Tensor, t: torch.Tensor, b: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """The twin of `lowrank_add`: the formula, term by term, out of place."""
    return output + F.linear(t * s, b).to(output.dtype)


# -- siblings reading one input: x·[A₁; A₂; ...]ᵀ once ------------------------------------------

STACK_ROWS = 128  # below this many input rows, without autograd, separate GEMMs win (measured, see below)


def stack_pays(x: torch.Tensor) -> bool:
    """Whether `stacked_linear` is worth its `cat` for this input. Measured on the CPU (three
    [8, 512] factors, torch 2.13, 2 threads): without autograd the stacked GEMM is 1.6x slower at
    1-4 rows (decoding: the cat costs more than two GEMMs), 1.15x at 64 and 0.79x at 256 rows;
    with autograd it wins at every size (0.86x at 1 row, 0.61x at 512: one dx GEMM instead of
    three). Decided by shape and grad mode only, so all siblings of one call decide alike."""
    return torch.is_grad_enabled() or x.numel() >= STACK_ROWS * x.shape[-1]


def stacked_linear(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """x·Aᵢᵀ for each factor, as slices of one GEMM over the stacked factors (one read of x, and
    in backward one dx GEMM instead of one per factor). The stack is made per call, never kept.

    Equal to `stacked_linear_plain` up to the GEMM's blocking (the same dot products, possibly
    summed in another order: a few ulp in float32). The factors share x's dtype and device (the
    caller's duty); callers keep one choice per member for the life of a group, so a model gives
    the same bits call after call."""
    if not fast():
        return stacked_linear_plain(x, factors)
    # one split (one backward node that concatenates the gradients), not a slice each
    return F.linear(x, torch.cat(list(factors))).split([f.shape[0] for f in factors], dim=-1)


def stacked_linear_plain(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The twin of `stacked_linear`: one GEMM per factor."""
    return tuple(F.linear(x, f) for f in factors)


# -- many deltas in one batch: each row through its own A and B ---------------------------------


def routed_lowrank(
    h: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor
) -> torch.Tensor:
    """h + B_c·A_c·x for each row with its code c: A_c = a_table[c] [r, in], B_c = b_table[c]
    [out, r] (scales folded into B; zero rows for "no delta"), as one gathered bmm pair.

    Equal to `routed_lowrank_plain` up to rounding (a batched GEMM per row instead of one per
    row; the zero padding of ranks adds exact zeros). Runs always unless `plain()`."""
    if not fast():
        return routed_lowrank_plain(h, x, codes, a_table, b_table)
    rows = codes.shape[0]
    xs = x.reshape(rows, -1, x.shape[-1]).to(a_table.dtype)
    t = torch.bmm(xs, a_table.index_select(0, codes).transpose(1, 2))  # [rows, tokens, r]
    b = b_table.index_select(0, codes).transpose(1, 2)  # [rows, r, out]
    if h.dtype == b.dtype:
        return torch.baddbmm(h.reshape(rows, -1, h.shape[-1]), t, b).reshape(h.shape)
    return h + torch.bmm(t, b).reshape(h.shape).to(h.dtype)


def routed_lowrank_plain(
    h: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, a_table: torch.Tensor, b_table: torch.Tensor
) -> torch.Tensor:
    """The twin of `routed_lowrank`: row by row, the plain formula."""
    rows = codes.shape[0]
    xs = x.reshape(rows, -1, x.shape[-1]).to(a_table.dtype)
    delta = torch.stack([F.linear(F.linear(xs[j], a_table[c]), b_table[c]) for j, c in enumerate(codes.tolist())])
    return h + delta.reshape(h.shape).to(h.dtype)


# -- a LoRA on fused expert tensors: W + s·B·A used without building it ---------------------------


class LowRankWeight(torch.Tensor):
    """A stand-in for a fused experts tensor W [experts, out, in] with LoRA terms: its value is
    W + Σ s·B·A (per expert, over the last two dims), but the products a mixture layer makes
    with it are taken as x·Wᵀ + s·(x·Aᵀ)·Bᵀ on the tokens routed to each expert, never building
    W + s·B·A for all experts (which costs experts × out × in per call, and in backward the full
    weight gradient of every expert).

    What it recognises (transformers' experts code, eager, batched_mm and grouped_mm):
    indexing the experts dim, transposing the last two dims, F.linear, bmm / matmul, grouped_mm;
    without autograd and with many tokens per expert the built weight is the faster (`_builds`).
    Equal to the plain twin (`W + s·B·A` built, then the same op) up to rounding: the same
    products summed in another order. Any other use of it gets the plain twin itself (the weight
    built), and so does every use where the factors' dtype is not the weight's (mixed-precision
    GEMMs are not one op). Built per call from live factors, never cached."""

    base: torch.Tensor
    terms: tuple[tuple[torch.Tensor, torch.Tensor, float | torch.Tensor], ...]

    @staticmethod
    def __new__(cls, base: torch.Tensor, terms: tuple) -> LowRankWeight:
        out = base.detach().as_subclass(cls)  # (shares the base's storage: the metadata is the base's)
        out.base, out.terms = base, terms
        return out

    # (the default repr would print the values: the plain twin; torch's stub types its keyword oddly)
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"LowRankWeight(shape={tuple(self.base.shape)}, terms={len(self.terms)})"

    def value(self) -> torch.Tensor:
        """The plain twin: W + Σ s·B·A, built."""
        w = self.base
        for a, b, s in self.terms:
            w = w + ((b @ a) * s).to(w.dtype)
        return w

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:  # the base's shape, dtype, device, strides (no values read)
            return func(*_swap_args(args, lambda w: w.base), **kwargs)
        rule = _RULES.get(func)
        if rule is not None:
            out = rule(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*_swap_args(args, LowRankWeight.value), **_swap_args(kwargs, LowRankWeight.value))


def _swap_args(value: Any, fn: Any) -> Any:
    """`value` (an op's args: tensors in tuples, lists and dicts) with fn(w) for each LowRankWeight w."""
    if isinstance(value, LowRankWeight):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_swap_args(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _swap_args(v, fn) for k, v in value.items()}
    return value


def lowrank_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """The stand-in a LoRA on a fused experts tensor swaps in for one call: a `LowRankWeight`
    (terms of other LoRAs on the same tensor kept beside), or the plain twin W + s·B·A where
    fast paths may not run: inside `plain()`, while compiling, under functorch (vmap, grad,
    jvp) and for tensors of fewer than 3 dims."""
    if isinstance(weight, LowRankWeight):
        return LowRankWeight(weight.base, weight.terms + ((a, b, s),))
    if not fast() or weight.dim() < 3 or torch.compiler.is_compiling():
        return lowrank_weight_plain(weight, a, b, s)
    return LowRankWeight(weight, ((a, b, s),))


def lowrank_weight_plain(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float | torch.Tensor
) -> torch.Tensor:
    """The twin of `lowrank_weight`: W + s·B·A, built for every expert."""
    return weight + ((b @ a) * s).to(weight.dtype)


def _builds(rows: int, k: int, n: int, groups: int = 1) -> bool:
    """Whether building W + s·B·A beats the routed low-rank products for `rows` rows through
    `groups` matrices [k, n]: only without autograd, above rows·(k + n) = 2·groups·k·n. Measured on
    this CPU (2 threads, torch 2.13, a Mixtral of hidden 256 with 8 experts, r = 8, medians of 11
    interleaved rounds): without autograd the routed path takes 0.51x the built weight's time at
    512 routed tokens, 0.95x at 2048, 1.13x at 4096 and 1.19x at 8192 (the bound sits between
    2048 and 4096 for both expert tensors); with autograd it takes 0.90x at 4096 and 1.03x at 8192
    while keeping no [experts, out, in] tensor for backward, so with autograd it always runs.
    Decided by shapes and grad mode only (a checkpoint's recompute takes the same branch)."""
    return not torch.is_grad_enabled() and rows * (k + n) > 2 * groups * k * n


def _same_dtype(w: LowRankWeight, *others: torch.Tensor) -> bool:
    return all(a.dtype == w.base.dtype and b.dtype == w.base.dtype for a, b, _ in w.terms) and all(
        o.dtype == w.base.dtype for o in others
    )


def _lead_index(w: LowRankWeight, index) -> Any:
    """w[index] where index picks along the leading (experts) dims only, else NotImplemented."""

    def leading(i) -> bool:
        return (isinstance(i, (int, slice)) and not isinstance(i, bool)) or (
            isinstance(i, torch.Tensor) and not i.is_floating_point() and i.dtype != torch.bool
        )

    parts = index if isinstance(index, tuple) else (index,)
    if not isinstance(w, LowRankWeight) or not all(leading(i) for i in parts) or w.dim() - len(parts) < 2:
        return NotImplemented
    return LowRankWeight(w.base[index], tuple((a[index], b[index], s) for a, b, s in w.terms))


def _transpose(w: LowRankWeight, d0: int = -2, d1: int = -1) -> Any:
    """wᵀ over the last two dims: Wᵀ + s·Aᵀ·Bᵀ (the factors swap roles)."""
    n = w.dim()
    if not isinstance(w, LowRankWeight) or {d0 % n, d1 % n} != {n - 2, n - 1}:
        return NotImplemented
    return LowRankWeight(w.base.transpose(-2, -1), tuple((b.mT, a.mT, s) for a, b, s in w.terms))


def _linear(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> Any:
    """x·(W + s·B·A)ᵀ = x·Wᵀ + s·(x·Aᵀ)·Bᵀ for one expert's [out, in]."""
    if not isinstance(w, LowRankWeight) or isinstance(x, LowRankWeight) or w.dim() != 2 or not _same_dtype(w, x):
        return NotImplemented
    if _builds(x.numel() // max(1, x.shape[-1]), *w.shape):
        return NotImplemented  # (the op then runs on the built weight: the plain twin)
    out = F.linear(x, w.base, bias)
    for a, b, s in w.terms:
        out = out + F.linear(F.linear(x, a), b) * s
    return out


def _matmul(x: Any, y: Any) -> Any:
    """(W + s·B·A)·y = W·y + s·B·(A·y) and x·(W + s·B·A) = x·W + s·(x·B)·A, batched."""
    if isinstance(x, LowRankWeight) and not isinstance(y, LowRankWeight) and _same_dtype(x, y):
        out = torch.matmul(x.base, y)
        for a, b, s in x.terms:
            out = out + torch.matmul(b, torch.matmul(a, y)) * s
        return out
    if isinstance(y, LowRankWeight) and not isinstance(x, LowRankWeight) and _same_dtype(y, x):
        out = torch.matmul(x, y.base)
        for a, b, s in y.terms:
            out = out + torch.matmul(torch.matmul(x, b), a) * s
        return out
    return NotImplemented


def _grouped(
    x: torch.Tensor, w: Any, *, offs: torch.Tensor | None = None, bias: Any = None, out_dtype: Any = None
) -> Any:
    """x·(W_g + s·B_g·A_g) for the rows of each group g (offs): x·W_g + s·((x·B_g)·A_g), the
    rank padded with zeros to the grouped GEMM's 16-byte stride rule (exact: zeros add zeros)."""
    if (
        not isinstance(w, LowRankWeight)
        or isinstance(x, LowRankWeight)
        or w.dim() != 3
        or offs is None
        or bias is not None
        or out_dtype is not None
        or not _same_dtype(w, x)
        or _builds(x.shape[0], w.shape[1], w.shape[2], w.shape[0])
    ):
        return NotImplemented
    grouped = F.grouped_mm
    out = grouped(x, w.base, offs=offs)
    for a, b, s in w.terms:  # here b is [groups, in, r] and a [groups, r, out] (W_g is [in, out])
        r = a.shape[-2]
        step = max(1, 16 // a.element_size())
        if r % step:
            pad = step - r % step
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        out = out + grouped(grouped(x, b.contiguous(), offs=offs), a.contiguous(), offs=offs) * s
    return out


_Tensor: Any = torch.Tensor  # (its properties' getters, which the stubs type as plain values)
_METADATA = frozenset(
    {
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.stride,
        torch.Tensor.data_ptr,
        torch.Tensor.is_contiguous,
        torch.Tensor.element_size,
        torch.Tensor.is_floating_point,
        torch.Tensor.__len__,
        _Tensor.shape.__get__,
        _Tensor.dtype.__get__,
        _Tensor.device.__get__,
        _Tensor.ndim.__get__,
        _Tensor.requires_grad.__get__,
        _Tensor.is_cuda.__get__,
        _Tensor.layout.__get__,
        _Tensor.is_meta.__get__,
        _Tensor.is_quantized.__get__,
        torch.Tensor.__format__,
    }
)
_RULES: dict[Any, Any] = {
    torch.Tensor.__getitem__: _lead_index,
    torch.Tensor.transpose: _transpose,
    torch.transpose: _transpose,
    _Tensor.mT.__get__: _transpose,
    F.linear: _linear,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.Tensor.__rmatmul__: lambda y, x: _matmul(x, y),
}
if hasattr(F, "grouped_mm"):  # (torch >= 2.10; before it, transformers' experts build the weight: the plain twin)
    # F.grouped_mm hands its operands on to torch._grouped_mm, which is where the stand-in is seen
    _RULES.update({F.grouped_mm: _grouped, getattr(torch, "_grouped_mm", F.grouped_mm): _grouped})
