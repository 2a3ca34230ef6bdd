"""The `hookdelta` console script, run as a subprocess: inspect, merge, convert, and one
clear line on stderr (no traceback) for every bad input."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import save_lora
from tiny_models import build

import hookdelta as hd

SCRIPT = shutil.which("hookdelta", path=os.path.dirname(sys.executable)) or shutil.which("hookdelta")


def cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    saved = save_lora(tmp, std=0.2, base=True)
    return tmp, saved.inputs, saved.outputs


def test_console_script_is_installed():
    assert SCRIPT, "pip install -e . registers the hookdelta console script"


def test_inspect_shows_the_delta(saved):
    tmp, _, _ = saved
    run = cli("inspect", tmp / "base", "--delta", tmp / "delta", "--no-params")
    assert run.returncode == 0, run.stderr
    assert "LlamaForCausalLM" in run.stdout and "(lora) r=4" in run.stdout


def test_merge_writes_a_plain_transformers_checkpoint(saved, tmp_path):
    tmp, inputs, adapted = saved
    run = cli("merge", tmp / "base", tmp / "delta", tmp_path / "merged")
    assert run.returncode == 0, run.stderr
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(k.startswith("_hookdelta") for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)


def test_convert_both_ways(saved, tmp_path):
    tmp, inputs, adapted = saved
    assert cli("convert", "--to", "peft", "--base", tmp / "base", tmp / "delta", tmp_path / "peft").returncode == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    back = cli("convert", "--to", "hookdelta", "--base", tmp / "base", tmp_path / "peft", tmp_path / "hd")
    assert back.returncode == 0, back.stderr
    model = build("llama")[0]
    hd.load(model, tmp_path / "hd")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, adapted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (("inspect", "{tmp}/nowhere"), "not a transformers model directory"),
        (("merge", "{tmp}/base", "{tmp}/nowhere", "{out}"), "not a directory"),
        (("merge", "{tmp}/base", "{tmp}/base", "{out}"), "no saved delta"),
        (("inspect", "{tmp}/other", "--delta", "{tmp}/delta"), "does not fit|has no"),
        (
            ("convert", "--to", "hookdelta", "--base", "{tmp}/base", "{tmp}/delta", "{out}"),
            "already in hookdelta format",
        ),
    ],
)
def test_bad_input_gives_one_line_and_no_traceback(saved, tmp_path, args, message):
    tmp, _, _ = saved
    if not (tmp / "other").exists():
        build("bert")[0].save_pretrained(tmp / "other")
    run = cli(*[a.format(tmp=tmp, out=tmp_path / "out") for a in args])
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_merge_copies_the_tokenizer_and_generation_files(saved, tmp_path):
    """A merged folder serves as the original did (vLLM reads the tokenizer beside the weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tmp, _, _ = saved
    base = tmp_path / "base"
    shutil.copytree(tmp / "base", base)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(base)
    (base / "generation_config.json").write_text('{"max_new_tokens": 7, "do_sample": false}')
    run = cli("merge", base, tmp / "delta", tmp_path / "merged")
    assert run.returncode == 0, run.stderr
    back = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert back("hello world")["input_ids"] == tok("hello world")["input_ids"] == [1, 2]
    assert back.chat_template == tok.chat_template
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(tmp_path / "merged").max_new_tokens == 7
