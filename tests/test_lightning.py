"""Lightning with hd.LightningCallback: the deltas ride in the checkpoints and come back on
resume, bit for bit as an uninterrupted run; a checkpoint without them is refused (before, a
resume continued a fresh delta with the old Adam moments, silently)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

import hookdelta as hd

L = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (test-extra)")


class Module(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, i):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def batches():
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(torch.randint(3, 90, (16, 6), generator=g), batch_size=8)  # 2 steps an epoch


def run(tmp_path, steps, callbacks, resume=None, seed=0):
    torch.manual_seed(seed)
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    module = Module(model)
    every = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[every, *callbacks(delta)],
        deterministic=True,
    )
    trainer.fit(module, batches(), ckpt_path=resume)
    return {k: v.detach().clone() for k, v in delta.state_dict().items()}


def test_resume_from_a_lightning_checkpoint_equals_the_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "a", 4, lambda d: [hd.LightningCallback(d)])
    ckpt = next(p for p in (tmp_path / "a").iterdir() if "step=2" in p.name)
    resumed = run(tmp_path / "b", 4, lambda d: [hd.LightningCallback(d)], resume=str(ckpt), seed=1)
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)


def test_a_checkpoint_without_the_deltas_is_refused_on_resume(tmp_path):
    run(tmp_path / "a", 2, lambda d: [])  # saved without the callback: the optimizer state, not the tensors
    ckpt = next((tmp_path / "a").iterdir())
    with pytest.raises(hd.DeltaFileError, match="holds no tensors of delta"):
        run(tmp_path / "b", 4, lambda d: [hd.LightningCallback(d)], resume=str(ckpt))


def test_the_callback_without_deltas_is_a_config_error():
    with pytest.raises(hd.ConfigError, match="takes the deltas"):
        hd.LightningCallback()
    with pytest.raises(hd.ConfigError, match="takes the deltas"):
        hd.LightningCallback("lora")
