"""The tree printer: folding, delta marks, totals, options, plain text off a terminal."""

import io

import torch
from rich.console import Console
from tiny_models import build

import hookdelta as hd


def render(model, **kw):
    out = io.StringIO()
    group = hd.visualize(model, console=Console(file=out, width=140), **kw)
    return out.getvalue(), group


def test_folds_repeated_blocks_and_marks_deltas():
    model = build("bert")[0]
    hd.attach(model, hd.LoRAConfig(r=4, targets=["query", "value"], also_train="classifier"), name="ft")
    text, group = render(model)
    assert "0-1 ×2 (BertLayer)" in text
    assert text.count("◆ ft (lora) r=4 scale=2 [enabled]") == 2, "one mark per site in the folded block"
    assert "◆ ft (also_train) trained in full: weight, bias [enabled]" in text
    assert "weight [32, 32] float32" in text
    assert "\x1b[" not in text, "plain text when the output is not a terminal"
    assert hasattr(group, "renderables")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"all params: {total:,} || trainable: {trainable:,}" in text
    assert "delta 'ft' (lora):" in text


def test_different_blocks_do_not_fold_and_state_is_shown():
    model = build("llama")[0]
    d = hd.attach(model, hd.LoRAConfig(r=2, targets="q_proj", layers=[1]))
    text, _ = render(model)
    assert (
        "0 (LlamaDecoderLayer)" in text
        and "1 (LlamaDecoderLayer)" in text
        and "×2" not in text.split("lm_head")[0].split("layers")[1]
    )
    d.merge()
    assert "[merged]" in render(model)[0]
    d.unmerge()
    d.disable()
    assert "[disabled]" in render(model)[0]


def test_depth_and_hiding_parameters():
    model = build("llama")[0]
    shallow, _ = render(model, depth=1)
    assert "… " in shallow and "q_proj" not in shallow
    no_params, _ = render(model, show_params=False)
    assert "float32" not in no_params and "q_proj" in no_params


def test_show_false_prints_nothing(capsys):
    model = build("llama")[0]
    group = hd.visualize(model, show=False)
    assert capsys.readouterr().out == ""
    out = io.StringIO()
    Console(file=out, width=100).print(group)
    assert "LlamaForCausalLM" in out.getvalue()
    assert torch.is_tensor(next(model.parameters()))
