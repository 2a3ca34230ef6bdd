"""A quantized base (B12): LoRA r=16 on all linear layers of a 4-bit nf4 Llama (bitsandbytes,
bf16 compute), hookdelta against PEFT's QLoRA on the same quantized weights with the same A
and B: forward time, training-step time, and training memory counted as in B4/B9, next to the
same model in fp32 and bf16 with the LoRA (what quantizing the base saves)."""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch
import transformers as tf

import hookdelta as hd

from .common import Profile, Row, interleave, llama, perturb, token_ids, training_memory

R = 16


def _quantized(path: str) -> torch.nn.Module:
    q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = tf.LlamaForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu", torch_dtype=torch.float32
    )  # (transformers 4.x: float16 otherwise)
    # bitsandbytes repacks 4-bit weights for CPU inference at the first eval forward, after which
    # training gets no gradients through them; hookdelta holds that off while attached, and the
    # PEFT twin gets the same switch, so both run the same kernels
    for layer in model.modules():
        if "support_avx512bf16_for_cpu" in layer.__dict__:
            layer.support_avx512bf16_for_cpu = False
    return model


def _peft(model: torch.nn.Module, delta: Any) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))
    with torch.no_grad():
        for piece in delta.pieces.values():
            layer = twin.base_model.model.get_submodule(piece.key)
            layer.lora_A["default"].weight.copy_(piece.lora_A)
            layer.lora_B["default"].weight.copy_(piece.lora_B)
    return twin


def _attach(model: torch.nn.Module) -> Any:
    delta = hd.attach(model, hd.LoRAConfig(r=R, alpha=2 * R, targets="all-linear"))
    perturb(delta, std=0.02)
    return delta


def b12_qlora(p: Profile) -> Row:
    ids = token_ids(p)
    base = llama(p.layers, p.width)
    with tempfile.TemporaryDirectory() as path:
        base.save_pretrained(path)
        ours = _quantized(path)
        delta = _attach(ours)
        theirs = _peft(_quantized(path), delta)
    full = {"fp32": copy.deepcopy(base), "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for model in full.values():
        _attach(model)
    with torch.no_grad():
        same = torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    def forward(model: torch.nn.Module):
        def call() -> None:
            with torch.no_grad():
                model(input_ids=ids)

        return call

    def loss_of(model: torch.nn.Module):
        return lambda: model(input_ids=ids, labels=ids).loss

    steps, memory = {}, {}
    for name, model in (("hookdelta", ours), ("peft", theirs), *[(f"hookdelta {k}", m) for k, m in full.items()]):
        model.train()
        params = [t for t in model.parameters() if t.requires_grad]
        memory[name] = training_memory(loss_of(model), params)
        if name in ("hookdelta", "peft"):
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(m=model, o=opt) -> None:
                loss = loss_of(m)()
                o.zero_grad()
                loss.backward()
                o.step()

            steps[name] = step

    row = Row(
        "B12",
        f"quantized base: 4-bit nf4 (bitsandbytes) + LoRA r={R} all-linear, vs PEFT's QLoRA",
        f"Llama {p.layers}x{p.width}, batch {p.batch}x{p.seq}, bf16 compute, CPU repacking off for both",
    )
    fwd = interleave(
        {"hookdelta forward": forward(ours.eval()), "peft forward": forward(theirs.eval())}, p.rounds, p.calls
    )
    ours.train()
    theirs.train()
    train = interleave({"hookdelta step": steps["hookdelta"], "peft step": steps["peft"]}, p.rounds, 1)
    row.times = {**fwd, **train}
    row.ratio("hookdelta forward", "peft forward")  # reported: bitsandbytes' kernels dominate both
    row.ratio("hookdelta step", "peft step")
    row.extra["training memory MB (activations saved for backward + grads + AdamW state)"] = {
        k: round(v["total"] / 2**20, 2) for k, v in memory.items()
    }
    row.extra["memory hookdelta / peft"] = round(memory["hookdelta"]["total"] / memory["peft"]["total"], 4)
    weights = {"4-bit": _weight_bytes(ours), "fp32": _weight_bytes(full["fp32"]), "bf16": _weight_bytes(full["bf16"])}
    row.extra["base weights MB"] = {k: round(v / 2**20, 2) for k, v in weights.items()}
    row.checks["memory <= peft"] = memory["hookdelta"]["total"] <= memory["peft"]["total"]
    row.checks["same logits as peft"] = bool(same)
    return row


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's own weights (packed storage for quantized layers, deltas excluded)."""
    return sum(
        t.numel() * t.element_size() for n, t in model.named_parameters() if "_hookdelta" not in n and "lora_" not in n
    )


ROWS = [b12_qlora]
