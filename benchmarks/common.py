"""What every benchmark row shares: the sizes of a run, the models, interleaved timing,
training-memory accounting, and the row record that run.py prints and saves."""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers as tf  # noqa: E402

# the tests' helpers: one definition of "give a fresh delta real values" (zero-initialized B
# would let a contender skip work) for the tests and the timings
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import perturb  # noqa: E402


@dataclass(frozen=True)
class Profile:
    """The sizes of one run. `full` is what RESULTS.md holds; `quick` keeps the shapes smaller
    and the repeats fewer (~2 min); `smoke` only proves the code runs (seconds)."""

    name: str
    layers: int  # Llama/BERT blocks for the forward and training rows
    width: int
    batch: int
    seq: int
    rounds: int  # interleaved rounds per row (each contender once per round, shuffled)
    calls: int  # calls timed together in one sample
    deep_layers: int  # the attach/detach row (B5)
    switch_rounds: int
    finetune_steps: int  # B9
    finetune_test: int
    real_model: bool  # B9 on the real MiniLM and reviews; smoke uses a tiny BERT and made-up data


# where the models run: run.py's --device / --dtype set these (CPU fp32 unless asked)
TARGET = {"device": torch.device("cpu"), "dtype": torch.float32}


def configure(device: str, dtype: str) -> None:
    TARGET["device"], TARGET["dtype"] = torch.device(device), getattr(torch, dtype)


def place(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(device=TARGET["device"], dtype=TARGET["dtype"])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the precision of the run's dtype: elementwise 1e-4 in float32; in bf16/fp16, where
    every kernel order rounds differently and the rounding grows with depth, within 8% in norm.
    Measured on an H200 (Llama 16x2048, bf16): the bare model, hookdelta and PEFT each differ from
    their own fp32 logits by 2.4-2.7% in norm (hookdelta and PEFT agree exactly in fp32), while the
    benchmarks' LoRA moves the logits by over 100%."""
    a, b = a.float(), b.float()
    if TARGET["dtype"] == torch.float32:
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4))
    return bool((a - b).norm() <= 8e-2 * b.norm())


def dtype_name() -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[TARGET["dtype"]]


def sync() -> None:
    if TARGET["device"].type == "cuda":
        torch.cuda.synchronize()


PROFILES = {
    "full": Profile(
        "full",
        layers=8,
        width=512,
        batch=4,
        seq=128,
        rounds=21,
        calls=3,
        deep_layers=24,
        switch_rounds=200,
        finetune_steps=40,
        finetune_test=400,
        real_model=True,
    ),
    "quick": Profile(
        "quick",
        layers=4,
        width=512,
        batch=4,
        seq=64,
        rounds=9,
        calls=2,
        deep_layers=24,
        switch_rounds=50,
        finetune_steps=10,
        finetune_test=100,
        real_model=True,
    ),
    # one GPU (--device cuda --dtype bfloat16): a 1.1B Llama (TinyLlama's shape), batch 8x512
    "gpu": Profile(
        "gpu",
        layers=16,
        width=2048,
        batch=8,
        seq=512,
        rounds=15,
        calls=3,
        deep_layers=24,
        switch_rounds=100,
        finetune_steps=10,
        finetune_test=100,
        real_model=False,
    ),
    "gpu-quick": Profile(
        "gpu-quick",
        layers=4,
        width=2048,
        batch=8,
        seq=512,
        rounds=7,
        calls=2,
        deep_layers=8,
        switch_rounds=50,
        finetune_steps=5,
        finetune_test=50,
        real_model=False,
    ),
    "smoke": Profile(
        "smoke",
        layers=2,
        width=64,
        batch=2,
        seq=16,
        rounds=2,
        calls=1,
        deep_layers=3,
        switch_rounds=3,
        finetune_steps=2,
        finetune_test=8,
        real_model=False,
    ),
}


# -- models --------------------------------------------------------------------------------


def llama(layers: int, width: int, seed: int = 0) -> tf.LlamaForCausalLM:
    """A Llama of the given depth and width: random weights, 8 heads, GQA with 4 kv heads."""
    torch.manual_seed(seed)
    if width >= 2048:  # TinyLlama-1.1B's shape: 32 heads of 64, 4 kv heads, FFN 5632
        heads, kv, ffn = width // 64, 4, width * 11 // 4
    else:
        heads = 8 if width % 8 == 0 else 4
        kv, ffn = heads // 2, width * 8 // 3
    cfg = tf.LlamaConfig(
        vocab_size=2048 if width < 2048 else 32000,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
    )
    return place(tf.LlamaForCausalLM(cfg).eval())


def bert(layers: int, width: int, seed: int = 0) -> tf.BertModel:
    torch.manual_seed(seed)
    cfg = tf.BertConfig(
        vocab_size=2048,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=8 if width % 8 == 0 else 4,
        max_position_embeddings=512,
    )
    return place(tf.BertModel(cfg).eval())


