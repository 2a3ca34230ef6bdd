"""Property test: any sequence of lifecycle calls keeps the model either correctly adapted or
exactly as it was, and ends bit-identical to the original.

Steps: attach (LoRA, BitFit, IA3 or a bottleneck adapter, random layers), detach, enable /
disable, merge / unmerge (refusals must change nothing), save + reload, `with` blocks
(nested, with and without an exception inside), `model.to(float64)` and back, and
`copy.deepcopy`. After every step the output equals a reference computed by hand from the
untouched base weights and the deltas' tensors, composed in attach order.

CI runs a fixed-seed search (HOOKDELTA_PROPERTY_EXAMPLES, default 200) and a random-seed one.
"""

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import hookdelta as hd
from helpers import assert_restored, perturb, same_bits, snapshot
from hookdelta.methods.adapter import ACTIVATIONS

pytestmark = [pytest.mark.lora, pytest.mark.bitfit, pytest.mark.ia3, pytest.mark.adapter]

LAYERS = ["a", "b", "c"]
METHODS = ["lora", "bitfit", "ia3", "adapter"]
EXAMPLES = int(os.environ.get("HOOKDELTA_PROPERTY_EXAMPLES", "200"))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def config(method, layers, r):
    if method == "lora":
        return hd.LoRAConfig(r=r, alpha=2.0, targets=layers)
    if method == "bitfit":
        return hd.BitFitConfig(targets=layers)
    if method == "ia3":
        return hd.IA3Config(targets=layers)
    return hd.AdapterConfig(targets=layers, bottleneck_dim=r, non_linearity="tanh")


