"""AdaLoRA's rank schedule against PEFT's own: the same adapter trained the same steps with
PEFT's `update_and_allocate` and with `hd.optim.adalora` must hold the same tensors and cut the
same triplets at every step; the pruned file each writes loads in the other to the same outputs;
and under the HF Trainer the callback runs the schedule to its final budget."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build, main_output

import hookdelta as hd

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.adalora

STEPS = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1)


def peft_twin(model):
    # (task_type: without one, PeftModel calls the base model directly and PEFT never adds its regulariser)
    cfg = peft.AdaLoraConfig(
        lora_alpha=4, target_modules=["q_proj", "v_proj"], orth_reg_weight=0.3, task_type="CAUSAL_LM", **STEPS
    )
    twin = peft.get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_E" in n:  # (E starts at zero in both; give it values so every tensor learns)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return twin


def batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 96, (2, 7), generator=g) for _ in range(STEPS["total_step"] + 2)]


def test_schedule_cuts_what_peft_cuts_and_trains_to_the_same_tensors(tmp_path):
    model, _, _ = build("llama")
    twin = peft_twin(model)
    twin.save_pretrained(tmp_path / "start")
    ours = copy.deepcopy(model)
    delta = hd.load_peft(ours, tmp_path / "start")
    alloc = hd.optim.adalora(delta)
    theirs_opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.5)
    ours_opt = torch.optim.SGD(delta.parameters(), lr=0.5)
    twin.train(), ours.train()
    for step, ids in enumerate(batches()):
        twin(input_ids=ids, labels=ids).loss.backward()  # (PEFT adds its regulariser inside forward)
        (ours(input_ids=ids, labels=ids).loss + alloc.penalty()).backward()
        theirs_opt.step(), ours_opt.step()
        twin.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        theirs_opt.zero_grad(), ours_opt.zero_grad()
        for piece in delta.pieces.values():
            layer = twin.base_model.model.get_submodule(piece.key)
            for name in ("lora_A", "lora_B", "lora_E"):
                torch.testing.assert_close(
                    getattr(piece, name),
                    getattr(layer, name)["default"],
                    rtol=1e-4,
                    atol=1e-6,
                    msg=f"step {step}: {piece.key}.{name}",
                )
            assert torch.equal(piece.lora_E == 0, layer.lora_E["default"] == 0), f"step {step}: {piece.key}"
    kept = sum(p.kept() for p in delta.pieces.values())
    assert kept == STEPS["target_r"] * len(delta.pieces), "the final budget is target_r per layer"
    assert kept < STEPS["init_r"] * len(delta.pieces)

    # PEFT's pruned file loads in hookdelta, and ours in PEFT, to the same outputs
    twin.eval(), ours.eval()
    ids = batches()[0]
    with torch.no_grad():
        expected = main_output(twin(input_ids=ids))
        torch.testing.assert_close(main_output(ours(input_ids=ids)), expected, rtol=1e-4, atol=1e-5)
    twin.save_pretrained(tmp_path / "theirs")
    fresh = copy.deepcopy(model)
    loaded = hd.load_peft(fresh, tmp_path / "theirs")
    assert sorted(p.r for p in loaded.pieces.values()) == sorted(p.kept() for p in delta.pieces.values())
    delta.save_peft(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(fresh(input_ids=ids)), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(main_output(back(input_ids=ids)), expected, rtol=1e-4, atol=1e-5)


def test_the_schedule_leaves_also_trained_modules_alone():
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.AdaLoRAConfig(init_r=4, target_r=1, total_step=3, also_train=["lm_head"]))
    alloc = hd.optim.adalora(delta)
    head = model.lm_head.weight.detach().clone()
    for step in range(4):
        ids = batches()[step]
        (model(input_ids=ids, labels=ids).loss + alloc.penalty()).backward()
        alloc.update_and_allocate(step)
        delta.zero_grad()
    assert sum(p.kept() for p in alloc.pieces) == len(alloc.pieces) == 4
    assert torch.equal(model.lm_head.weight, head)


def test_the_schedule_refuses_what_it_cannot_run():
    model, _, _ = build("llama")
    lora = hd.attach(model, hd.LoRAConfig(r=2), name="plain")
    with pytest.raises(hd.ConfigError, match="AdaLoRA"):
        hd.optim.adalora(lora)
    ada = hd.attach(model, hd.AdaLoRAConfig(init_r=4, target_r=2), name="ada")
    with pytest.raises(hd.ConfigError, match="total_step"):
        hd.optim.adalora(ada)
    alloc = hd.optim.adalora(ada, total_step=5)
    with pytest.raises(hd.ConfigError, match="gradients"):
        alloc.update_and_allocate(0)
    with pytest.raises(hd.ConfigError, match="target_r"):
        hd.AdaLoRAConfig(init_r=2, target_r=4)
    with pytest.raises(hd.ConfigError, match="tinit"):
        hd.AdaLoRAConfig(total_step=4, tinit=3, tfinal=1)


def test_trainer_runs_the_schedule_and_the_penalty(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _, _ = build("llama")
    delta = hd.attach(model, hd.AdaLoRAConfig(init_r=4, target_r=1, tinit=1, tfinal=1, orth_reg_weight=0.5))
    ids = batches()
    data = [{"input_ids": i[0], "labels": i[0]} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=1,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = hd.delta_trainer(transformers.Trainer)(model=model, args=args, train_dataset=data)
    seen = []
    real = trainer.compute_loss

    def watch(m, inputs, *a, **k):
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, hd.TrainerCallback))
        with torch.no_grad():  # Trainer's own loss (its normalisation differs across releases), and the penalty
            plain = transformers.Trainer.compute_loss(trainer, m, dict(inputs), *a, **k)
            plain = float(plain[0] if isinstance(plain, tuple) else plain)
            penalty = callback.allocator.penalty().item()
        out = real(m, inputs, *a, **k)
        seen.append((float(out if not isinstance(out, tuple) else out[0]), plain, penalty))
        return out

    trainer.compute_loss = watch
    trainer.train()
    assert sum(p.kept() for p in delta.pieces.values()) == len(delta.pieces), "target_r=1 per layer at the end"
    assert len(seen) == 6 and all(pen > 0 for _, _, pen in seen)
    for out, plain, penalty in seen:  # the training loss is the model's plus the orthogonality penalty
        assert out == pytest.approx(plain + penalty, rel=1e-4), seen