def token_ids(p: Profile, vocab: int = 2048) -> torch.Tensor:
    ids = torch.randint(0, vocab, (p.batch, p.seq), generator=torch.Generator().manual_seed(0))
    return ids.to(TARGET["device"])


def peft_twin(model: torch.nn.Module, delta: Any, targets: Any, r: int = 8) -> torch.nn.Module:
    """PEFT's LoRA on a copy of `model`, holding exactly the hookdelta delta's A and B, so both
    libraries do the same arithmetic (asserted by the rows that time them)."""
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for piece in delta.pieces.values():
            layer = twin.base_model.model.get_submodule(piece.key)
            layer.lora_A["default"].weight.copy_(piece.lora_A)
            layer.lora_B["default"].weight.copy_(piece.lora_B)
    return twin.train(model.training)


ALL_LINEAR = dict(r=8, alpha=16, targets="all-linear")  # the LoRA most rows time


def lora_contenders(p: Profile, train: bool = False) -> tuple[torch.nn.Module, torch.nn.Module, Any, torch.nn.Module]:
    """(bare Llama, a copy with an all-linear LoRA r=8 attached, that delta, PEFT's twin)."""
    import hookdelta as hd

    bare = llama(p.layers, p.width).train(train)
    ours = copy.deepcopy(bare)
    delta = hd.attach(ours, hd.LoRAConfig(**ALL_LINEAR))
    perturb(delta, std=0.02)
    return bare, ours, delta, peft_twin(bare, delta, "all-linear")


def forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return call


# -- timing --------------------------------------------------------------------------------


@dataclass
class Stats:
    median: float  # seconds per call
    low: float
    high: float
    samples: int

    def as_dict(self) -> dict[str, float]:
        return {
            "median_ms": self.median * 1e3,
            "min_ms": self.low * 1e3,
            "max_ms": self.high * 1e3,
            "samples": self.samples,
        }


def interleave(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    calls: int = 1,
    warmup: int = 1,
    setup: Callable[[str], Any] | None = None,
) -> dict[str, Stats]:
    """Time each function `rounds` times, one sample of each per round in a shuffled order, so
    drift on a shared machine hits every contender alike. A sample is the mean of `calls` calls;
    `setup(name)` runs untimed before each sample."""
    for name, fn in fns.items():
        for _ in range(warmup):
            if setup:
                setup(name)
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            if setup:
                setup(name)
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            sync()  # (a CUDA call only queues its kernels)
            samples[name].append((time.perf_counter() - start) / calls)
    return {k: Stats(statistics.median(v), min(v), max(v), len(v)) for k, v in samples.items()}


# -- memory --------------------------------------------------------------------------------


def training_memory(
    step: Callable[[], torch.Tensor], trainable: list[torch.Tensor], weights: list[torch.Tensor] | None = None
) -> dict[str, int]:
    """Bytes a training step holds at its peak beyond the model's own weights: the tensors autograd
    saves for backward (each storage counted once; these are alive together when forward ends),
    plus the gradients and AdamW's two moment buffers of the trainable tensors. Exact and
    deterministic, unlike RSS, which the CPU allocator's caching blurs. `weights`: the model's own
    tensors, not counted when autograd saves them (a GEMM keeps its weight for the input's gradient)."""
    storages: dict[int, int] = {}
    own = {w.untyped_storage().data_ptr() for w in weights or []}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    params = sum(t.numel() * t.element_size() for t in trainable)
    return {
        "activations": sum(storages.values()),
        "grads_and_adamw": 3 * params,
        "total": sum(storages.values()) + 3 * params,
    }


# -- rows ----------------------------------------------------------------------------------


@dataclass
class Ratio:
    name: str  # "hookdelta / peft"
    value: float
    target: float | None = None  # met when the value, shown to 2 decimals, is <= target
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target is None else round(self.value, 2) <= self.target


@dataclass
class Row:
    id: str
    what: str
    setup: str
    times: dict[str, Stats] = field(default_factory=dict)
    unit: str = "ms"  # per call of what is timed
    ratios: list[Ratio] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # other measured columns
    checks: dict[str, bool] = field(default_factory=dict)  # non-ratio targets (bit-exact, <= 1 ms...)

    def ratio(self, num: str, den: str, target: float | None = None, note: str = "") -> None:
        self.ratios.append(Ratio(f"{num} / {den}", self.times[num].median / self.times[den].median, target, note))

    @property
    def met(self) -> bool | None:
        verdicts = [r.met for r in self.ratios if r.met is not None] + list(self.checks.values())
        return all(verdicts) if verdicts else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "what": self.what,
            "setup": self.setup,
            "unit": self.unit,
            "times": {k: v.as_dict() for k, v in self.times.items()},
            "ratios": [
                {"name": r.name, "value": r.value, "target": r.target, "met": r.met, "note": r.note}
                for r in self.ratios
            ],
            "extra": self.extra,
            "checks": self.checks,
            "met": self.met,
        }
