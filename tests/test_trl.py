"""TRL's DPOTrainer with hd.reference_model: the reference is the same model with its deltas
off (no second copy of the base), also under gradient checkpointing; the losses equal TRL with
a PEFT LoRA of the same initial factors, step for step."""

from __future__ import annotations

import copy

import pytest
import torch

import hookdelta as hd

trl = pytest.importorskip("trl", reason="trl is not installed (test-extra)")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
tf = pytest.importorskip("transformers")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def preferences():
    g = torch.Generator().manual_seed(0)

    def sentence(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (n,), generator=g))

    return datasets.Dataset.from_dict(
        {
            "prompt": [sentence(4) for _ in range(8)],
            "chosen": [sentence(3) for _ in range(8)],
            "rejected": [sentence(3) for _ in range(8)],
        }
    )


def config(out, checkpointing):
    return trl.DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        beta=0.1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        gradient_checkpointing=checkpointing,
        dataloader_num_workers=0,
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient checkpointing"])
def test_dpo_with_the_model_as_its_own_reference_equals_trl_with_peft(tmp_path, checkpointing):
    base = tiny_lm(tied=False)
    ours = copy.deepcopy(base)
    delta = hd.attach(ours, hd.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for piece in delta.pieces.values():
            layer = theirs.base_model.model.get_submodule(piece.key)
            layer.lora_A["default"].weight.copy_(piece.lora_A)
            layer.lora_B["default"].weight.copy_(piece.lora_B)
    runs = []
    for model, ref, out in ((ours, hd.reference_model(ours), "ours"), (theirs, None, "theirs")):
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=ref,
            args=config(tmp_path / out, checkpointing),
            train_dataset=preferences(),
            processing_class=tokenizer(),
        )
        if ref is not None:  # no second copy of the base: the reference's weights are the model's own
            assert trainer.ref_model.get_input_embeddings().weight is ours.get_input_embeddings().weight
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(runs[0]) == 3 and runs[0][-1] != runs[0][0]  # it trained
    for got, want in zip(*runs, strict=True):
        assert got == pytest.approx(want, abs=1e-4)  # Adam's rounding over three steps
    assert all(d.enabled for d in hd.deltas(ours).values())  # the reference switched them back on


def texts():
    g = torch.Generator().manual_seed(1)
    return datasets.Dataset.from_dict(
        {"text": [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (10,), generator=g)) for _ in range(8)]}
    )


def tiny_lm(tied):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=63,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            tie_word_embeddings=tied,
        )
    )


def sft_config(out):
    return trl.SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )


@pytest.mark.parametrize("tied", [False, True], ids=["own head", "tied head"])
def test_sft_with_a_delta_on_the_head_never_trains_half_of_it_silently(tmp_path, tied):
    """TRL's SFT computes the loss from lm_head.weight itself (a fused head that patches the
    model's forward): a LoRA on the head would be ignored there. It is refused at the first
    step, naming the head; where the release calls the head, the head's LoRA trains."""
    model = tiny_lm(tied)
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "lm_head"]))
    args = sft_config(tmp_path)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=texts(), processing_class=tokenizer())
    head = next(p for p in delta.pieces.values() if p.key == "lm_head")
    before = head.lora_B.detach().clone()
    if model.forward.__func__ is type(model).forward:  # this release calls lm_head
        trainer.train()
        assert not torch.equal(head.lora_B, before)
        return
    with pytest.raises(hd.BypassError, match=r"'lm_head'.*\['lora'\]"):
        trainer.train()
    assert torch.equal(head.lora_B, before)  # no step was taken with the head's LoRA ignored


def test_sft_with_deltas_off_the_head_trains_through_the_fused_head(tmp_path):
    model = tiny_lm(True)
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    before = {k: v.detach().clone() for k, v in delta.state_dict().items()}
    args = sft_config(tmp_path)
    trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=texts(),
        processing_class=tokenizer(),
        callbacks=[hd.TrainerCallback(delta)],
    ).train()
    assert all(not torch.equal(v, before[k]) for k, v in delta.state_dict().items() if "lora_B" in k)
