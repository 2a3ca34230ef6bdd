"""hd.pick / hookdelta pick (issue 29): the picker's selection, the selector it proposes and the
trainable count it shows, against hand-listed paths, hd.match and a real attach of the config
it returns; the page in headless Chromium; the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
import transformers as tf
from browser import browser_page, screenshot
from helpers import assert_restored, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build

import hookdelta as hd

FUSED = int(tf.__version__.split(".")[0]) >= 5
Q = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
V = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def attach_count(arch: str, cfg: hd.DeltaConfig) -> tuple[list[str], int]:
    """The sites and trainable parameters of a real attach of `cfg` on a fresh model."""
    model, _, _ = build(arch)
    delta = hd.attach(model, cfg)
    return list(delta.sites), sum(p.numel() for p in model.parameters() if p.requires_grad)


def picker(arch: str = "llama", method: str = "lora", r: int = 8):
    from hookdelta.picker import Picker

    model, _, _ = build(arch)
    p = Picker(model, method, r)
    p.page()  # (the rows exist once the page is drawn)
    return model, p


# -- what a click selects, and the selector that says it ----------------------------------------

CLICKS = [  # (arch, rows clicked, the sites by hand, the selector expected)
    ("llama", ["model.layers.0-1.self_attn.q_proj"], Q, "targets=['attn.q']"),
    (
        "llama",
        ["model.layers.0-1.self_attn.q_proj", "model.layers.0-1.self_attn.v_proj"],
        Q + V,
        "targets=['attn.q', 'attn.v']",
    ),
    ("llama", ["role:attn.q", "role:attn.v"], Q + V, "targets=['attn.q', 'attn.v']"),
    ("llama", ["model.layers.1.self_attn.q_proj"], Q[1:], "targets=['layers.1.self_attn.q_proj']"),
    (
        "llama",
        ["model.layers.0-1.mlp.gate_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"],
        "targets=['gate_proj']",
    ),
    ("llama", ["model.layers.0-1"], None, "targets='all-linear'"),
    (
        "llama",
        ["role:attn.q", "role:attn.v", "model.layers.1.self_attn.v_proj"],
        Q + V[:1],
        "targets=['attn.q', 'layers.0.self_attn.v_proj']",
    ),
    ("llama", ["lm_head"], ["lm_head"], "targets=['lm_head']"),
    (
        "gpt2",
        ["transformer.h.0-1.attn.c_attn"],
        ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"],
        "targets=['attn.q']",
    ),  # (GPT-2's fused c_attn is q, k and v: one role names it)
    (
        "bert",
        ["bert.encoder.layer.0-1.attention.self"],
        [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "key", "value")],
        "targets=['attn.q', 'attn.k', 'attn.v']",
    ),
]
if FUSED:  # transformers 5: each layer's experts in two 3-D tensors
    CLICKS += [
        (
            "mixtral",
            ["model.layers.0-1.mlp.experts.gate_up_proj"],
            ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"],
            "targets=['ffn.in']",
        ),
        (
            "mixtral",
            ["model.layers.0-1.mlp.experts"],
            [f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("gate_up_proj", "down_proj")],
            "targets=['ffn.in', 'ffn.out']",
        ),
    ]
else:  # before: a Linear per expert and projection
    CLICKS += [
        (
            "mixtral",
            ["model.layers.0-1.block_sparse_moe.experts"],
            [
                f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}"
                for i in (0, 1)
                for e in range(4)
                for w in ("w1", "w2", "w3")
            ],
            "targets=['ffn.in', 'ffn.out']",
        )
    ]


@pytest.mark.parametrize("arch, clicks, sites, selector", CLICKS, ids=[f"{c[0]}-{'+'.join(c[1])}" for c in CLICKS])
def test_clicks_select_the_sites_and_the_selector_says_exactly_them(arch, clicks, sites, selector):
    model, p = picker(arch)
    for row in clicks:
        p.toggle(row)
        assert p.error is None
    state = p.state()
    cfg = p.config()
    if sites is None:  # every linear layer but the head
        sites = hd.match(model, torch.nn.Linear, exclude="lm_head")
    assert sorted(p.selected) == sorted(sites)
    assert state["selector"] == selector
    assert state["sites"] == len(sites)
    got_sites, trainable = attach_count(arch, cfg)
    assert sorted(got_sites) == sorted(sites)
    assert state["trainable"] == trainable
    if cfg.target_parameters is None if hasattr(cfg, "target_parameters") else True:
        assert sorted(hd.match(model, cfg.targets, cfg.exclude, cfg.layers)) == sorted(sites)


def test_a_second_click_unselects_and_a_row_of_nothing_says_why():
    _, p = picker()
    p.toggle("model.layers.0-1.self_attn.q_proj")
    p.toggle("model.layers.0-1.self_attn.q_proj")
    assert p.selected == set() and p.state()["selector"] == ""
    p.toggle("model.layers.0-1.post_attention_layernorm")
    assert p.selected == set()
    assert "post_attention_layernorm" in p.error and "LlamaRMSNorm" in p.error
    with pytest.raises(hd.ConfigError, match="no row"):
        p.toggle("model.layers.7")
    with pytest.raises(hd.ConfigError, match="nothing is selected"):
        p.config()


def test_the_method_decides_what_a_row_adapts():
    _, p = picker()
    p.toggle("role:norm")  # LoRA adapts no norm
    assert p.selected == set() and "LlamaRMSNorm" in p.error
    p.set_method("ln_tuning", 8)
    p.toggle("role:norm")
    assert sorted(p.selected) == sorted(
        [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")]
        + ["model.norm"]
    )
    cfg = p.config()
    assert isinstance(cfg, hd.LNTuningConfig) and p.state()["selector"] == "targets=['norm']"
    assert p.state()["trainable"] == attach_count("llama", cfg)[1] == 5 * 32
    p.set_method("dora", 4)
    state = p.state()  # norms are not DoRA's: the page says so instead of a count
    assert state["error"] and "LlamaRMSNorm" in state["error"] and state["trainable"] == 0


def test_picking_leaves_the_model_and_the_random_state_as_they_were():
    model, _, _ = build("llama")
    before, rng = snapshot(model), torch.random.get_rng_state()
    from hookdelta.picker import Picker

    p = Picker(model, "vera", 4)
    p.page()
    p.toggle("model.layers.0-1.self_attn")
    assert p.state()["trainable"] > 0
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_restored(model, before)  # no delta, hook, flag or tensor changed


ROWS = {arch: None for arch in ("llama", "gpt2", "mixtral")}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(sorted(ROWS)),
    method=st.sampled_from(["lora", "dora", "loha", "ia3", "vera", "oft"]),
    r=st.sampled_from([1, 2, 4]),
    picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
)
def test_any_clicks_give_a_config_that_attaches_to_exactly_the_selection(arch, method, r, picks):
    model, p = picker(arch, method, r)
    rows = sorted(p.rows) + [f"role:{x}" for x in p.roles]
    want: set[str] = set()
    for i in picks:
        row = rows[i % len(rows)]
        sites = set(p.sites_of(row))
        p.toggle(row)
        if sites:  # the reference: toggling as the issue says it works
            want = want - sites if sites <= want else want | sites
    assert p.selected == want
    state = p.state()
    if not want:
        return
    try:
        cfg = p.config()
    except hd.ConfigError:  # no selector of the method selects exactly these (the page says so)
        assert state["error"] and state["trainable"] == 0
        return
    if state["trainable"] == 0:  # the method refuses this mix as one delta: attaching it is refused too
        with pytest.raises(hd.HookdeltaError):
            attach_count(arch, cfg)
        return
    sites, trainable = attach_count(arch, cfg)
    assert set(sites) == want and state["trainable"] == trainable and state["sites"] == len(want)


# -- the page, in a browser --------------------------------------------------------------------


def settle(page) -> None:
    page.wait_for_selector("body[data-ready='1']")


def test_the_page_in_a_browser_picks_what_is_clicked():
    from hookdelta.picker import serve

    model, _, _ = build("llama")
    with serve(model, "lora", 4) as session, browser_page() as (page, errors):
        page.goto(session.url)
        settle(page)
        page.click("[data-path='model.layers.0-1.self_attn.q_proj'] .name")  # a folded block's row
        settle(page)
        assert page.inner_text("#selector") == "targets=['attn.q']"
        assert int(page.inner_text("#sites")) == len(hd.match(model, "attn.q")) == 2
        page.click("[data-path='model.layers.0-1'] .unfold")  # one layer of the fold on its own
        page.click("[data-path='model.layers.1.self_attn.v_proj'] .name")
        settle(page)
        page.click("[data-path='role:ffn.out']")  # a role
        settle(page)
        assert page.inner_text("#selector") == "targets=['attn.q', 'ffn.out', 'layers.1.self_attn.v_proj']"
        assert "sel" in page.get_attribute("[data-path='model.layers.1.self_attn.v_proj']", "class")
        assert "part" in page.get_attribute("[data-path='model.layers.0-1.self_attn.v_proj']", "class")
        page.select_option("#method", "loha")
        settle(page)
        shown = int(page.inner_text("#trainable").replace(",", ""))
        screenshot(page, "pick-tiny-llama.png")
        page.click("#done")
        cfg = session.wait(10)
    assert isinstance(cfg, hd.LoHaConfig) and cfg.r == 4
    sites, trainable = attach_count("llama", cfg)
    assert sorted(sites) == sorted(Q + V[1:] + ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"])
    assert shown == trainable
    assert errors == []


def test_hookdelta_pick_prints_the_config_as_python_and_json(tmp_path):
    model, _, _ = build("llama")
    model.save_pretrained(tmp_path / "m")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hookdelta", "pick", str(tmp_path / "m"), "--no-browser", "-r", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)

        def act(body):
            req = urllib.request.Request(url + "act", data=json.dumps(body).encode(), method="POST")
            return json.load(urllib.request.urlopen(req, timeout=30))

        assert (
            'data-path="model.layers.0-1.self_attn.v_proj"' in urllib.request.urlopen(url, timeout=30).read().decode()
        )
        assert act({"op": "toggle", "path": "role:attn.v"})["selector"] == "targets=['attn.v']"
        assert act({"op": "done"})["finished"] is True
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    python, data = out.strip().splitlines()[-2:]
    assert python == "config = hd.LoRAConfig(targets=['attn.v'], r=2)"
    cfg = hd.DeltaConfig.from_dict(json.loads(data))
    assert sites_of(cfg) == V
    scope: dict = {"hd": hd}
    exec(python, scope)
    assert scope["config"] == cfg


def test_ctrl_c_ends_hookdelta_pick_with_the_selection_so_far(tmp_path):
    import signal

    model, _, _ = build("llama")
    model.save_pretrained(tmp_path / "m")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hookdelta", "pick", str(tmp_path / "m"), "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline()).group(0)
        req = urllib.request.Request(url + "act", data=b'{"op": "toggle", "path": "role:attn.k"}', method="POST")
        assert json.load(urllib.request.urlopen(req, timeout=30))["sites"] == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "config = hd.LoRAConfig(targets=['attn.k'], r=8)" in out


def sites_of(cfg):
    return attach_count("llama", cfg)[0]


def test_pick_returns_the_config_when_done_is_clicked():
    model, _, _ = build("llama")
    result = {}
    started = threading.Event()

    import hookdelta.picker as picker_module

    real = picker_module.Session

    class Spy(real):  # learn the address pick() serves on
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            result["url"] = self.url
            started.set()

    picker_module.Session = Spy
    try:
        t = threading.Thread(target=lambda: result.update(cfg=hd.pick(model, open_browser=False, timeout=60)))
        t.start()
        assert started.wait(30)
        post = lambda body: urllib.request.urlopen(
            urllib.request.Request(  # noqa: E731
                result["url"] + "act", data=json.dumps(body).encode(), method="POST"
            ),
            timeout=30,
        )
        post({"op": "toggle", "path": "role:attn.q"})
        post({"op": "done"})
        t.join(30)
    finally:
        picker_module.Session = real
    assert result["cfg"] == hd.LoRAConfig(targets=["attn.q"], r=8)


def test_import_hookdelta_does_not_load_the_picker():
    code = "import sys, hookdelta; print('hookdelta.picker' in sys.modules, 'http.server' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_server_refuses_other_hosts_and_bad_requests_and_keeps_answering():
    import http.client
    import urllib.parse

    from hookdelta.picker import serve

    model, _, _ = build("llama")
    with serve(model) as session:
        port = urllib.parse.urlsplit(session.url).port

        def ask(method, path, body=None, host=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request(method, path, body=body, headers={"Host": host or f"127.0.0.1:{port}"})
            r = conn.getresponse()
            return r.status, r.read().decode()

        assert ask("GET", "/", host="evil.example:80")[0] == 403  # a rebound DNS name
        assert ask("POST", "/act", b'{"op": "done"}', host=f"evil.example:{port}")[0] == 403
        assert ask("POST", "/act", b"not json")[0] == 400
        assert ask("POST", "/act", b"[1, 2]")[0] == 400
        status, text = ask("POST", "/act", b'{"op": "method", "method": "prefix", "r": 2}')
        assert status == 200 and "offers" in json.loads(text)["error"]
        status, text = ask("POST", "/act", b'{"op": "method", "method": "lora", "r": 0}')
        assert "rank" in json.loads(text)["error"]
        status, text = ask("POST", "/act", b'{"op": "toggle", "path": "no.such.row"}')
        assert "no row" in json.loads(text)["error"]
        status, text = ask("POST", "/act", b'{"op": "toggle", "path": "role:attn.q"}')
        assert json.loads(text)["selector"] == "targets=['attn.q']"
        assert not session.server.done.is_set()  # none of it ended the session


def test_pick_refuses_what_is_not_a_model():
    from hookdelta.picker import Picker

    with pytest.raises(hd.UnsupportedModuleError, match="torch.nn.Module"):
        Picker("model.safetensors")
