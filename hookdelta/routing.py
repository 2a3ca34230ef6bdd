"""Per-row routing: one batch, each row through its own delta (PEFT's `adapter_names`,
S-LoRA's and Punica's batching of many adapters), with hooks only.

While a `Router` is set on a model's sites, each dispatcher hands it the pieces it would run
(engine.Dispatcher): a piece of a routed delta acts on its own rows, a kept delta's on every
row, any other delta's on none. A run of low-rank pieces (`Piece.lowrank`: LoRA) becomes
one gathered matmul pair over per-row A and B, ranks zero-padded, which is exact: a zero
row adds nothing. Other pieces run on their rows' slice of the layer's input and output.

Rows: `names` has one entry per row of the batch the model is called with. generate()
repeats each row for beams and returned sequences (repeat_interleave), so in a batch of
k·n rows, row j is routed by names[j // k]. Every routed layer must see the model's batch
as its first dimension; a layer that sees another row count is refused, not guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .engine import Piece, first_input, map_output
from .errors import DeltaStateError, RoutingError, UnsupportedModuleError

ALL, OFF = -1, 0  # a piece's rows: every row (a kept delta), none (a delta not routed); routed: 1, 2, ...
BASE = "__base__"  # PEFT's adapter_names entry for "no adapter" (None works too)
_BATCH_INPUTS = (
    "input_ids",
    "inputs_embeds",
    "decoder_input_ids",
    "decoder_inputs_embeds",
    "pixel_values",
    "input_values",
    "input_features",
)


class Router:
    """Runs a site's pieces per row for one hd.route(...) block."""

    def __init__(self, names: list[str | None], routed: list[str], who: dict[int, int]) -> None:
        self.names = names
        self.routed = routed  # the distinct delta names routed to, in first-seen order
        self.who = who  # id(piece) -> 1 + index in `routed`, ALL or OFF
        self.base = torch.tensor([0 if n is None else routed.index(n) + 1 for n in names])
        self.batch: list[int | None] = []  # rows of the model calls in progress (innermost last)
        self._codes: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._rows: dict[tuple[int, torch.device, int], torch.Tensor | None] = {}

    # -- rows ------------------------------------------------------------------------------

    hookdelta_internal = True  # its hooks are hookdelta's own (engine.is_ours)

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A routed model (or its encoder) is called: note its batch, and check it fits `names`."""
        rows = batch_of(args, kwargs)
        if rows is not None and rows % len(self.names):
            raise RoutingError(
                f"hd.route got {len(self.names)} names but {type(module).__name__} was called with a batch of "
                f"{rows} rows; give one name per row (generate() may repeat each row k times: that is fine)"
            )
        self.batch.append(rows)

    def leave(self, module: nn.Module, *call: Any) -> None:
        # (*call: also called without kwargs when the routing ended earlier in the same call)
        if self.batch:
            self.batch.pop()

    def codes(self, path: str, x: Any) -> torch.Tensor:
        """Each row's delta code (0: base) for a layer input x [rows, ...]."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise RoutingError(
                f"hd.route: the layer {path!r} got an input without a batch dimension "
                f"({type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}); "
                "exclude it from the routed deltas' targets"
            )
        rows, n = x.shape[0], len(self.names)
        expected = self.batch[-1] if self.batch else None
        if (expected is not None and rows != expected) or rows % n:
            raise RoutingError(
                f"hd.route: the layer {path!r} sees {rows} rows but the model was called with "
                f"{expected or n} (its input is not batch-first: flattened tokens, expert-routed tokens, ...), "
                "so its rows cannot be told apart; exclude it from the routed deltas"
            )
        key = (rows, x.device)
        codes = self._codes.get(key)
        if codes is None:
            codes = self._codes[key] = self.base.to(x.device).repeat_interleave(rows // n)
        return codes

    def rows(self, codes: torch.Tensor, who: int) -> torch.Tensor | None:
        """The row indices routed to delta code `who` (None when there are none)."""
        key = (codes.shape[0], codes.device, who)
        if key not in self._rows:
            rows = (codes == who).nonzero().squeeze(1)
            self._rows[key] = rows if rows.numel() else None
        return self._rows[key]

    # -- running pieces --------------------------------------------------------------------

    def pre(
        self, path: str, module: nn.Module, args: tuple, kwargs: dict, pieces: Sequence[Piece]
    ) -> tuple[tuple, dict]:
        for piece in pieces:
            who = self.who.get(id(piece), OFF)
            if who == ALL:
                args, kwargs = piece.pre_forward(module, args, kwargs)
            elif who != OFF:
                codes = self.codes(path, first_input(args, kwargs))
                rows = self.rows(codes, who)
                if rows is not None:
                    args, kwargs = _pre_on_rows(path, piece, module, args, kwargs, rows)
        return args, kwargs

    def post(
        self, path: str, module: nn.Module, args: tuple, kwargs: dict, output: Any, pieces: Sequence[Piece]
    ) -> Any:
        i, count = 0, len(pieces)
        while i < count:
            piece = pieces[i]
            who = self.who.get(id(piece), OFF)
            if who == OFF:
                i += 1
                continue
            if who == ALL:
                output = piece.post_forward(module, args, kwargs, output)
                i += 1
                continue
            x = first_input(args, kwargs)
            codes = self.codes(path, x)
            run: list[tuple[int, tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]]] = []
            while i < count:  # consecutive routed low-rank pieces: one gathered matmul pair
                w = self.who.get(id(pieces[i]), OFF)
                factors = pieces[i].lowrank(module) if w > 0 else None
                if w == OFF:
                    i += 1
                    continue
                if factors is None:
                    break
                run.append((w, factors))
                i += 1
            if run:
                output = map_output(output, lambda h, x=x, codes=codes, run=run: self._lowrank(path, x, h, codes, run))
                continue
            rows = self.rows(codes, who)
            if rows is not None:
                sub_args, sub_kwargs = _with_main(args, kwargs, rows)
                sub = piece.post_forward(module, sub_args, sub_kwargs, take(output, rows, codes.shape[0]))
                output = put(output, sub, rows, codes.shape[0])
            i += 1
        return output

    def _lowrank(
        self,
        path: str,
        x: torch.Tensor,
        h: torch.Tensor,
        codes: torch.Tensor,
        run: list[tuple[int, tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]]],
    ) -> torch.Tensor:
        """h + s·B·A·x with each row's own A, B, s: gathered [rows, r, in] and [rows, out, r]."""
        a_table, b_table = self._table(run)
        return ops.routed_lowrank(h, x, codes, a_table, b_table)

    def _table(
        self, run: list[tuple[int, tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per delta code, A [r_max, in] and s·B [out, r_max] zero-padded (code 0 and deltas not
        in the run: zeros). Made per call: an optimizer step or a `.data` write can change a factor
        without a trace hookdelta could check, so no table is kept between calls."""
        r_max = max(a.shape[0] for _, (a, _, _) in run)
        by_code = {w: (a, b, s) for w, (a, b, s) in run}
        a0, b0 = run[0][1][0], run[0][1][1]
        zeros_a = a0.new_zeros(r_max, a0.shape[1])
        zeros_b = b0.new_zeros(b0.shape[0], r_max)
        a_rows, b_rows = [], []
        for code in range(len(self.routed) + 1):
            if code in by_code:
                a, b, s = by_code[code]
                pad = r_max - a.shape[0]
                a_rows.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
                b_rows.append(F.pad(b * s, (0, pad)) if pad else b * s)
            else:
                a_rows.append(zeros_a)
                b_rows.append(zeros_b)
        return torch.stack(a_rows), torch.stack(b_rows).to(a0.dtype)


def build_router(
    deltas: dict[str, Any], sites: dict[str, Any], names: Sequence[Any], keep: Sequence[str] | None
) -> Router:
    """Check a route request against the model's deltas and build its Router."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not len(names):
        raise RoutingError(f"hd.route needs one delta name (or None) per batch row, got {names!r}")
    rows = [None if n is None or n == BASE else n for n in names]
    bad = [n for n in rows if n is not None and not isinstance(n, str)]
    if bad:
        raise RoutingError(f"hd.route names must be delta names or None, got {bad[0]!r}")
    keep = [keep] if isinstance(keep, str) else list(keep or [])
    if any(not isinstance(n, str) for n in keep):
        raise RoutingError(f"hd.route's keep= takes delta names, got {keep!r}")
    unknown = sorted({n for n in rows + keep if n is not None and n not in deltas})
    if unknown:
        raise DeltaStateError(f"the model has no delta named {unknown}; its deltas are {list(deltas)}")
    both = sorted({n for n in rows if n is not None} & set(keep))
    if both:
        raise RoutingError(f"{both} are both routed and kept for every row; name each delta in one place")
    routed = list(dict.fromkeys(n for n in rows if n is not None))
    for name in routed + keep:
        delta = deltas[name]
        if not delta.enabled or (delta.merged and name in routed):  # a merged delta can only be kept
            raise DeltaStateError(
                f"delta {name!r} is {'merged into the weights' if delta.merged else 'disabled'}; only enabled, "
                "unmerged deltas can be routed (a merged one can be kept for every row: keep=[...]); "
                "unmerge() or enable() it first"
            )
    merged = [n for n, d in deltas.items() if d.merged and n not in keep]
    if merged:
        raise DeltaStateError(
            f"deltas {merged} are merged into the weights, so they would act on every row; unmerge() them, "
            "or name them in keep=[...] to say so"
        )
    who: dict[int, int] = {}
    for name, delta in deltas.items():
        code = routed.index(name) + 1 if name in routed else ALL if name in keep else OFF
        for piece in delta.pieces.values():
            who[id(piece)] = code
            if code > 0:
                _check_routable(name, piece)
    return Router(rows, routed, who)


def _check_routable(name: str, piece: Piece) -> None:
    if not piece.routable:
        raise UnsupportedModuleError(
            f"delta {name!r} ({piece.describe() or type(piece).__name__}) {piece.unroutable}; route it alone (all "
            "rows) or keep it out of mixed batches"
        )
    if piece.swapping():
        raise UnsupportedModuleError(
            f"delta {name!r} changes the weights of {piece.site_path!r} for the whole call (weight swaps: LN "
            "tuning, target_parameters and LoRA / IA3 on fused experts, also_train, or a layer its parent bypasses), "
            "which cannot differ per row; route deltas that act on layer outputs (LoRA, DoRA, IA3, BitFit, adapters "
            "on layers), or give each delta its own batch (hd.set_active)"
        )
    if any(part in ("experts", "expert") for part in piece.site_path.split(".")):
        raise UnsupportedModuleError(
            f"delta {name!r} sits on {piece.site_path!r}, an expert layer that sees tokens gathered across rows; "
            "exclude the experts from deltas you route"
        )


def batch_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: its main input's first dimension."""
    for name in _BATCH_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None


# -- one piece on some rows ---------------------------------------------------------------------


def take(obj: Any, rows: torch.Tensor, count: int) -> Any:
    """The `rows` of every batch-first tensor in obj (a tensor, tuple, list, dict, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows) if obj.dim() and obj.shape[0] == count else obj
    if isinstance(obj, (tuple, list)):
        items = [take(o, rows, count) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        out = obj.copy()  # ModelOutput.copy() keeps its class
        for k in out:
            out[k] = take(out[k], rows, count)
        return out
    return obj


def put(full: Any, part: Any, rows: torch.Tensor, count: int) -> Any:
    """`full` with its `rows` replaced by `part` (the same structure), out of place."""
    if isinstance(full, torch.Tensor):
        if not (full.dim() and full.shape[0] == count):
            return full
        return full.index_copy(0, rows, part.to(full.dtype))
    if isinstance(full, (tuple, list)):
        items = [put(f, p, rows, count) for f, p in zip(full, part, strict=True)]
        return type(full)(*items) if hasattr(full, "_fields") else type(full)(items)
    if isinstance(full, dict):
        out = full.copy()
        for k in out:
            out[k] = put(out[k], part[k], rows, count)
        return out
    return full


def _with_main(args: tuple, kwargs: dict, rows: torch.Tensor) -> tuple[tuple, dict]:
    """The call's inputs with its main input cut to `rows` (other inputs as they are)."""
    if args:
        return (args[0].index_select(0, rows),) + tuple(args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: kwargs[name].index_select(0, rows)}


def _pre_on_rows(
    path: str, piece: Piece, module: nn.Module, args: tuple, kwargs: dict, rows: torch.Tensor
) -> tuple[tuple, dict]:
    """A pre-forward piece on some rows: only a change of the main input can be routed."""
    main = first_input(args, kwargs)
    sub_args, sub_kwargs = _with_main(args, kwargs, rows)
    new_args, new_kwargs = piece.pre_forward(module, sub_args, sub_kwargs)
    new_main = first_input(new_args, new_kwargs)
    others_same = (
        len(new_args) == len(args)
        and all(a is b for a, b in zip(new_args[1:], args[1:], strict=True))
        and new_kwargs.keys() == kwargs.keys()
    )
    if not others_same or not isinstance(new_main, torch.Tensor) or new_main.shape[1:] != main.shape[1:]:
        raise RoutingError(
            f"hd.route: a piece at {path!r} ({type(piece).__name__}) changes more than its layer's "
            "input tensor, which cannot be done per row"
        )
    merged = main.index_copy(0, rows, new_main.to(main.dtype))
    if args:
        return (merged,) + tuple(args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: merged}
