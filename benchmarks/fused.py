"""Rows of issues 15 and 24. B13: the unmerged LoRA path before issue 15 (A GEMM, scale, B GEMM, then an
output-wide add) against today's (the add inside the B GEMM, in place where safe), in the same
run, with PEFT, the bare model and the floor: the bare model plus the least extra memory traffic
any unfused LoRA needs, at this machine's measured bandwidth; and today's path with sibling
grouping (q/k/v and gate/up sharing one A GEMM) against the same path with it off. B14: decoding at batch 1. B15: a
torch.compile'd forward."""

from __future__ import annotations

import copy
import dataclasses
import time
import types
from typing import Any

import torch
import torch.nn.functional as F

import hookdelta as hd
from hookdelta import ops
from hookdelta.engine import first_hook_is_ours, first_input
from hookdelta.methods.lora_layers import LoRALinear
from hookdelta.shared_input import SharedInput

from .common import TARGET, Profile, Row, Stats, close, forward, interleave, lora_contenders, sync, token_ids


def _before(self: LoRALinear, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """LoRALinear.post_forward as it was before issue 15."""
    x = self.drop(module, first_input(args, kwargs))
    delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scale, self.lora_B)
    return output + delta.to(output.dtype)


def as_before(delta: Any) -> None:
    _patch(delta, _before)


