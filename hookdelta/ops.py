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
from typing import Iterator, Sequence

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

def lowrank_add(output: torch.Tensor, t: torch.Tensor, b: torch.Tensor, s: float | torch.Tensor,
                owned: bool = False) -> torch.Tensor:
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
        return torch.addmm(output.view(-1, output.shape[-1]), t.reshape(-1, t.shape[-1]), b.t(),
                           alpha=alpha).view(output.shape)
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

def routed_lowrank(h: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, a_table: torch.Tensor,
                   b_table: torch.Tensor) -> torch.Tensor:
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


def routed_lowrank_plain(h: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, a_table: torch.Tensor,
                         b_table: torch.Tensor) -> torch.Tensor:
    """The twin of `routed_lowrank`: row by row, the plain formula."""
    rows = codes.shape[0]
    xs = x.reshape(rows, -1, x.shape[-1]).to(a_table.dtype)
    delta = torch.stack([F.linear(F.linear(xs[j], a_table[c]), b_table[c]) for j, c in enumerate(codes.tolist())])
    return h + delta.reshape(h.shape).to(h.dtype)
