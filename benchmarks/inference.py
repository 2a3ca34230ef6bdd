"""Inference rows: the forward pass with a delta unmerged (B1), merged (B2), after detach (B3),
with stacked deltas (B8), and with a bottleneck adapter (B10)."""

from __future__ import annotations

import copy

import torch

import hookdelta as hd

from .common import ALL_LINEAR, Profile, Row, bert, forward, interleave, llama, lora_contenders, perturb, token_ids


def _shape(p: Profile, kind: str = "Llama") -> str:
    return f"{kind} {p.layers}x{p.width}, batch {p.batch}x{p.seq}, fp32"


def b1_unmerged(p: Profile) -> Row:
    bare, ours, delta, theirs = lora_contenders(p)
    ids = token_ids(p)
    with torch.inference_mode():  # same weights, same answer: the timings compare the same work
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    row = Row("B1", "inference forward, LoRA r=8 on all linear layers, unmerged",
              f"{_shape(p)}; {len(delta.pieces)} adapted layers")
    row.times = interleave({"hookdelta": forward(ours, ids), "peft": forward(theirs, ids), "bare": forward(bare, ids)},
                           p.rounds, p.calls)
    row.ratio("hookdelta", "peft", 1.00)
    row.ratio("hookdelta", "bare")
    row.ratio("peft", "bare")
    return row


def b2_merged(p: Profile) -> Row:
    bare = llama(p.layers, p.width)
    ours = copy.deepcopy(bare)
    delta = hd.attach(ours, hd.LoRAConfig(**ALL_LINEAR))
    perturb(delta, std=0.02)
    delta.merge()
    ids = token_ids(p)
    row = Row("B2", "inference forward, LoRA merged", f"{_shape(p)}; all-linear r=8 merged (original kept)")
    row.times = interleave({"hookdelta merged": forward(ours, ids), "bare": forward(bare, ids)}, p.rounds, p.calls)
    row.ratio("hookdelta merged", "bare", 1.01)
    # the layers run hook-free; only the model itself keeps the thread guard's two hooks
    row.checks["no hook on any layer while merged"] = not any(
        m._forward_hooks or m._forward_pre_hooks for name, m in ours.named_modules() if name)
    return row


def b3_detached(p: Profile) -> Row:
    never = llama(p.layers, p.width)
    detached = copy.deepcopy(never)
    delta = hd.attach(detached, hd.LoRAConfig(**ALL_LINEAR))
    delta.merge()
    delta.unmerge()
    delta.detach()
    ids = token_ids(p)
    row = Row("B3", "forward after attach, merge, unmerge, detach", f"{_shape(p)}")
    row.times = interleave({"detached": forward(detached, ids), "never attached": forward(never, ids)},
                           p.rounds, p.calls)
    row.ratio("detached", "never attached", 1.00, "the same code runs: the ratio is the noise floor")
    row.checks["no hook or store left"] = not hd.deltas(detached) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in detached.modules())
    row.checks["weights bit-identical"] = all(
        torch.equal(a, b) for a, b in zip(detached.state_dict().values(), never.state_dict().values()))
    return row


def b8_stacked(p: Profile) -> Row:
    bare = llama(p.layers, p.width)
    models = {"bare": bare}
    for name, configs in {
        "1 LoRA": [hd.LoRAConfig(**ALL_LINEAR)],
        "2 LoRAs": [hd.LoRAConfig(**ALL_LINEAR)] * 2,
        "adapter + LoRA": [hd.AdapterConfig(placement="pfeiffer", reduction_factor=16),
                           hd.LoRAConfig(**ALL_LINEAR)],
    }.items():
        model = copy.deepcopy(bare)
        for cfg in configs:
            perturb(hd.attach(model, cfg), std=0.02)
        models[name] = model
    ids = token_ids(p)
    row = Row("B8", "forward with stacked deltas (all-linear LoRA r=8; Pfeiffer adapter, reduction 16)", _shape(p))
    row.times = interleave({k: forward(m, ids) for k, m in models.items()}, p.rounds, p.calls)
    for name in ("1 LoRA", "2 LoRAs", "adapter + LoRA"):
        row.ratio(name, "bare")
    row.ratio("2 LoRAs", "1 LoRA")
    return row


def b10_adapter(p: Profile) -> Row:
    bare = bert(p.layers, p.width)
    ours = copy.deepcopy(bare)
    delta = hd.attach(ours, hd.AdapterConfig(placement="pfeiffer", reduction_factor=16))
    perturb(delta, std=0.02)
    ids = token_ids(p)
    row = Row("B10", "inference overhead of a sequential bottleneck adapter after each FFN, reduction 16",
              f"{_shape(p, 'BERT')}; {len(delta.pieces)} adapters of width {p.width // 16}")
    row.times = interleave({"hookdelta adapter": forward(ours, ids), "bare": forward(bare, ids)}, p.rounds, p.calls)
    row.ratio("hookdelta adapter", "bare", 1.06, "published adapter overhead: +4-6%")
    return row


ROWS = [b1_unmerged, b2_merged, b3_detached, b8_stacked, b10_adapter]
