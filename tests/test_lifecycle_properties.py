"""Property test: any sequence of attach (LoRA or BitFit) / detach / enable / disable / merge / unmerge keeps
the output equal to the formula computed by hand, keeps the keys, costs at most one hook
pair per layer, and ends with a bit-exact model."""

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import hookdelta as hd
from helpers import assert_restored, perturb, snapshot

pytestmark = [pytest.mark.lora, pytest.mark.bitfit]

LAYERS = ["a", "b", "c"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def reference(model, base, x):
    """The output by hand: each layer uses W0 + Σ s·B·A and b0 + Σ Δb over the enabled
    LoRA and BitFit deltas (merged or not)."""
    h = x
    for i, name in enumerate(LAYERS):
        W, b = base[f"{name}.weight"], base[f"{name}.bias"]
        for d in hd.deltas(model).values():
            if d.enabled and name in d.pieces:
                p = d.pieces[name]
                if d.method == "bitfit":
                    b = b + p.bias.detach()
                else:
                    W = W + p.scale * p.lora_B.detach() @ p.lora_A.detach()
        h = h @ W.T + b
        if i < 2:
            h = torch.tanh(h)
    return h


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = MLP().double()
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.snap = snapshot(self.model)
        self.x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        self.count = 0

    def names(self):
        return sorted(hd.deltas(self.model))

    @rule(layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True), r=st.integers(1, 3),
          bitfit=st.booleans())
    def attach(self, layers, r, bitfit):
        self.count += 1
        cfg = hd.BitFitConfig(targets=layers) if bitfit else hd.LoRAConfig(r=r, alpha=2.0, targets=layers)
        d = hd.attach(self.model, cfg, name=f"d{self.count}")
        perturb(d, std=0.2, seed=self.count)

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def detach(self, data):
        hd.deltas(self.model)[data.draw(st.sampled_from(self.names()))].detach()

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def toggle(self, data):
        d = hd.deltas(self.model)[data.draw(st.sampled_from(self.names()))]
        if d.merged:
            with pytest.raises(hd.DeltaStateError):
                d.disable()
        elif d.enabled:
            d.disable()
        else:
            d.enable()

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def merge_or_unmerge(self, data):
        d = hd.deltas(self.model)[data.draw(st.sampled_from(self.names()))]
        if d.merged:
            d.unmerge()
        elif d.enabled:
            d.merge()
        else:
            with pytest.raises(hd.DeltaStateError):
                d.merge()

    @invariant()
    def output_matches_formula(self):
        with torch.no_grad():
            torch.testing.assert_close(self.model(self.x), reference(self.model, self.base, self.x))

    @invariant()
    def keys_and_hooks(self):
        assert list(self.model.state_dict()) == self.snap["keys"]
        for name in LAYERS:
            layer = getattr(self.model, name)
            assert len(layer._forward_hooks) <= 1 and len(layer._forward_pre_hooks) == 0
            live = [d for d in hd.deltas(self.model).values() if d.enabled and not d.merged and name in d.pieces]
            assert len(layer._forward_hooks) == (1 if live else 0), "hooks only where a live delta is"

    def teardown(self):
        for d in list(hd.deltas(self.model).values())[::-1]:
            d.detach()
        assert_restored(self.model, self.snap)


Lifecycle.TestCase.settings = settings(max_examples=40, stateful_step_count=12, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestLifecycle = Lifecycle.TestCase
