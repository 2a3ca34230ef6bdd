"""Choose the layers to adapt by clicking them: `hd.pick(model)` and `hookdelta pick MODEL`.

A local page (the standard library's http.server on 127.0.0.1, a free port) shows the module tree
as hd.visualize folds it (`layers.0-29 ×30`), with the roles hd.roles found. Clicking a module, a
folded block or a role toggles the sites under it that the chosen method can adapt. The page
shows, as the selection changes, the selector hookdelta would use (roles and globs before lists
of paths; each one checked to select exactly the clicked sites), the number of sites and the
trainable parameters of the method at the chosen rank. "Done" (or Ctrl-C) ends it and returns
the config.

`Picker` holds the selection and does the arithmetic (no HTTP); `serve` puts a page in front of
it; `pick` opens the page and waits. Loaded on use: `import hookdelta` does not import this module.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import sys
import threading
import webbrowser
from collections.abc import Iterator
from dataclasses import MISSING, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.nn as nn

from .config import DeltaConfig, exact
from .errors import ConfigError, HookdeltaError
from .modules import block_index
from .roles import roles
from .selection import _hits, output_head_paths
from .store import check_model
from .untrusted import Plan
from .visualize import _Builder, _join

# methods offered in the page: those that adapt layers in place ("dora" is LoRA with use_dora)
SKIP = {
    "adapter",
    "average",
    "bitfit",
    "direft",
    "fuse",
    "llama_adapter",
    "loreft",
    "p_tuning",
    "prefix",
    "soft_prompt",
    "split",
    "trainable_tokens",
}


def methods() -> list[str]:
    """The method names the picker offers."""
    names = [m for m, cls in DeltaConfig.registered().items() if m not in SKIP and cls.default_targets]
    return sorted(names + ["dora"], key=lambda m: (m not in ("lora", "dora"), m))


def config_class(method: str) -> tuple[type[DeltaConfig], dict[str, Any]]:
    registry = DeltaConfig.registered()
    if method == "dora":
        return registry["lora"], {"use_dora": True}
    if method not in registry or method in SKIP or not registry[method].default_targets:
        raise ConfigError(f"the picker offers {methods()}, not {method!r}")
    return registry[method], {}


class Picker:
    """The selection on one model for one method and rank, and what follows from it."""

    def __init__(self, model: nn.Module, method: str = "lora", r: int = 8) -> None:
        self.model = check_model(model)  # (a clear refusal for what is not a model)
        self.names = [n for n, _ in self.model.named_modules()]
        self.roles = roles(self.model)
        self.heads = output_head_paths(self.model)
        self.total = sum(p.numel() for p in self.model.parameters())
        self.rows: dict[str, list[str]] = {}  # a row's data-path -> the real paths it stands for
        self.role_names = {role: set(paths) for role, paths in self.roles.items()}
        self.candidates = self._candidates()
        self.order = {p: i for i, p in enumerate(self.candidates)}
        self.params = [n for n, _ in self.model.named_parameters() if not n.startswith("_hookdelta")]
        self.below: dict[str, list[str]] = {"": list(self.candidates)}  # a path -> the candidates at or under it
        for c in self.candidates:
            parts = c.split(".")
            for i in range(1, len(parts) + 1):
                self.below.setdefault(".".join(parts[:i]), []).append(c)
        self.unders: dict[str, list[str]] = {}
        self.selected: set[str] = set()
        self.cache: dict[Any, Any] = {}
        self.error: str | None = None
        self.set_method(method, r)

    # -- what can be picked ---------------------------------------------------------------

    def _candidates(self) -> list[str]:
        """Paths a method may adapt, in model order: modules holding parameters of their own, and
        parameters that a role names or that stack experts (3-D and more)."""
        named = set(p for paths in self.roles.values() for p in paths)
        out = []
        for path, module in self.model.named_modules():
            if not path or path.startswith("_hookdelta"):
                continue
            own = [(n, p) for n, p in module.named_parameters(recurse=False)]
            if own:
                out.append(path)
            out += [f"{path}.{n}" for n, p in own if f"{path}.{n}" in named or p.dim() >= 3]
        return out

    def under(self, row: str) -> list[str]:
        """The candidate paths under a row (a module, a folded block, a role, a parameter)."""
        if row not in self.unders:
            if row.startswith("role:") and row[5:] in self.role_names:
                # a role's paths: the layers it names, or what lies in the blocks it names ("ffn")
                bases = self.roles[row[5:]]
            elif row in self.rows:
                bases = self.rows[row]
            else:
                raise ConfigError(f"the picker has no row {row!r}")
            found = {c for b in bases for c in self.below.get(b, [])}
            self.unders[row] = sorted(found, key=self.order.__getitem__)
        return self.unders[row]

    def adaptable(self, path: str) -> str | None:
        """None if the method adapts `path` alone, else why not."""
        module_path, _, leaf = path.rpartition(".")
        try:
            module = self.model.get_submodule(path)
            shape: Any = (
                type(module).__qualname__,
                tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)),
            )
        except AttributeError:  # a parameter
            shape = (
                type(self.model.get_submodule(module_path)).__qualname__,
                leaf,
                tuple(self.model.get_parameter(path).shape),
            )
        key = (
            "adaptable",
            self.method,
            self.r,
            shape,
            path in self.heads,
            tuple(sorted(r for r, ps in self.role_names.items() if path in ps)),
        )
        if key not in self.cache:
            self.cache[key] = self.why(path)
        return self.cache[key]

    def why(self, path: str) -> str | None:
        """Why the method does not adapt `path` alone (None: it does)."""
        try:
            self._count(self.config([path]))
        except Exception as exc:  # noqa: BLE001 (a method that fails on a layer cannot take it: say why)
            return str(exc) if isinstance(exc, HookdeltaError) else f"{type(exc).__name__}: {exc}"
        return None

    def sites_of(self, row: str) -> list[str]:
        return [c for c in self.under(row) if self.adaptable(c) is None]

    # -- changing the selection --------------------------------------------------------------

    def set_method(self, method: str, r: int) -> None:
        cls, _ = config_class(method)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"the rank must be a whole number >= 1, got {r!r}")
        self.method, self.r, self.cls = method, r, cls

    def toggle(self, row: str) -> None:
        """Select every site under `row` the method adapts, or unselect them if all are selected."""
        sites = self.sites_of(row)
        self.error = None
        if not sites:
            under = self.under(row)
            # (asked again, not from the cache: the message names this row's layer)
            self.error = f"{self.method} adapts nothing under {row!r}" + (
                f": {self.why(under[0])}" if under else " (it holds no parameters)"
            )
            return
        if set(sites) <= self.selected:
            self.selected -= set(sites)
        else:
            self.selected |= set(sites)

    def clear(self) -> None:
        self.selected.clear()
        self.error = None

    # -- what the selection means ------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        cls, extra = config_class(self.method)
        names = {f.name for f in fields(cls)}
        return {**({"r": self.r} if "r" in names else {}), **extra}

    def config(self, sites: list[str] | None = None) -> DeltaConfig:
        """The config that selects exactly `sites` (default: the selection), by the shortest
        selector that does: roles, then globs over the block index, then the paths themselves."""
        wanted = sorted(self.selected if sites is None else set(sites), key=lambda p: self.order.get(p, -1))
        if not wanted:
            raise ConfigError("nothing is selected: click a module, a folded block or a role")
        key = ("config", self.method, self.r, tuple(wanted))
        if key not in self.cache:
            self.cache[key] = self._find(wanted)
        return self.cache[key]

    def _find(self, wanted: list[str]) -> DeltaConfig:
        tried, exact_ones = [], []
        for selectors in self._proposals(wanted):
            try:
                cfg = self.cls(**self._kwargs(), **selectors)
                got = cfg.select(self.model)
            except HookdeltaError as exc:
                tried.append(str(exc))
                continue
            if set(got) == set(wanted):
                exact_ones.append(cfg)
        if exact_ones:  # the fewest selectors; among equals the first proposed (roles before names)
            return min(exact_ones, key=_items)
        raise ConfigError(
            f"no {self.cls.__name__} selects exactly {wanted[:3]}{'...' if len(wanted) > 3 else ''}: "
            + (tried[-1] if tried else "it cannot express them")
        )

    def _proposals(self, wanted: list[str]) -> Iterator[dict[str, Any]]:
        want = set(wanted)
        modules = [p for p in wanted if p in self.names]
        blocks = {block_index(p) for p in wanted}
        linear = [n for n in self.names if n and _hits("all-linear", n, self.model.get_submodule(n), self.heads)]
        if len(modules) == len(wanted) and set(modules) == set(linear):
            yield {"targets": "all-linear"}
        every = {block_index(p) for ps in self.roles.values() for p in ps} - {None}
        limits = [sorted(blocks), None] if None not in blocks else [None]  # type: ignore[type-var]  # (no None here)
        for limit in limits:  # roles, within the selected blocks (layers=...) or everywhere
            sets = {r: {p for p in ps if limit is None or block_index(p) in limit} for r, ps in self.roles.items()}
            lay = {"layers": limit} if limit is not None and set(limit) != every else {}
            inside = _prune([r for r, ps in sets.items() if ps and ps <= want], sets)
            # roles mostly selected: the role, less the few left out (exclude=...)
            near = [r for r, ps in sets.items() if ps and not ps <= want and 2 * len(ps & want) > len(ps)]
            for use in [inside] + ([_prune([r for r in sets if r in inside or r in near], sets)] if near else []):
                if use:
                    covered = set().union(*(sets[r] for r in use))
                    extra = sorted(covered - want, key=self._rank)
                    yield from self._express(use, [p for p in wanted if p not in covered], extra, want, lay)
        yield from self._express([], wanted, [], want, {})

    def _rank(self, path: str) -> int:
        return self.order.get(path, -1)

    def _express(
        self, roles_used: list[str], rest: list[str], extra: list[str], want: set[str], lay: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        """Roles, plus the remaining paths and the excluded ones: as globs over the block index
        (the shortest suffix that selects nothing else), then as the paths themselves.
        Parameters go through target_parameters, where the method has it."""
        mods = [p for p in rest if p in self.names]
        params = [p for p in rest if p not in self.names]
        if params and "target_parameters" not in {f.name for f in fields(self.cls)}:
            return
        for short in (True, False):
            m = self._globs(mods, want, self.names) if short else mods
            p = self._globs(params, want, self.params) if short else [exact(x) for x in params]
            x = self._globs(extra, set(extra), self.names + self.params) if short else [exact(x) for x in extra]
            out: dict[str, Any] = {}
            if roles_used or m:
                out["targets"] = roles_used + m
            if p:
                out["target_parameters"] = p
            if x:
                out["exclude"] = x
            yield {**out, **lay}

    def _globs(self, paths: list[str], want: set[str], names: list[str]) -> list[str]:
        out: list[str] = []
        for path in paths:
            if any(_hits(g, path, None, self.heads) for g in out):
                continue
            parts = path.split(".")
            starred = [("*" if part.isdigit() else part) for part in parts]
            choice = path
            for cut in range(len(parts) - 1, -1, -1):  # the shortest suffix first
                for form in (starred[cut:], parts[cut:]):
                    if form[0] == "*" or form[0].isdigit():  # ("3.mlp" reads as if it were "13.mlp" too)
                        continue
                    glob = ".".join(form)
                    if all(n in want for n in names if _hits(glob, n, None, self.heads)):
                        choice = glob
                        break
                else:
                    continue
                break
            out.append(choice)
        return out

    def _count(self, cfg: DeltaConfig) -> int:
        """The trainable parameters `cfg` would add, from the delta built on a meta copy of the
        model (untrusted.Plan: nothing allocated, nothing attached; the random state is put back,
        so picking changes nothing in the model or the seed)."""
        key = ("count", cfg.to_json())
        if key not in self.cache:
            with torch.random.fork_rng(devices=[]):
                self.cache[key] = Plan(self.model, cfg, cfg.select(self.model), []).trainable
        return self.cache[key]

    def state(self) -> dict[str, Any]:
        """What the page shows."""
        out: dict[str, Any] = {
            "method": self.method,
            "r": self.r,
            "sites": len(self.selected),
            "error": self.error,
            "selector": "",
            "trainable": 0,
            "share": "",
            "python": "",
            "json": "",
        }
        if self.selected:
            try:
                cfg = self.config()
                n = self._count(cfg)
                out.update(
                    selector=selector_text(cfg),
                    trainable=n,
                    share=f"{100.0 * n / (self.total + n):.4f}%",
                    python=python_text(cfg),
                    json=cfg.to_json(),
                )
            except HookdeltaError as exc:
                out["error"] = str(exc)
        full, part = [], []
        for row in list(self.rows) + [f"role:{r}" for r in self.roles]:
            sites = set(self.sites_of(row))
            if sites and sites <= self.selected:
                full.append(row)
            elif sites & self.selected:
                part.append(row)
        out.update(selected=full, partial=part)
        return out

    # -- the page ----------------------------------------------------------------------------

    def page(self) -> str:
        builder = _Builder(self.model, None, False, show_roles=False)
        lines: list[str] = []
        self._render(builder, lines, self.model, "", type(self.model).__name__, 1, "", 0)
        chips = "".join(
            f'<button class="role" data-path="role:{html.escape(r)}">{html.escape(r)} '
            f"<small>×{len(ps)}</small></button>"
            for r, ps in self.roles.items()
        )
        options = "".join(f"<option{' selected' if m == self.method else ''}>{m}</option>" for m in methods())
        return (
            PAGE.replace("{{title}}", html.escape(type(self.model).__name__))
            .replace("{{roles}}", chips)
            .replace("{{rows}}", "\n".join(lines))
            .replace("{{methods}}", options)
            .replace("{{r}}", str(self.r))
            .replace("{{total}}", f"{self.total:,}")
        )

    def _render(
        self,
        builder: _Builder,
        lines: list[str],
        module: nn.Module,
        row: str,
        name: str,
        count: int,
        last: str,
        depth: int,
        bases: list[str] | None = None,
    ) -> None:
        bases = bases if bases is not None else [row]
        self.rows[row or "<model>"] = bases
        label = name if count == 1 else f"{name}-{last} ×{count}"
        n = sum(p.numel() for p in module.parameters()) * count
        marks = sorted({r for r, ps in self.roles.items() for b in bases if b in ps})
        fold = count > 1
        lines.append(
            f'<div class="row{" fold" if fold else ""}" data-path="{html.escape(row or "<model>")}" style="--d:{depth}">'
            + (f'<span class="unfold" title="show each of the {count}">▸</span>' if fold else "")
            + (f'<span class="name">{html.escape(label)}</span> ' if row else "")
            + f'<span class="cls">{type(module).__name__}</span>'
            + (f' <span class="n">{n:,}</span>' if n else "")
            + "".join(f' <span class="tag">{html.escape(r)}</span>' for r in marks)
            + "</div>"
        )
        for pname, p in module.named_parameters(recurse=False):
            paths = [f"{b}.{pname}" for b in bases]
            if paths[0] in self.order and paths[0] not in bases:
                self.rows[_join(row, pname)] = paths
                tags = sorted({r for r, ps in self.roles.items() for q in paths if q in ps})
                lines.append(
                    f'<div class="row param" data-path="{html.escape(_join(row, pname))}" '
                    f'style="--d:{depth + 1}"><span class="name">{html.escape(pname)}</span> '
                    f'<span class="cls">{list(p.shape)}</span>'
                    + "".join(f' <span class="tag">{html.escape(t)}</span>' for t in tags)
                    + "</div>"
                )
        children = [(c, m) for c, m in module._modules.items() if m is not None and not c.startswith("_hookdelta")]
        if fold:
            lines.append(f'<div class="folded" data-fold="{html.escape(row)}">')
        for run in builder.runs(bases[0], children):
            cname, child = run[0]
            names = [c for c, _ in run]
            shown_name = cname if len(run) == 1 else f"{cname}-{names[-1]}"
            sub = [_join(b, c) for b in bases for c in names]
            self._render(builder, lines, child, _join(row, shown_name), cname, len(run), names[-1], depth + 1, sub)
        if fold:
            lines.append("</div>")
            if len(bases) == count:  # each member on its own, hidden until unfolded
                lines.append(f'<div class="members" data-members="{html.escape(row)}" hidden>')
                for member in bases:
                    self._render(
                        builder,
                        lines,
                        self.model.get_submodule(member),
                        member,
                        member.rpartition(".")[2],
                        1,
                        "",
                        depth,
                    )
                lines.append("</div>")


def _prune(use: list[str], sets: dict[str, set[str]]) -> list[str]:
    """Drop the roles the others already cover (GPT-2's attn.k and attn.v are attn.q's c_attn)."""
    keep = list(use)
    for role in reversed(use):
        others = set().union(*(sets[o] for o in keep if o != role))
        if sets[role] <= others:
            keep.remove(role)
    return keep


def _items(cfg: DeltaConfig) -> int:
    """How many selectors a config names (a layers= list counts as one)."""
    count = 0
    for name in ("targets", "target_parameters", "exclude"):
        value = getattr(cfg, name, None)
        count += 0 if value is None else 1 if isinstance(value, str) else len(value)
    return count + (cfg.layers is not None)


def selector_text(cfg: DeltaConfig) -> str:
    """The selector part of a config, as Python keyword arguments."""
    names = ("targets", "target_parameters", "exclude", "layers")
    return ", ".join(f"{n}={_plain(getattr(cfg, n))!r}" for n in names if getattr(cfg, n, None) is not None)


def python_text(cfg: DeltaConfig) -> str:
    """The config as one line of Python (`hd.LoRAConfig(r=8, targets=[...])`)."""
    args = [
        f"{f.name}={_plain(getattr(cfg, f.name))!r}"
        for f in fields(cfg)
        if f.default is MISSING or getattr(cfg, f.name) != f.default or f.name == "r"
    ]
    return f"hd.{type(cfg).__name__}({', '.join(args)})"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet: the terminal shows the URL and the result
        pass

    def _send(self, body: str, kind: str = "application/json", status: int = 200) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _ours(self) -> bool:
        """Only requests addressed to this server's own host name (a page elsewhere that rebinds
        its DNS name to 127.0.0.1 gets a refusal)."""
        if self.headers.get("Host") in self.server.hosts:
            return True
        self._send('{"error": "wrong host"}', status=403)
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._ours():
            return
        with self.server.lock:
            if self.path == "/":
                self._send(self.server.page, "text/html")
            elif self.path == "/state":
                self._send(json.dumps(self.server.picker.state()))
            else:
                self._send('{"error": "not found"}', status=404)

    def do_POST(self) -> None:  # noqa: N802
        if not self._ours():
            return
        if self.path != "/act":
            self._send('{"error": "not found"}', status=404)
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if not isinstance(body, dict):
                raise ValueError(body)
        except (ValueError, TypeError):
            self._send('{"error": "the request is not a JSON object"}', status=400)
            return
        with self.server.lock:
            picker = self.server.picker
            op = body.get("op")
            try:
                if op == "toggle":
                    picker.toggle(str(body.get("path")))
                elif op == "method":
                    picker.set_method(str(body.get("method")), int(body.get("r", picker.r)))
                    picker.error = None
                elif op == "clear":
                    picker.clear()
                elif op == "done":
                    self.server.result = picker.config() if picker.selected else None
                    self.server.done.set()
                else:
                    picker.error = f"unknown action {op!r}"
            except (HookdeltaError, ValueError, TypeError) as exc:
                picker.error = str(exc)
            state = picker.state()
            state["finished"] = self.server.done.is_set()
            self._send(json.dumps(state))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, picker: Picker, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.picker = picker
        self.page = picker.page()
        port = self.server_address[1]
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.result: DeltaConfig | None = None


class Session:
    """A running picker page: `url`, `wait()` for Done, `close()`. A context manager."""

    def __init__(self, model: nn.Module, method: str = "lora", r: int = 8, port: int = 0) -> None:
        self.picker = Picker(model, method, r)
        self.server = _Server(self.picker, port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> DeltaConfig | None:
        """Block until Done is clicked (the config), or Ctrl-C (the config of the selection so far)."""
        try:
            while not self.server.done.wait(0.2 if timeout is None else timeout):
                if timeout is not None:
                    raise TimeoutError(f"the picker at {self.url} was not finished within {timeout} s")
        except KeyboardInterrupt:
            with self.server.lock:
                return self.picker.config() if self.picker.selected else None
        return self.server.result

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(model: nn.Module, method: str = "lora", r: int = 8, port: int = 0) -> Session:
    """Start the picker page for `model` without waiting (tests and notebooks)."""
    return Session(model, method, r, port)


def pick(
    model: nn.Module,
    method: str = "lora",
    r: int = 8,
    *,
    port: int = 0,
    open_browser: bool = True,
    timeout: float | None = None,
) -> DeltaConfig | None:
    """Pick the layers to adapt in a browser page; returns the config (None if nothing was picked).

    The page is served on 127.0.0.1 (a free port unless `port`), opened in the browser when one is
    available; its URL is printed either way. Ends with the page's Done button or Ctrl-C."""
    with serve(model, method, r, port) as session:
        print(f"hookdelta pick: choose the layers at {session.url} (Done or Ctrl-C ends)", flush=True)
        if open_browser and _has_screen():
            with contextlib.suppress(webbrowser.Error):
                webbrowser.open(session.url)
        return session.wait(timeout)


