"""Inference rows: the forward pass with a delta unmerged (B1), merged (B2), after detach (B3),
with stacked deltas (B8), with a bottleneck adapter (B10), and a batch mixing 4 adapters (B11)."""

from __future__ import annotations

import copy

import torch

import hookdelta as hd

from .common import (
    ALL_LINEAR,
    TARGET,
    Profile,
    Row,
    bert,
    close,
    dtype_name,
    forward,
    interleave,
    llama,
    lora_contenders,
    perturb,
    token_ids,
)


def _shape(p: Profile, kind: str = "Llama") -> str:
    return f"{kind} {p.layers}x{p.width}, batch {p.batch}x{p.seq}, {dtype_name()}"


def b1_unmerged(p: Profile) -> Row:
    bare, ours, delta, theirs = lora_contenders(p)
    ids = token_ids(p)
    with torch.inference_mode():  # same weights, same answer: the timings compare the same work
        if not close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits):
            raise AssertionError("hookdelta and PEFT disagree: the timing would compare different work")
    row = Row(
        "B1",
        "inference forward, LoRA r=8 on all linear layers, unmerged",
        f"{_shape(p)}; {len(delta.pieces)} adapted layers",
    )
    row.times = interleave(
        {"hookdelta": forward(ours, ids), "peft": forward(theirs, ids), "bare": forward(bare, ids)}, p.rounds, p.calls
    )
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
        m._forward_hooks or m._forward_pre_hooks for name, m in ours.named_modules() if name
    )
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
    row.times = interleave(
        {"detached": forward(detached, ids), "never attached": forward(never, ids)}, p.rounds, p.calls
    )
    row.ratio("detached", "never attached", 1.00, "the same code runs: the ratio is the noise floor")
    row.checks["no hook or store left"] = not hd.deltas(detached) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in detached.modules()
    )
    row.checks["weights bit-identical"] = all(
        torch.equal(a, b) for a, b in zip(detached.state_dict().values(), never.state_dict().values(), strict=True)
    )
    return row


def b8_stacked(p: Profile) -> Row:
    bare = llama(p.layers, p.width)
    models = {"bare": bare}
    for name, configs in {
        "1 LoRA": [hd.LoRAConfig(**ALL_LINEAR)],
        "2 LoRAs": [hd.LoRAConfig(**ALL_LINEAR)] * 2,
        "adapter + LoRA": [hd.AdapterConfig(placement="pfeiffer", reduction_factor=16), hd.LoRAConfig(**ALL_LINEAR)],
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
    row = Row(
        "B10",
        "inference overhead of a sequential bottleneck adapter after each FFN, reduction 16",
        f"{_shape(p, 'BERT')}; {len(delta.pieces)} adapters of width {p.width // 16}",
    )
    row.times = interleave({"hookdelta adapter": forward(ours, ids), "bare": forward(bare, ids)}, p.rounds, p.calls)
    row.ratio("hookdelta adapter", "bare", 1.06, "published adapter overhead: +4-6%")
    return row


def b11_mixed_batch(p: Profile) -> Row:
    """4 LoRAs (r=16, all-linear) on one base; a batch whose rows use different adapters, against
    the same batch with one adapter, and against PEFT's adapter_names on the same factors."""
    from peft import LoraConfig, get_peft_model

    layers, width, batch, seq = {
        "smoke": (2, 64, 4, 16),
        "gpu": (p.layers, p.width, p.batch, p.seq),
        "gpu-quick": (p.layers, p.width, p.batch, p.seq),
    }.get(p.name, (4, 512, 8, 64))
    bare = llama(layers, width)
    names = ["a", "b", "c", "d"]
    ours = copy.deepcopy(bare)
    for i, n in enumerate(names):
        perturb(hd.attach(ours, hd.LoRAConfig(r=16, alpha=32, targets="all-linear"), name=n), std=0.02, seed=i + 1)
    single = copy.deepcopy(bare)
    hd.attach(single, hd.LoRAConfig(r=16, alpha=32, targets="all-linear"), name="a").load_state_dict(
        hd.deltas(ours)["a"].state_dict()
    )
    theirs = get_peft_model(copy.deepcopy(bare), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), "a")
    for n in names[1:]:
        theirs.add_adapter(n, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for n in names:
            for piece in hd.deltas(ours)[n].pieces.values():
                layer = theirs.base_model.model.get_submodule(piece.key)
                layer.lora_A[n].weight.copy_(piece.lora_A)
                layer.lora_B[n].weight.copy_(piece.lora_B)
    theirs.eval()
    rows = (names * batch)[:batch]
    ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0)).to(TARGET["device"])

    def hd_mixed() -> torch.Tensor:
        with torch.inference_mode(), hd.route(ours, rows):
            return ours(input_ids=ids).logits

    def peft_mixed() -> torch.Tensor:
        with torch.inference_mode():
            return theirs(input_ids=ids, adapter_names=rows).logits

    def peft_single() -> torch.Tensor:
        with torch.inference_mode():
            return theirs(input_ids=ids).logits

    theirs.set_adapter("a")
    row = Row(
        "B11",
        "mixed batch: each row through its own LoRA (4 adapters, r=16, all-linear)",
        f"Llama {layers}x{width}, batch {batch}x{seq}, {dtype_name()}, rows a,b,c,d,a,b,c,d",
    )
    row.times = interleave(
        {
            "hookdelta mixed": hd_mixed,
            "hookdelta single": forward(single, ids),
            "peft mixed": peft_mixed,
            "peft single": peft_single,
            "bare": forward(bare, ids),
        },
        p.rounds,
        p.calls,
    )
    row.ratio("hookdelta mixed", "hookdelta single", 1.10, "the same batch with one adapter")
    row.ratio("hookdelta mixed", "peft mixed", 0.50, "PEFT's adapter_names")
    row.ratio("peft mixed", "peft single")
    row.ratio("bare", "peft mixed", note="the floor: no adapter at all")
    med = {k: v.median for k, v in row.times.items()}
    row.extra["adapter cost above bare, hookdelta mixed / peft mixed"] = round(
        (med["hookdelta mixed"] - med["bare"]) / max(med["peft mixed"] - med["bare"], 1e-9), 3
    )
    got = hd_mixed()
    row.checks["same logits as peft mixed"] = close(got, peft_mixed())
    with torch.inference_mode():
        alone = single(input_ids=ids).logits
    row.checks["rows of 'a' equal its single-adapter run"] = close(got[::4], alone[::4])
    return row


ROWS = [b1_unmerged, b2_merged, b3_detached, b8_stacked, b10_adapter, b11_mixed_batch]
