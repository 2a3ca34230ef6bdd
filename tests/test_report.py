"""hd.report (issue 29, the report half): its numbers against a hand computation on a tiny model,
the page it writes, and the CLI. (The picker and the headless-browser checks are still to come.)"""

from __future__ import annotations

import html.parser
import math
import sys

import pytest
import torch
from helpers import perturb
from tiny_models import build

import hookdelta as hd


class Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.sites = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.sites += [v for k, v in attrs if k == "data-site"]


def test_the_numbers_are_the_hand_computed_ones():
    from hookdelta.reporting import rows

    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=3, alpha=6, targets=["q_proj", "v_proj"]))
    perturb(delta, std=0.3)
    got = {r.key: r for r in rows(delta)}
    assert set(got) == set(delta.sites)
    for piece in delta.pieces.values():
        dw = piece.scale * piece.lora_B.detach() @ piece.lora_A.detach()
        w = model.get_submodule(piece.key).weight.detach()
        r = got[piece.key]
        assert r.relative == pytest.approx(float(dw.norm() / w.norm()), rel=1e-5)
        s = torch.linalg.svdvals(dw.double())
        p = s / s.sum()
        p = p[p > 1e-12]
        assert r.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)
        assert r.effective_rank <= 3 + 1e-6  # a rank-3 update
        assert r.role == ("attn.q" if piece.key.endswith("q_proj") else "attn.v")
        assert r.layer == int(piece.key.split(".")[2])


def test_methods_without_a_weight_change_report_their_tensor_norms():
    from hookdelta.reporting import rows

    model, _, _ = build("llama")
    delta = hd.attach(model, hd.AdapterConfig(bottleneck_dim=4))
    perturb(delta, std=0.2)
    for r, piece in zip(rows(delta), delta.pieces.values(), strict=True):
        want = math.sqrt(sum(float(t.detach().square().sum()) for t in piece.parameters()))
        assert r.relative is None and r.update == pytest.approx(want, rel=1e-6)


def test_the_page_is_self_contained_and_lists_every_site(tmp_path):
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="all-linear"))
    perturb(delta, std=0.3)
    path = hd.report(delta, tmp_path / "r.html")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    page = Collect()
    page.feed(text)
    assert "svg" in page.tags and "rect" in page.tags
    assert sorted(page.sites) == sorted(delta.sites)
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_import_hookdelta_does_not_load_the_report():
    import subprocess

    code = "import sys, hookdelta; print('hookdelta.reporting' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_cli_writes_the_report(tmp_path):
    from hookdelta.cli import main

    model, _, _ = build("llama")
    model.save_pretrained(tmp_path / "base")
    delta = hd.attach(model, hd.LoRAConfig(r=2))
    perturb(delta, std=0.3)
    delta.save(tmp_path / "delta")
    assert (
        main(["report", str(tmp_path / "delta"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "r.html")]) == 0
    )
    page = Collect()
    page.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert sorted(page.sites) == sorted(delta.sites)
    with pytest.raises(hd.ConfigError):
        hd.report(object())


def test_the_page_opens_in_a_browser_without_errors(tmp_path):
    from browser import browser_page, screenshot

    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=2, targets="all-linear"))
    perturb(delta, std=0.3)
    path = hd.report(delta, tmp_path / "r.html")
    with browser_page() as (page, errors):
        page.goto(f"file://{path}")
        shown = page.eval_on_selector_all("[data-site]", "rows => rows.map(r => r.dataset.site)")
        cells = page.locator("svg rect").count()
        screenshot(page, "report-tiny-llama.png")
    assert errors == []
    assert sorted(shown) == sorted(delta.sites)
    assert cells >= 2 * 6  # a heatmap cell per layer and role: q, k, v, o, ffn.in (gate and up), ffn.out
