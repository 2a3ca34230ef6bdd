"""Where a delta learned: one self-contained HTML page (inline SVG, no server, no network) with
each site's relative update ‖ΔW‖/‖W‖ as a heatmap by layer × role, the effective rank and
singular values of each update, and the share of the update in each role. Sites whose delta is
no change of a weight (adapters, prompts) show the norm of their tensors instead.

    hd.report(delta, "report.html")
    hookdelta report DELTA_DIR --base MODEL_DIR -o report.html

Loaded on use: `import hookdelta` does not import this module (hd.report is resolved lazily)."""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .engine import current
from .errors import ConfigError, MergeError
from .modules import block_index
from .roles import roles


@dataclass
class SiteRow:
    """One site of the delta: its role and layer, and what it changed."""

    key: str
    role: str
    layer: int | None
    update: float  # ‖ΔW‖_F, or the norm of the piece's tensors where it changes no weight
    weight: float | None  # ‖W‖_F of the weight it changes (None: no weight change)
    singular: list[float]  # ΔW's singular values, largest first (per expert, averaged, for 3-D weights)

    @property
    def relative(self) -> float | None:
        return self.update / self.weight if self.weight else None

    @property
    def effective_rank(self) -> float | None:
        """exp of the entropy of the normalised singular values (Roy & Vetterli 2007)."""
        s = torch.tensor(self.singular, dtype=torch.float64)
        if not len(s) or s.sum() <= 0:
            return None
        p = s / s.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))


def rows(delta: Any) -> list[SiteRow]:
    """The report's numbers, one row per site that holds tensors, in the model's order."""
    if not hasattr(delta, "pieces") or getattr(delta, "model", None) is None:
        raise ConfigError(f"hd.report takes an attached delta (hd.attach or hd.load), got {type(delta).__name__}")
    model = delta.model
    role_of: dict[str, str] = {}
    for role, paths in roles(model).items():  # (a fused projection holds several: "attn.q+k+v")
        for path in paths:
            role_of[path] = f"{role_of[path]}+{role.rpartition('.')[2]}" if path in role_of else role
    out = []
    with torch.no_grad():
        for piece in delta.pieces.values():
            host = model.get_submodule(piece.site_path) if piece.site_path else model
            if piece.through:
                host = host.get_submodule(piece.through)
            try:
                change = piece.delta_weights(host) if piece.mergeable else {}
            except (MergeError, NotImplementedError):
                change = {}
            name = getattr(piece, "param_name", None) or "weight"
            dw = change.get(name)
            if dw is not None:
                w = current(host, name).detach().float()
                dw = dw.detach().float()
                sv = torch.linalg.svdvals(dw if dw.dim() == 2 else dw.reshape(-1, *dw.shape[-2:]))
                sv = sv if sv.dim() == 1 else sv.mean(dim=0)
                row = SiteRow(
                    piece.key,
                    role_of.get(piece.key, "other"),
                    block_index(piece.key),
                    float(dw.norm()),
                    float(w.norm()),
                    sv.tolist(),
                )
            else:
                tensors = [t.detach().float() for t in piece.parameters()]
                if not tensors:
                    continue
                row = SiteRow(
                    piece.key,
                    role_of.get(piece.site_path or piece.key, "other"),
                    block_index(piece.key),
                    math.sqrt(sum(float(t.square().sum()) for t in tensors)),
                    None,
                    [],
                )
            out.append(row)
    return out