def _has_screen() -> bool:
    """Whether a graphical browser can open here; without a screen Python's webbrowser would
    start a text browser (lynx, w3m) in this very terminal."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>hookdelta pick: {{title}}</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#tree{flex:1;overflow:auto;padding:12px 16px;font-family:ui-monospace,monospace;font-size:13px}
#side{width:440px;border-left:1px solid #ddd;padding:12px 16px;overflow:auto;background:#fafafa}
.row{padding:1px 6px 1px calc(var(--d)*18px + 6px);cursor:pointer;border-radius:3px;white-space:nowrap}
.row:hover{background:#eef3ff}.row.sel{background:#cfe0ff}.row.part{background:#e9f0ff}
.row.param .name{font-style:italic}.cls{color:#07a}.n{color:#888}
.tag{background:#f3e3ff;color:#708;border-radius:3px;padding:0 4px;font-size:11px}
.unfold{display:inline-block;width:14px;color:#555}.fold .name{font-weight:bold}
.role{margin:2px;border:1px solid #bbb;background:#fff;border-radius:12px;padding:2px 9px;cursor:pointer}
.role.sel{background:#cfe0ff;border-color:#58f}.role.part{background:#e9f0ff}
code,pre{background:#fff;border:1px solid #e3e3e3;border-radius:4px;padding:6px;display:block;white-space:pre-wrap;
word-break:break-all;font-size:12px}
#error{color:#b00;white-space:pre-wrap}#done{font-size:15px;padding:6px 18px;margin-top:8px}
.num{font-size:20px;font-weight:600}
</style></head><body>
<div id="tree">{{rows}}</div>
<div id="side">
<h3 style="margin-top:0">hookdelta pick: {{title}}</h3>
<div>method <select id="method">{{methods}}</select> rank <input id="rank" type="number" min="1" value="{{r}}"
 style="width:4em"> <button id="clear">clear</button></div>
<p>roles:<br>{{roles}}</p>
<p>sites <span id="sites" class="num">0</span> &nbsp; trainable <span id="trainable" class="num">0</span>
 <span id="share"></span><br><small>of {{total}} parameters in the model</small></p>
<p>selector</p><code id="selector"></code>
<p>config</p><pre id="python"></pre>
<div id="error"></div>
<button id="done">Done</button> <span id="finished"></span>
</div>
<script>
let busy = Promise.resolve();
function show(s) {
  for (const el of document.querySelectorAll('[data-path]')) {
    el.classList.toggle('sel', s.selected.includes(el.dataset.path));
    el.classList.toggle('part', s.partial.includes(el.dataset.path));
  }
  document.getElementById('sites').textContent = s.sites;
  document.getElementById('trainable').textContent = s.trainable.toLocaleString('en-US');
  document.getElementById('share').textContent = s.share ? '(' + s.share + ')' : '';
  document.getElementById('selector').textContent = s.selector;
  document.getElementById('python').textContent = s.python;
  document.getElementById('error').textContent = s.error || '';
  document.getElementById('method').value = s.method;
  document.getElementById('rank').value = s.r;
  if (s.finished) document.getElementById('finished').textContent = 'done: the config went to your terminal';
  document.body.dataset.ready = '1';
}
function act(body) {
  document.body.dataset.ready = '0';
  busy = busy.then(() => fetch('/act', {method: 'POST', body: JSON.stringify(body)}))
    .then(r => r.json()).then(show)
    .catch(e => { document.getElementById('error').textContent = 'the picker stopped answering: ' + e;
                  document.body.dataset.ready = '1'; });
  return busy;
}
document.addEventListener('click', e => {
  const unfold = e.target.closest('.unfold');
  if (unfold) {
    const row = unfold.parentElement.dataset.path;
    const folded = document.querySelector(`[data-fold="${CSS.escape(row)}"]`);
    const members = document.querySelector(`[data-members="${CSS.escape(row)}"]`);
    if (members) { members.hidden = !members.hidden; folded.hidden = !members.hidden;
                   unfold.textContent = members.hidden ? '▸' : '▾'; }
    return;
  }
  const row = e.target.closest('[data-path]');
  if (row) act({op: 'toggle', path: row.dataset.path});
});
const change = () => act({op: 'method', method: document.getElementById('method').value,
                          r: parseInt(document.getElementById('rank').value || '0', 10)});
document.getElementById('method').addEventListener('change', change);
document.getElementById('rank').addEventListener('change', change);
document.getElementById('clear').addEventListener('click', () => act({op: 'clear'}));
document.getElementById('done').addEventListener('click', () => act({op: 'done'}));
fetch('/state').then(r => r.json()).then(show);
</script></body></html>
"""