class _KeptStack(SharedInput):
    """SharedInput as it was at 11c95c4 (before issue 24): without autograd the stacked A's were
    kept while every factor was the same tensor at the same version and storage. Unsound (a
    fused optimizer step or a `.data` write changes a factor without a trace): here only to
    measure what dropping it cost."""

    def product(self, member: Any, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().product(member, x)
        factors = [m._parameters[self.factor] for m in self.members]
        kept = getattr(self, "kept", None)
        if not (
            kept is not None
            and all(
                k is f and f._version == v and f.data_ptr() == d for (k, v, d), f in zip(kept[0], factors, strict=True)
            )
        ):
            self.kept = kept = (tuple((f, f._version, f.data_ptr()) for f in factors), torch.cat(factors))
        return F.linear(x, kept[1]).split([f.shape[0] for f in factors], dim=-1)[self.index[member]]


def _with_owned(owned: bool | None) -> Any:
    """LoRALinear.post_forward with the in-place decision fixed: True, the add in place also under
    autograd (as at 11c95c4, unsound under selective checkpointing); False, never in place."""

    def post_forward(self: LoRALinear, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.drop(module, first_input(args, kwargs))
        a, b = self._parameters["lora_A"], self._parameters["lora_B"]
        group = self.siblings
        t = group.product(self, x) if group is not None and not x.is_inference() else F.linear(x, a)
        return ops.lowrank_add(output, t, b, self.scale, first_hook_is_ours(module) if owned else False)

    return post_forward


def _patch(delta: Any, post_forward: Any) -> None:
    """Every plain LoRALinear piece of the delta runs `post_forward` instead of its own."""
    for piece in delta.pieces.values():
        if type(piece) is LoRALinear:
            object.__setattr__(piece, "post_forward", types.MethodType(post_forward, piece))


def out_of_place(delta: Any) -> None:
    """Every LoRA add out of place, also without autograd: what the in-place add saves."""
    _patch(delta, _with_owned(False))


def as_11c95c4(delta: Any) -> None:
    """The hot path before issue 24's soundness fixes, for measuring their cost in one run."""
    groups: dict[int, _KeptStack] = {}
    for piece in delta.pieces.values():
        if type(piece) is LoRALinear and piece.siblings is not None:
            old = piece.siblings
            piece.siblings = groups.setdefault(id(old), _KeptStack(old.members))
    _patch(delta, _with_owned(True))


def siblings_off(delta: Any) -> None:
    """Every LoRA layer computes its own A GEMM (no sibling grouping)."""
    for piece in delta.pieces.values():
        if getattr(piece, "siblings", None) is not None:
            piece.siblings = None


def _forward_no_grad(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    def call() -> None:  # grouping is off under inference_mode (no version counters): time it here
        with torch.no_grad():
            model(input_ids=ids)

    return call


def bandwidth(megabytes: int = 256) -> float:
    """Bytes per second of a large copy (read + write), the median of 5."""
    src = torch.empty(megabytes * 2**20 // 4, device=TARGET["device"])
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / sorted(times)[2]


def floor_extra(delta: Any, tokens: int, per_second: float) -> float:
    """Seconds of the least extra traffic of an unfused LoRA per forward: read each layer's input
    once more, write and read the r-wide product, read and write the output once."""
    total = 0
    for piece in delta.pieces.values():
        r, width_in = piece.lora_A.shape
        width_out = piece.lora_B.shape[0]
        total += tokens * (width_in + 2 * r + 2 * width_out) * piece.lora_A.element_size()
    return total / per_second


def _train_step(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    params = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def b13_before_after(p: Profile) -> Row:
    bare, after, delta, theirs = lora_contenders(p)
    before, alone, kept = copy.deepcopy(after), copy.deepcopy(after), copy.deepcopy(after)
    as_before(hd.deltas(before)[delta.name])
    siblings_off(hd.deltas(alone)[delta.name])
    as_11c95c4(hd.deltas(kept)[delta.name])
    ids = token_ids(p)
    for m in (after, before, alone, kept):  # the first call after an attach is a watched one
        forward(m, ids)()
    fns = {
        "bare": forward(bare, ids),
        "before": forward(before, ids),
        "after": forward(after, ids),
        "peft": forward(theirs, ids),
        "11c95c4": forward(kept, ids),
        "after, no_grad": _forward_no_grad(after, ids),
        "siblings off, no_grad": _forward_no_grad(alone, ids),
        "bare, no_grad": _forward_no_grad(bare, ids),
        "11c95c4, no_grad": _forward_no_grad(kept, ids),
    }
    row = Row(
        "B13",
        "unmerged LoRA r=8 all-linear: the path before issue 15 and now, same run, and the floor",
        f"Llama {p.layers}x{p.width}, batch {p.batch}x{p.seq}; forward under inference_mode; training step with AdamW",
    )
    row.times = interleave(fns, p.rounds, p.calls)
    extra = floor_extra(delta, p.batch * p.seq, bandwidth())
    row.times["floor"] = Stats(
        row.times["bare"].median + extra, row.times["bare"].low + extra, row.times["bare"].high + extra, 0
    )
    row.ratio("after", "bare", 1.05)
    row.ratio("after", "peft", 0.95)
    row.ratio("before", "bare")
    row.ratio("before", "peft")
    row.ratio("after", "before")
    row.ratio("after", "floor", note="the least extra traffic of an unfused LoRA at the measured bandwidth")
    row.ratio("after, no_grad", "siblings off, no_grad")
    row.ratio("after, no_grad", "bare, no_grad")
    row.ratio("after", "11c95c4", note="issue 24's soundness fixes: no kept stack, no in-place add under autograd")
    row.ratio("after, no_grad", "11c95c4, no_grad")
    for m in (after, before, theirs, alone, kept):
        m.train()
    trains = {
        "train before": _train_step(before, ids),
        "train after": _train_step(after, ids),
        "train peft": _train_step(theirs, ids),
        "train siblings off": _train_step(alone, ids),
        "train 11c95c4": _train_step(kept, ids),
    }
    row.times.update(interleave(trains, max(3, p.rounds // 2), 1))
    row.ratio("train after", "train peft", 0.92)
    row.ratio("train after", "train before")
    row.ratio("train after", "train siblings off")
    row.ratio("train after", "train 11c95c4")
    with torch.inference_mode():
        same = close(after(input_ids=ids).logits, before(input_ids=ids).logits)
    row.checks["same logits before and after"] = bool(same)
    with torch.no_grad():
        same = close(after(input_ids=ids).logits, alone(input_ids=ids).logits)
    row.checks["same logits with siblings on and off"] = bool(same)
    return row


def _generator(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, **kw: Any) -> Any:
    """A call that greedily generates exactly `tokens` tokens after `prompt` (and returns them)."""

    def call() -> Any:
        return model.generate(
            input_ids=prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kw
        )

    return call


def b14_decode(p: Profile) -> Row:
    """Generating 64 tokens at batch 1: launch-bound on a GPU (kernels per site matter most).
    Called as users call it, so under generate()'s own no_grad (where sibling grouping works)."""
    bare, ours, delta, theirs = lora_contenders(p)
    merged_ours, merged_theirs, alone = copy.deepcopy(ours), copy.deepcopy(theirs), copy.deepcopy(ours)
    kept, copying = copy.deepcopy(ours), copy.deepcopy(ours)
    hd.deltas(merged_ours)[delta.name].merge()
    siblings_off(hd.deltas(alone)[delta.name])
    as_11c95c4(hd.deltas(kept)[delta.name])
    out_of_place(hd.deltas(copying)[delta.name])
    merged_theirs.merge_adapter()
    prompt = token_ids(p)[:1, :16]
    tokens = 64 if p.name != "smoke" else 4

    def generate(model: torch.nn.Module) -> Any:  # as users call it: under generate()'s own no_grad
        return _generator(model, prompt, tokens)

    models = {
        "bare": bare,
        "hookdelta": ours,
        "peft": theirs,
        "hookdelta merged": merged_ours,
        "peft merged": merged_theirs,
        "hookdelta, siblings off": alone,
        "11c95c4": kept,
        "hookdelta, no in-place add": copying,
    }
    for m in (ours, alone, kept, copying):
        generate(m)()  # (the watched first call)
    row = Row(
        "B14",
        f"decode: generate {tokens} tokens at batch 1, LoRA r=8 all-linear, unmerged and merged",
        f"Llama {p.layers}x{p.width}, prompt 16 tokens, greedy, KV cache",
    )
    row.times = interleave({k: generate(m) for k, m in models.items()}, max(3, p.rounds // 3), 1)
    row.ratio("hookdelta", "bare")
    row.ratio("peft", "bare")
    row.ratio("hookdelta", "peft")
    row.ratio("hookdelta merged", "bare", 1.01)
    row.ratio("peft merged", "bare")
    row.ratio("hookdelta", "hookdelta, siblings off")
    row.ratio("hookdelta", "11c95c4", note="issue 24's soundness fixes: no kept stack")
    row.ratio("hookdelta", "hookdelta, no in-place add", note="what the in-place add (no autograd only) saves")
    row.checks["same tokens as 11c95c4's path"] = bool(torch.equal(generate(ours)(), generate(kept)()))
    return row


def b15_compiled_prefill(p: Profile) -> Row:
    """torch.compile'd forward (4 layers), hookdelta and PEFT against the compiled bare model."""
    layers = min(p.layers, 4)
    bare, ours, delta, theirs = lora_contenders(dataclasses.replace(p, layers=layers))
    ids = token_ids(p)
    forward(ours, ids)()  # (the watched first call, before compiling)
    torch._dynamo.reset()
    compiled = {k: torch.compile(m) for k, m in (("bare", bare), ("hookdelta", ours), ("peft", theirs))}
    row = Row(
        "B15",
        "compiled prefill: torch.compile'd forward, LoRA r=8 all-linear",
        f"Llama {layers}x{p.width}, batch {p.batch}x{p.seq}; compile time not counted (warm-up)",
    )
    row.times = interleave({k: forward(m, ids) for k, m in compiled.items()}, p.rounds, p.calls, warmup=2)
    row.ratio("hookdelta", "bare")
    row.ratio("peft", "bare")
    row.ratio("hookdelta", "peft")
    with torch.inference_mode():
        same = close(compiled["hookdelta"](input_ids=ids).logits, compiled["peft"](input_ids=ids).logits)
    row.checks["same logits as peft"] = bool(same)
    torch._dynamo.reset()
    return row


def b16_compiled_decode(p: Profile) -> Row:
    """Decoding with a static KV cache and transformers' own compile of the forward (CUDA graphs
    on a GPU, `mode="reduce-overhead"`): the launch-bound case with the launches captured. The
    unmerged LoRA hooks trace into the graph (no graph break); tokens must equal eager ones."""
    from transformers import CompileConfig

    layers = min(p.layers, 4)
    bare, ours, delta, theirs = lora_contenders(dataclasses.replace(p, layers=layers))
    prompt = token_ids(p)[:1, :16]
    tokens = 64 if p.name != "smoke" else 4
    config = CompileConfig()
    config._compile_all_devices = True  # transformers compiles on its own only on accelerators

    def generate(model: torch.nn.Module, compiled: bool = True) -> Any:
        kw = {"cache_implementation": "static", "compile_config": config} if compiled else {"disable_compile": True}
        return _generator(model, prompt, tokens, **kw)

    torch._dynamo.reset()
    models = {"bare": bare, "hookdelta": ours, "peft": theirs}
    row = Row(
        "B16",
        f"compiled decode: generate {tokens} tokens at batch 1 with a static cache and transformers' "
        "compile of the forward, LoRA r=8 all-linear unmerged",
        f"Llama {layers}x{p.width}, prompt 16 tokens, greedy; compile time not counted (warm-up)",
    )
    row.times = interleave({k: generate(m) for k, m in models.items()}, p.rounds, 1, warmup=2)
    row.ratio("hookdelta", "bare")
    row.ratio("peft", "bare")
    row.ratio("hookdelta", "peft")
    compiled_tokens, eager_tokens = generate(ours)(), generate(ours, compiled=False)()
    row.checks["same tokens as eager"] = bool(torch.equal(compiled_tokens, eager_tokens))
    row.checks["the LoRA changes the tokens"] = not torch.equal(compiled_tokens, generate(bare, compiled=False)())
    row.checks["no graph break"] = not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()
    return row


ROWS = [b13_before_after, b14_decode, b15_compiled_prefill, b16_compiled_decode]
