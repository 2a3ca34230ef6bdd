"""`hd.visualize(model)`: a rich tree of the model with its deltas on their sites.

Repeated sibling blocks that are identical in structure fold into one node
(`layer.0-11 ×12`); leaves show their parameters; the tree ends with totals.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from rich.console import Console, Group
from rich.text import Text
from rich.tree import Tree

from .modules import host, is_internal
from .roles import roles
from .store import store_of


def _site_labels(model: nn.Module) -> dict[str, list[str]]:
    """path -> one label per delta piece on that module, in attach order."""
    labels: dict[str, list[str]] = {}
    store = store_of(model)
    if store is None:
        return labels
    for delta in store.deltas.values():
        state = "merged" if delta.merged else ("enabled" if delta.enabled else "disabled")
        for piece in delta.pieces.values():
            what = "also_train" if piece.role == "also_train" else delta.method
            via = f" (through {piece.site_path or 'the model'}'s weights)" if piece.through else ""
            text = f"◆ {delta.name} ({what}) {piece.describe()}{via} [{state}]".replace("  ", " ")
            labels.setdefault(".".join(p for p in (piece.site_path, piece.through) if p), []).append(text)
    return labels


def _param_text(name: str, p: Any) -> str:
    mark = " trainable" if p.requires_grad else ""
    return f"{name} {list(p.shape)} {str(p.dtype).replace('torch.', '')}{mark}"


class _Builder:
    def __init__(self, model: nn.Module, depth: int | None, show_params: bool, show_roles: bool = False) -> None:
        self.labels = _site_labels(model)
        if show_roles:  # the discovered semantic roles, as a first label on their modules
            modules = {n for n, _ in model.named_modules()}
            for role, paths in roles(model).items():
                for path in paths:
                    if path in modules:
                        self.labels.setdefault(path, []).insert(0, f"⟨{role}⟩")
                    else:  # a parameter (fused experts, a router's weight): on the module holding it
                        owner, _, name = path.rpartition(".")
                        self.labels.setdefault(owner, []).insert(0, f"⟨{role}: {name}⟩")
        self.depth = depth
        self.show_params = show_params
        self.sigs: dict[str, str] = {}

    def signature(self, path: str, module: nn.Module) -> str:
        """Everything a folded node would hide: classes, shapes, flags and deltas, below `path`."""
        if path not in self.sigs:
            own = [type(module).__name__]
            own += [_param_text(n, p) for n, p in module._parameters.items() if p is not None]
            own += self.labels.get(path, [])
            for name, child in module._modules.items():
                if child is not None and not is_internal(name):
                    own.append(f"{name}:{self.signature(_join(path, name), child)}")
            self.sigs[path] = "(" + "|".join(own) + ")"
        return self.sigs[path]

    def label(self, name: str, module: nn.Module, path: str, count: int = 1, last: str = "") -> Text:
        text = Text()
        if path or name != type(module).__name__:
            text.append(name if count == 1 else f"{name}-{last} ×{count}", style="bold")
            text.append(" ")
        text.append(f"({type(module).__name__})", style="cyan")
        n = sum(p.numel() for p in module.parameters())
        if module._modules and n:
            text.append(f" {n * count:,} params", style="dim")
        return text

    def add(
        self, tree: Tree, name: str, module: nn.Module, path: str, level: int, count: int = 1, last: str = ""
    ) -> None:
        self.fill(tree.add(self.label(name, module, path, count, last)), module, path, level)

    def fill(self, node: Tree, module: nn.Module, path: str, level: int) -> None:
        for text in self.labels.get(path, []):
            node.add(Text(text, style="magenta"))
        if self.show_params:
            for pname, p in module._parameters.items():
                if p is not None:
                    node.add(Text(_param_text(pname, p), style="green" if p.requires_grad else "dim"))
        children = [(n, c) for n, c in module._modules.items() if c is not None and not is_internal(n)]
        if not children:
            return
        if self.depth is not None and level >= self.depth:
            node.add(Text(f"… {len(children)} children", style="dim"))
            return
        for run in self.runs(path, children):
            cname, child = run[0]
            self.add(node, cname, child, _join(path, cname), level + 1, len(run), run[-1][0])

    def runs(self, path: str, children: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
        """The children in runs: each run of identical numbered siblings is one (folded) run."""
        out: list[list[tuple[str, nn.Module]]] = []
        for cname, child in children:
            last = out[-1][-1] if out else None
            if (
                last is not None
                and cname.isdigit()
                and last[0].isdigit()
                and self.signature(_join(path, cname), child) == self.signature(_join(path, last[0]), last[1])
            ):
                out[-1].append((cname, child))
            else:
                out.append([(cname, child)])
        return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def visualize(
    model: nn.Module,
    depth: int | None = None,
    show_params: bool = True,
    show: bool = True,
    console: Console | None = None,
    show_roles: bool = False,
) -> Group:
    """Render the model's module tree with its deltas and parameter totals.

    depth limits how deep the tree expands; show_params=False hides parameter lines;
    show_roles marks the layers hd.roles(model) found (⟨attn.q⟩, ⟨ffn.out⟩, ...);
    show=False only returns the renderable (for notebooks or your own Console).
    """
    model = host(model)
    builder = _Builder(model, depth, show_params, show_roles)
    root = Tree(builder.label(type(model).__name__, model, ""), guide_style="dim")
    builder.fill(root, model, "", 0)
    group = Group(root, Text(_totals(model)))
    if show:
        (console or Console()).print(group)
    return group


def _totals(model: nn.Module) -> str:
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    lines = [f"all params: {total:,} || trainable: {trainable:,} ({100.0 * trainable / max(total, 1):.4f}%)"]
    store = store_of(model)
    if store is not None:
        for name, delta in store.deltas.items():
            n = sum(p.numel() for p in delta.parameters())
            lines.append(f"  delta {name!r} ({delta.method}): {n:,} params on {len(delta.pieces)} sites")
    return "\n".join(lines)
