"""Lifecycle rows: attach + detach on a deep model (B5), switching among loaded adapters (B6),
and merge + unmerge with the drift it leaves in the weights (B7)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch

import hookdelta as hd

from .common import ALL_LINEAR, Profile, Row, interleave, llama, lora_contenders, peft_twin, perturb


def b5_attach_detach(p: Profile) -> Row:
    from peft import LoraConfig, get_peft_model

    ours, theirs = llama(p.deep_layers, p.width), llama(p.deep_layers, p.width)
    state = {"peft": theirs}

    def hookdelta_cycle() -> None:
        hd.attach(ours, hd.LoRAConfig(**ALL_LINEAR)).detach()

    def peft_cycle() -> None:
        state["peft"] = get_peft_model(
            state["peft"], LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        ).unload()

    row = Row(
        "B5",
        "attach + detach, LoRA r=8 all-linear (PEFT: get_peft_model + unload)",
        f"Llama {p.deep_layers}x{p.width}, {p.deep_layers * 7} adapted layers",
    )
    row.times = interleave({"hookdelta": hookdelta_cycle, "peft": peft_cycle}, p.rounds, 1)
    row.ratio("hookdelta", "peft", 0.5)
    return row


def b6_switch(p: Profile) -> Row:
    from peft import LoraConfig

    names = ["a", "b", "c", "d"]
    base = llama(p.layers, p.width)

    def loaded() -> tuple[torch.nn.Module, list[hd.Delta]]:
        model = copy.deepcopy(base)
        deltas = [hd.attach(model, hd.LoRAConfig(**ALL_LINEAR), name=n) for n in names]
        for d in deltas:
            perturb(d, std=0.02)
        hd.set_active(model, names[0])
        return model, deltas

    (switched, deltas), (activated, _) = loaded(), loaded()
    theirs = peft_twin(base, deltas[0], "all-linear")
    for n in names[1:]:
        theirs.add_adapter(n, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

    def cycler(switch: Callable[[int, int], None]) -> Callable[[], None]:
        turn = itertools.cycle(range(1, len(names) + 1))
        state = {"now": 0}

        def call() -> None:
            new = next(turn) % len(names)
            switch(state["now"], new)
            state["now"] = new

        return call

    def disable_enable(old: int, new: int) -> None:
        deltas[old].disable()
        deltas[new].enable()

    row = Row(
        "B6",
        "switch the active adapter among 4 loaded LoRAs (all-linear r=8)",
        f"Llama {p.layers}x{p.width}, {len(deltas[0].pieces)} adapted layers per adapter",
    )
    calls = max(1, p.switch_rounds // p.rounds)
    row.times = interleave(
        {
            "hookdelta set_active": cycler(lambda old, new: hd.set_active(activated, names[new])),
            "hookdelta disable+enable": cycler(disable_enable),
            "peft set_adapter": cycler(lambda old, new: theirs.set_adapter(names[new] if new else "default")),
        },
        p.rounds,
        calls,
    )
    row.ratio("hookdelta set_active", "peft set_adapter")
    row.ratio("hookdelta disable+enable", "peft set_adapter")
    row.checks["hd.set_active <= 1 ms per switch"] = row.times["hookdelta set_active"].median <= 1e-3
    for model in (switched, activated):
        row.checks["exactly one adapter live"] = (
            row.checks.get("exactly one adapter live", True) and sum(d.enabled for d in hd.deltas(model).values()) == 1
        )
    return row


def b7_merge_unmerge(p: Profile) -> Row:
    base, ours, delta, theirs = lora_contenders(p)

    def ours_cycle() -> None:
        delta.merge()
        delta.unmerge()

    def peft_cycle() -> None:
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    row = Row(
        "B7", "merge + unmerge, LoRA r=8 all-linear", f"Llama {p.layers}x{p.width}, {len(delta.pieces)} adapted layers"
    )
    row.times = interleave({"hookdelta": ours_cycle, "peft": peft_cycle}, p.rounds, 1)
    row.ratio("hookdelta", "peft", 1.00)
    drift = {"hookdelta": 0.0, "peft": 0.0}
    with torch.no_grad():
        for key in (piece.key for piece in delta.pieces.values()):
            original = base.get_submodule(key).weight
            drift["hookdelta"] = max(drift["hookdelta"], (ours.get_submodule(key).weight - original).abs().max().item())
            peft_weight = theirs.base_model.model.get_submodule(key).base_layer.weight
            drift["peft"] = max(drift["peft"], (peft_weight - original).abs().max().item())
    cycles = p.rounds + 1
    row.extra[f"max |W - W0| after {cycles} cycles"] = drift
    row.checks["hookdelta bit-exact"] = drift["hookdelta"] == 0.0
    return row


ROWS = [b5_attach_detach, b6_switch, b7_merge_unmerge]
