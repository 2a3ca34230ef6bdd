"""The HF Trainer with hd.TrainerCallback: trains only the delta, checkpoints it, resumes it,
and leaves the base weights untouched in save_model()."""

import os

import pytest
import torch
from safetensors.torch import load_file

import hookdelta as hd
from tiny_models import build

transformers = pytest.importorskip("transformers")


class Reviews(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 96, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()  # learnable from the first token

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def make_trainer(model, delta, out, steps=6, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Reviews(), callbacks=[hd.TrainerCallback(delta)])


def lora(model):
    return hd.attach(model, hd.LoRAConfig(r=4, targets=["query", "value"], also_train="classifier"))


def delta_state(delta):
    return {k: v.detach().clone() for k, v in delta.state_dict().items()}


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    model = build("bert")[0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = lora(model)
    trainer = make_trainer(model, delta, tmp_path / "run")
    params = {id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]}
    assert params == {id(p) for p in delta.parameters()}, "the optimizer gets exactly the delta's tensors"
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    final = delta_state(delta)
    for step in (3, 6):
        assert os.path.isfile(tmp_path / "run" / f"checkpoint-{step}" / "hookdelta" / "lora" / "delta.safetensors")

    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert set(saved) <= set(base) and all(torch.equal(saved[k], base[k]) for k in saved), "base weights untouched"

    # resume from step 3 on a fresh model: the delta comes back and training ends where it did
    fresh = build("bert")[0]
    other = lora(fresh)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # differs from the checkpoint: only the resume can make it equal
    again = make_trainer(fresh, other, tmp_path / "run")
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert result.global_step == again.state.global_step == 6
    for k, v in delta_state(other).items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6)


def test_resume_without_a_saved_delta_says_so(tmp_path):
    model = build("bert")[0]
    delta = lora(model)
    make_trainer(model, delta, tmp_path / "run", steps=3).train()
    import shutil
    shutil.rmtree(tmp_path / "run" / "checkpoint-3" / "hookdelta")
    fresh = build("bert")[0]
    with pytest.raises(hd.DeltaFileError, match="no saved delta"):
        make_trainer(fresh, lora(fresh), tmp_path / "run", steps=6).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