def _color(value: float, top: float) -> str:
    """White to deep blue, linear in value / top."""
    t = 0.0 if top <= 0 else max(0.0, min(1.0, value / top))
    r, g, b = (int(255 - t * (255 - c)) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def _heatmap(data: list[SiteRow]) -> str:
    weighted = [r for r in data if r.relative is not None]
    values = weighted or data
    measure = (lambda r: r.relative) if weighted else (lambda r: r.update)
    role_names = list(dict.fromkeys(r.role for r in values))
    layers = sorted({r.layer for r in values if r.layer is not None}) + (
        [None] if any(r.layer is None for r in values) else []
    )
    cell, left, top_pad = 22, 110, 28
    top = max((measure(r) for r in values), default=0.0)
    grid: dict[tuple[str, Any], float] = {}
    for r in values:  # (several sites of one role in one layer, such as fused experts' tensors: their sum)
        grid[(r.role, r.layer)] = grid.get((r.role, r.layer), 0.0) + measure(r)
    width, height = left + cell * len(layers) + 10, top_pad + cell * len(role_names) + 10
    parts = [
        f'<svg id="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for j, layer in enumerate(layers):
        parts.append(
            f'<text x="{left + j * cell + cell / 2}" y="{top_pad - 8}" text-anchor="middle">'
            f"{'–' if layer is None else layer}</text>"
        )
    for i, role in enumerate(role_names):
        y = top_pad + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell * 0.7}" text-anchor="end">{html.escape(role)}</text>')
        for j, layer in enumerate(layers):
            if (role, layer) not in grid:
                continue
            v = grid[(role, layer)]
            parts.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{_color(v, top)}"><title>{html.escape(role)}, layer {layer}: {v:.4g}</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _spark(singular: list[float]) -> str:
    if not singular or singular[0] <= 0:
        return ""
    s = singular[:32]
    pts = " ".join(f"{2 + i * 116 / max(1, len(s) - 1):.1f},{22 - 20 * v / s[0]:.1f}" for i, v in enumerate(s))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="120" height="24"><polyline points="{pts}" '
        'fill="none" stroke="#08306b"/></svg>'
    )


def render(delta: Any, data: list[SiteRow] | None = None) -> str:
    """The report as one HTML document."""
    data = rows(delta) if data is None else data
    by_role: dict[str, float] = {}
    for r in data:
        by_role[r.role] = by_role.get(r.role, 0.0) + r.update**2
    total = sum(by_role.values()) or 1.0
    kind = "‖ΔW‖ / ‖W‖" if any(r.relative is not None for r in data) else "‖tensors‖"
    head = (
        f"<h1>Where delta {html.escape(delta.name)!s} learned</h1><p>{html.escape(delta.method)} on "
        f"{html.escape(type(delta.model).__name__)}: {len(data)} sites, {delta.num_trainable:,} trained numbers. "
        f"Heatmap: {kind} by role × layer.</p>"
    )
    roles_table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v / total:.1%}</td></tr>"
        for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])
    )
    site_rows = "".join(
        f'<tr data-site="{html.escape(r.key)}"><td>{html.escape(r.key)}</td><td>{html.escape(r.role)}</td>'
        f"<td>{'' if r.layer is None else r.layer}</td><td>{r.update:.4g}</td>"
        f"<td>{'' if r.relative is None else f'{r.relative:.4g}'}</td>"
        f"<td>{'' if r.effective_rank is None else f'{r.effective_rank:.2f}'}</td><td>{_spark(r.singular)}</td></tr>"
        for r in data
    )
    style = (
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        f"<title>hookdelta report: {html.escape(delta.name)}</title><style>{style}</style></head><body>{head}{_heatmap(data)}"
        f"<h2>Share of the update by role</h2><table id='roles'><tr><th>role</th><th>share of Σ‖·‖²</th></tr>"
        f"{roles_table}</table><h2>Sites</h2><table id='sites'><tr><th>site</th><th>role</th><th>layer</th>"
        f"<th>‖update‖</th><th>‖ΔW‖/‖W‖</th><th>effective rank</th><th>singular values</th></tr>{site_rows}"
        "</table></body></html>"
    )


def report(delta: Any, path: str | os.PathLike | None = None) -> str:
    """Write the report of `delta` to `path` (and return the path), or return the HTML."""
    text = render(delta)
    if path is None:
        return text
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)
