"""Run by tests/test_distributed.py under `torch.distributed.run` (2 processes, gloo, CPU): the HF
Trainer through hd.delta_trainer on DeepSpeed ZeRO-3 (every parameter partitioned). argv[3] is
"deepspeed", or "control": the same Trainer and DeepSpeed config without hookdelta, one weight
matrix per layer trainable, to tell a release combination that cannot train this way at all. Checkpoints and save_model() must hold the whole
delta, gathered from the shards (not the (0,)-shaped tensors a plain state-dict read gives under
ZeRO-3), and a new run resumed from the checkpoint must end with the same delta. Rank 0 writes the
verdict to argv[1]; argv[2] is the output folder."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import report  # noqa: E402
from tiny_models import build  # noqa: E402

import hookdelta as hd  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(3, 96, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def trainer(folder: str, engine: str):
    model, _, _ = build("llama")
    model.config.use_cache = False
    if engine == "control":  # no hookdelta: only the q_proj weights train (one parameter group, as a LoRA's)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("q_proj.weight"))
        delta = None
    else:
        delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    if engine not in ("deepspeed", "control"):
        raise SystemExit(f"unknown engine {engine!r}")
    kw = {
        "deepspeed": {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
    }
    args = tf.TrainingArguments(
        output_dir=folder,
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        learning_rate=1e-2,
        use_cpu=True,
        seed=0,
        **kw,
    )
    cls = tf.Trainer if delta is None else hd.delta_trainer(tf.Trainer)
    return model, delta, cls(model=model, args=args, train_dataset=Tokens())


def sharded(run, model) -> bool:
    """ZeRO-3: every parameter is an empty partition outside a forward."""
    return run.is_deepspeed_enabled and all(p.numel() == 0 for p in model.parameters())


def main() -> None:
    out, folder, engine = sys.argv[1:4]
    model, delta, run = trainer(folder, engine)
    run.train()
    if delta is None:  # the control ran: the engine trains here without hookdelta
        report({"control": "trained"}, out)
        return
    run.save_model(os.path.join(folder, "final"))
    final = delta.tensors()  # gathered, every rank
    _, again, resumed = trainer(os.path.join(folder, "again"), engine)
    resumed.train(resume_from_checkpoint=os.path.join(folder, "checkpoint-2"))
    resumed_values = again.tensors()
    verdict = {}
    if run.args.process_index == 0:
        verdict = {"sharded": sharded(run, model), "files": {}}
        for name in ("checkpoint-2/hookdelta/lora/delta.safetensors", "final/hookdelta/lora/delta.safetensors"):
            saved = load_file(os.path.join(folder, name))
            verdict["files"][name] = set(saved) == set(final) and all(torch.equal(saved[k], final[k]) for k in final)
        for name in ("checkpoint-2/model.safetensors", "final/model.safetensors"):
            saved = load_file(os.path.join(folder, name))
            verdict["files"][name] = sorted(v.numel() for v in saved.values()) == sorted(
                v.numel() for v in final.values()
            )
        verdict["resumed_equal"] = all(torch.equal(resumed_values[k], final[k]) for k in final)
    report(verdict, out)


if __name__ == "__main__":
    main()