def reference(model, base, x):
    """The output by hand: each layer computes W0·x + b0 from the original weights, then each
    enabled delta (merged or not) in attach order: LoRA adds s·B·A·x, BitFit adds its bias,
    IA3 multiplies by l, an adapter adds s·up(f(down(h)))."""
    h = x.to(base["a.weight"].dtype)
    for i, name in enumerate(LAYERS):
        inp = h
        h = inp @ base[f"{name}.weight"].T + base[f"{name}.bias"]
        for d in hd.deltas(model).values():
            if not d.enabled or name not in d.pieces:
                continue
            p = {k: t.detach().to(h.dtype) for k, t in d.pieces[name].named_parameters()}
            if d.method == "lora":
                h = h + d.pieces[name].scale * inp @ p["lora_A"].T @ p["lora_B"].T
            elif d.method == "bitfit":
                h = h + p["bias"]
            elif d.method == "ia3":
                h = h * p["ia3_l"]
            else:
                f = ACTIVATIONS[d.pieces[name].non_linearity]
                h = h + d.pieces[name].scale * (f(h @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"])
        if i < 2:
            h = torch.tanh(h)
    return h


def state(model):
    """What must not move when a call is refused: every tensor of the model, bit for bit,
    and each delta's flags."""
    tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    tensors.update({n: t.detach().clone() for n, t in model.named_parameters() if "_hookdelta" in n})
    flags = {n: (d.enabled, d.merged) for n, d in hd.deltas(model).items()}
    return tensors, flags


def assert_state(model, before):
    tensors, flags = state(model)
    assert flags == before[1]
    assert tensors.keys() == before[0].keys() and all(same_bits(tensors[k], before[0][k]) for k in tensors)


class Boom(Exception):
    pass


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = MLP()
        self.base = {k: v.double() for k, v in self.model.state_dict().items()}
        self.snap = snapshot(self.model)
        self.x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
        self.count = 0

    def names(self):
        return list(hd.deltas(self.model))

    def new(self, method, layers, r):
        self.count += 1
        d = hd.attach(self.model, config(method, layers, r), name=f"d{self.count}")
        perturb(d, std=0.3, seed=self.count)
        return d

    def pick(self, data):
        return hd.deltas(self.model)[data.draw(st.sampled_from(self.names()))]

    def check(self, model=None):
        model = model or self.model
        with torch.no_grad():
            out = model(self.x.to(next(model.parameters()).dtype))
            torch.testing.assert_close(out.double(), reference(model, self.base, self.x), rtol=1e-4, atol=1e-5)

    @rule(method=st.sampled_from(METHODS), layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
          r=st.integers(1, 3))
    def attach(self, method, layers, r):
        self.new(method, layers, r)

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def detach(self, data):
        d = self.pick(data)
        d.detach()
        with pytest.raises(hd.DeltaStateError):  # a detached delta refuses everything
            d.enable()

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def toggle(self, data):
        d = self.pick(data)
        if d.merged:
            before = state(self.model)
            with pytest.raises(hd.DeltaStateError):
                d.disable()
            assert_state(self.model, before)
        elif d.enabled:
            d.disable()
        else:
            d.enable()

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def merge_or_unmerge(self, data):
        d = self.pick(data)
        if d.merged:
            d.unmerge()
            return
        before = state(self.model)
        try:
            d.merge()
        except (hd.MergeError, hd.DeltaStateError):  # not mergeable, disabled, or would not commute
            assert_state(self.model, before)
            assert not d.enabled or d.method == "adapter" or len(self.names()) > 1

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def save_and_reload(self, data):
        d = self.pick(data)
        directory = tempfile.mkdtemp(dir=self.tmp)  # one per save: examples share the test's tmp_path
        d.save(directory)
        name = d.name
        d.detach()
        loaded = hd.load(self.model, directory)
        assert loaded.name == name and not loaded.merged and loaded.enabled

    @rule(method=st.sampled_from(METHODS), layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=2, unique=True),
          nested=st.sampled_from(["none", "attach", "disabled"]), fail=st.sampled_from(["no", "inner", "outer"]))
    def with_block(self, method, layers, nested, fail):
        before = state(self.model)
        with torch.no_grad():
            out = self.model(self.x)
        try:
            with self.new(method, layers, 2):
                self.check()
                if nested == "attach":
                    with self.new("lora", layers[:1], 1):
                        self.check()
                        if fail == "inner":
                            raise Boom
                elif nested == "disabled":
                    first = next(d for d in hd.deltas(self.model).values() if not d.merged)
                    with first.disabled():
                        self.check()
                        if fail == "inner":
                            raise Boom
                self.check()
                if fail == "outer":
                    raise Boom
        except Boom:
            pass
        assert_state(self.model, before)
        with torch.no_grad():
            assert same_bits(self.model(self.x), out)

    @rule()
    def dtype_round_trip(self):
        before = state(self.model)
        self.model.double()
        self.check()
        self.model.float()
        assert_state(self.model, before)
        # .double()/.float() give the parameters new storage (torch's doing): track the new addresses
        self.snap["ptrs"] = {n: p.data_ptr() for n, p in self.model.named_parameters(remove_duplicate=False)
                             if n in self.snap["ptrs"]}

    @rule()
    def deepcopy(self):
        clone = copy.deepcopy(self.model)
        with torch.no_grad():
            assert same_bits(clone(self.x), self.model(self.x))
        before = state(self.model)
        for d in list(hd.deltas(clone).values())[::-1]:  # tearing the copy down leaves the model alone
            d.detach()
        assert hd.deltas(clone) == {} and not any(m._forward_hooks or m._forward_pre_hooks for m in clone.modules())
        base = clone.state_dict()
        assert all(same_bits(base[k], self.snap["params"][k]) for k in self.snap["params"])
        assert {n: p.requires_grad for n, p in clone.named_parameters()} == self.snap["flags"]
        assert_state(self.model, before)

    @invariant()
    def output_matches_reference(self):
        self.check()

    @invariant()
    def keys_and_hooks(self):
        assert list(self.model.state_dict()) == self.snap["keys"]
        for name in LAYERS:
            layer = getattr(self.model, name)
            live = [d for d in hd.deltas(self.model).values() if d.enabled and not d.merged and name in d.pieces]
            assert len(layer._forward_hooks) == (1 if live else 0), "one dispatcher, only where a live delta is"
            assert len(layer._forward_pre_hooks) == 0

    def teardown(self):
        for d in list(hd.deltas(self.model).values())[::-1]:
            d.detach()
        assert_restored(self.model, self.snap)


SETTINGS = dict(stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _tmp_for_machine(tmp_path):
    Lifecycle.tmp = tmp_path


def test_lifecycle_fixed_seed():
    run_state_machine_as_test(Lifecycle, settings=settings(max_examples=EXAMPLES, derandomize=True, **SETTINGS))


def test_lifecycle_random_seed():
    run_state_machine_as_test(Lifecycle, settings=settings(max_examples=max(20, EXAMPLES // 4), **SETTINGS))


# -- the test can fail: planted bugs it must catch ------------------------------------------

def _skip_flag_restore(monkeypatch):
    from hookdelta import delta as lifecycle

    monkeypatch.setattr(lifecycle, "_unfreeze", lambda store, model, name: store.freezers.remove(name))


def _ia3_merge_forgets_bias(monkeypatch):
    from hookdelta.methods.ia3 import Rescale

    original = Rescale.merged_weights
    monkeypatch.setattr(Rescale, "merged_weights", lambda self, module: {"weight": original(self, module)["weight"]})


def _disable_keeps_hooks(monkeypatch):
    from hookdelta.engine import Site

    original = Site.refresh
    monkeypatch.setattr(Site, "refresh", lambda self: original(self) if any(p.live for p in self.pieces) else None)


@pytest.mark.parametrize("plant", [_skip_flag_restore, _ia3_merge_forgets_bias, _disable_keeps_hooks])
def test_the_machine_catches_a_planted_bug(plant, monkeypatch):
    plant(monkeypatch)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(Lifecycle, settings=settings(
            max_examples=200, derandomize=True, phases=[Phase.generate], report_multiple_bugs=False, **SETTINGS))
