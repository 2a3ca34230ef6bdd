"""Per-row routing (hd.route, PEFT's adapter_names): every row of a mixed batch equals the same
batch run with only that row's delta enabled (the reference: set_active, one delta at a time)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_restored, assert_same, perturb, snapshot
from tiny_models import build, main_output

import hookdelta as hd


def _attach(model, kinds, targets):
    configs = {
        "lora": lambda i: hd.LoRAConfig(r=2 + 2 * i, alpha=4 + i, targets=targets),
        "dora": lambda i: hd.LoRAConfig(r=2 + i, use_dora=True, targets=targets),
        "ia3": lambda i: hd.IA3Config(),
        "adapter": lambda i: hd.AdapterConfig(bottleneck_dim=4 + i),
    }
    for i, kind in enumerate(kinds):
        perturb(hd.attach(model, configs[kind](i), name=f"{kind}{i}"), std=0.2, seed=i + 1)
    return [f"{kind}{i}" for i, kind in enumerate(kinds)]


def _reference(model, inputs, names, keep=()):
    """Row j of the whole batch run with only names[j] (and `keep`) enabled."""
    rows = []
    with torch.no_grad():
        for j, name in enumerate(names):
            hd.set_active(model, *keep, *([name] if name else []))
            rows.append(main_output(model(**inputs))[j])
    hd.set_active(model, *hd.deltas(model))
    return torch.stack(rows)


def _batch(inputs, rows):
    ids = torch.randint(3, 90, (rows, 6), generator=torch.Generator().manual_seed(5))
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out["input_ids"] = ids
    if "attention_mask" in inputs:
        out["attention_mask"] = torch.ones_like(ids)
    return out


KINDS = {
    "lora": ["lora", "lora", "lora"],
    "dora": ["dora", "dora"],
    "ia3": ["ia3", "ia3"],
    "adapter": ["adapter", "adapter"],
    "mixed": ["lora", "dora", "ia3", "adapter"],
}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kinds", list(KINDS))
def test_each_row_equals_its_delta_alone(arch, kinds):
    model, inputs, targets = build(arch)
    names = _attach(model, KINDS[kinds], targets)
    rows = names + [None] + names[::-1]
    inputs = _batch(inputs, len(rows))
    want = _reference(model, inputs, rows)
    with torch.no_grad(), hd.route(model, rows):
        got = main_output(model(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the rows differ from each other: the comparison is not vacuous
    assert (want[0] - want[1]).abs().max() > 1e-3 and (want[0] - want[len(names)]).abs().max() > 1e-3


def test_adapter_names_keyword_equals_route_and_leaves_nothing_behind():
    model, inputs, targets = build("llama")
    names = _attach(model, ["lora", "lora"], targets)
    rows = ["lora1", "__base__", "lora0", "lora1"]
    inputs = _batch(inputs, 4)
    with torch.no_grad():
        with hd.route(model, rows):
            want = main_output(model(**inputs))
        got = main_output(model(**inputs, adapter_names=rows))
        both = main_output(model(**inputs))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    hd.set_active(model, *names)
    torch.testing.assert_close(both, main_output(model(**inputs)), rtol=0, atol=0)  # routing ended with the call


def test_a_call_with_adapter_names_that_ctrl_c_ended_routes_nothing_after():
    model, inputs, targets = build("llama")
    names = _attach(model, ["lora", "lora"], targets)
    inputs = _batch(inputs, 2)
    with torch.no_grad():
        want = main_output(model(**inputs))  # both deltas on every row

    def interrupt(module, args, output):
        handle.remove()
        raise KeyboardInterrupt  # no forward hook runs after this, always_call or not

    handle = model.lm_head.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**inputs, adapter_names=["lora0", None])
    hd.set_active(model, *names)  # not refused as "inside a call with adapter_names"
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), want, rtol=0, atol=0)


def test_keep_runs_a_shared_delta_on_every_row():
    model, inputs, targets = build("llama")
    names = _attach(model, ["lora", "lora", "ia3"], targets)
    rows = ["lora0", None, "ia32", "lora0"]
    inputs = _batch(inputs, 4)
    want = _reference(model, inputs, rows, keep=["lora1"])
    with torch.no_grad(), hd.route(model, rows, keep="lora1"):
        got = main_output(model(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert names


def test_merged_delta_may_be_kept():
    model, inputs, targets = build("llama")
    _attach(model, ["lora", "lora", "lora"], targets)
    rows = ["lora0", "lora1", None]
    inputs = _batch(inputs, 3)
    want = _reference(model, inputs, rows, keep=["lora2"])
    hd.deltas(model)["lora2"].merge()
    with torch.no_grad():
        with pytest.raises(hd.DeltaStateError, match="merged"), hd.route(model, rows):
            pass
        with hd.route(model, rows, keep=["lora2"]):
            got = main_output(model(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_each_delta_from_its_rows_only():
    model, inputs, targets = build("llama")
    names = _attach(model, ["lora", "lora"], targets)
    rows = ["lora0", "lora1", None, "lora0"]
    ids = _batch(inputs, 4)["input_ids"]

    def grads():
        return {n: [p.grad.clone() for p in hd.deltas(model)[n].parameters()] for n in names}

    with hd.route(model, rows):
        model(input_ids=ids).logits.square().mean(-1).sum().backward()
    got = grads()
    model.zero_grad()
    for j, name in enumerate(rows):
        if name:
            hd.set_active(model, name)
            (model(input_ids=ids).logits[j].square().mean(-1).sum()).backward()
    hd.set_active(model, *names)
    want = grads()
    for n in names:
        for g, w in zip(got[n], want[n], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        assert any(w.abs().max() > 0 for w in want[n])


GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


def _generate_reference(model, rows, k=1, **kw):
    out = []
    for j, name in enumerate(rows):
        hd.set_active(model, *([name] if name else []))
        torch.manual_seed(0)
        out.append(model.generate(**kw)[j * k : (j + 1) * k])
    hd.set_active(model, *hd.deltas(model))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "return3"])
def test_generate_follows_rows_with_left_padding(arch, mode):
    model, inputs, targets = build(arch)
    _attach(model, ["lora", "ia3", "lora"], targets)
    rows = ["lora0", "lora2", None, "ia31"]
    ids = torch.randint(3, 90, (4, 6), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, **GREEDY)
    k = 1
    if mode == "sample":
        kw.update(do_sample=True, top_k=20)
    if mode == "beam":
        kw.update(num_beams=3)
    if mode == "return3":
        kw.update(do_sample=True, num_return_sequences=3)
        k = 3
    want = _generate_reference(model, rows, k=k, **kw)
    with hd.route(model, rows):
        torch.manual_seed(0)
        got = model.generate(**kw)
    assert torch.equal(got, want)
    assert not all(torch.equal(want[0], want[i * k]) for i in range(1, 4))


def test_generate_on_encoder_decoder():
    model, inputs, targets = build("bart")
    _attach(model, ["lora", "lora"], targets)
    rows = [None, "lora1", "lora0"]
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(4))
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        num_beams=2,
        max_new_tokens=4,
        decoder_start_token_id=2,
        pad_token_id=1,
    )
    want = _generate_reference(model, rows, k=1, **kw)
    with hd.route(model, rows):
        got = model.generate(**kw)
    assert torch.equal(got, want)


# -- refusals: one clear error, the model as it was -------------------------------------------------


def _two(arch="llama"):
    model, inputs, targets = build(arch)
    _attach(model, ["lora", "lora"], targets)
    return model, _batch(inputs, 2)


@pytest.mark.parametrize(
    "names, error, match",
    [
        (["lora0", "nope"], hd.DeltaStateError, "no delta named"),
        ("lora0", hd.RoutingError, "one delta name"),
        ([], hd.RoutingError, "one delta name"),
        ([3, None], hd.RoutingError, "delta names or None"),
    ],
)
def test_bad_names_are_refused(names, error, match):
    model, inputs = _two()
    snap = snapshot(model)
    with pytest.raises(error, match=match), hd.route(model, names):
        pass
    assert_same(model, snap)
    main_output(model(**inputs))  # still runs, unrouted


@pytest.mark.parametrize("keep", [[None], [3], ["lora1", None]])
def test_keep_takes_delta_names_only(keep):
    """keep=[None] was a raw KeyError (found by the type checker)."""
    model, inputs = _two()
    snap = snapshot(model)
    with pytest.raises(hd.RoutingError, match="keep= takes delta names"), hd.route(model, ["lora0", None], keep=keep):
        pass
    assert_same(model, snap)
    main_output(model(**inputs))


def test_disabled_and_prompt_and_weight_swapping_deltas_are_refused():
    model, inputs = _two()
    hd.deltas(model)["lora1"].disable()
    with pytest.raises(hd.DeltaStateError, match="disabled"), hd.route(model, ["lora0", "lora1"]):
        pass
    hd.deltas(model)["lora1"].enable()
    hd.attach(model, hd.SoftPromptConfig(num_virtual_tokens=2), name="prompt")
    with pytest.raises(hd.UnsupportedModuleError, match="virtual tokens"), hd.route(model, ["lora0", "prompt"]):
        pass
    hd.deltas(model)["prompt"].detach()
    hd.attach(model, hd.LNTuningConfig(), name="ln")
    with pytest.raises(hd.UnsupportedModuleError, match="weight"), hd.route(model, ["ln", "lora0"]):
        pass


def test_wrong_row_count_nesting_and_lifecycle_changes_are_refused():
    model, inputs = _two()
    before = main_output(model(**inputs))
    with hd.route(model, ["lora0", "lora1", None]):
        with pytest.raises(hd.RoutingError, match="3 names but"):
            model(**inputs)
        with pytest.raises(hd.RoutingError, match="do not nest"), hd.route(model, ["lora0", "lora1"]):
            pass
        with pytest.raises(hd.HookdeltaError, match="route"):
            hd.deltas(model)["lora0"].disable()
    assert hd.deltas(model)["lora0"].enabled
    torch.testing.assert_close(main_output(model(**inputs)), before, rtol=0, atol=0)
    with pytest.raises(hd.RoutingError):
        model(**inputs, adapter_names=["lora0"] * 3)
    torch.testing.assert_close(main_output(model(**inputs)), before, rtol=0, atol=0)


def test_detach_after_routing_restores_the_model():
    model, inputs, targets = build("llama")
    snap = snapshot(model)
    _attach(model, ["lora", "dora"], targets)
    with torch.no_grad(), hd.route(model, ["lora0", "dora1"]):
        model(**_batch(inputs, 2))
    for delta in list(hd.deltas(model).values())[::-1]:
        delta.detach()
    assert_restored(model, snap)


def test_a_factor_written_without_a_trace_shows_in_the_next_routed_call():
    """Inside one hd.route block, a write through `.data` (EMA code, 8-bit optimizers) changes a
    LoRA factor without touching its version counter or storage; the next routed forward must
    use the new values (the gathered tables are made per call, never kept)."""
    model, inputs, targets = build("llama")
    names = _attach(model, ["lora", "lora"], targets)
    rows = [names[0], names[1], None, names[0]]
    inputs = _batch(inputs, len(rows))
    with torch.no_grad(), hd.route(model, rows):
        main_output(model(**inputs))
        for p in hd.deltas(model)[names[0]].parameters():
            p.data.mul_(-3.0)
        got = main_output(model(**inputs))
    torch.testing.assert_close(got, _reference(model, inputs, rows), rtol=1e-5, atol=1e-5)


CATALOGUE = {
    "hira": lambda: hd.HiRAConfig(r=2),
    "delora": lambda: hd.DeLoRAConfig(r=2),
    "gralora": lambda: hd.GraLoRAConfig(r=2, gralora_k=2),
    "miss": lambda: hd.MiSSConfig(r=4),
    "c3a": lambda: hd.C3AConfig(block_size=8),
    "hra": lambda: hd.HRAConfig(r=2),
    "road": lambda: hd.RoAdConfig(group_size=8),
    "adalora": lambda: hd.AdaLoRAConfig(init_r=2, target_r=1),
    "vblora": lambda: hd.VBLoRAConfig(r=2, vector_length=8, num_vectors=8),
    "randlora": lambda: hd.RandLoRAConfig(r=8),
    "shira": lambda: hd.SHiRAConfig(r=2),
    "fourierft": lambda: hd.FourierFTConfig(n_frequency=20),
}


@pytest.mark.parametrize("kind", list(CATALOGUE))
def test_the_catalogue_methods_route_per_row(kind):
    model, inputs, _ = build("llama")
    perturb(hd.attach(model, CATALOGUE[kind](), name="a"), std=0.2, seed=1)
    perturb(hd.attach(model, hd.LoRAConfig(r=2), name="b"), std=0.2, seed=2)
    rows = ["a", "b", None, "a"]
    inputs = _batch(inputs, len(rows))
    want = _reference(model, inputs, rows)
    with torch.no_grad(), hd.route(model, rows):
        got = main_output(model(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want[0] - want[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: hd.LilyConfig(r=2), "whole batch"),
        (lambda: hd.LlamaAdapterConfig(adapter_layers=1), "position embeddings"),
    ],
    ids=["lily", "llama_adapter"],
)
def test_methods_that_read_the_whole_batch_refuse_routing_and_say_why(make, why):
    model, inputs, _ = build("llama")
    hd.attach(model, make(), name="a")
    hd.attach(model, hd.LoRAConfig(r=2), name="b")
    with pytest.raises(hd.UnsupportedModuleError, match=why), hd.route(model, ["a", "b"]):
        model(**_batch(inputs, 2))
