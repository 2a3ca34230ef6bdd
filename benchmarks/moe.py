"""Mixture-of-experts row (issue 27): a LoRA on fused expert tensors, hookdelta against PEFT's
`target_parameters` and the bare model, in one run.

    python -m benchmarks.moe               # about 4 minutes on 2 CPU cores
    python -m benchmarks.moe --rounds 5    # quicker, noisier

Two models on this CPU (transformers 5 keeps the experts fused, `mlp.experts.gate_up_proj`
[E, 2F, D] and `down_proj` [E, D, F]): the tiny Mixtral of the issue (8 experts, top-2, hidden 256,
batch 4×64) and a CPU-sized 8-expert one (hidden 512, 4 layers, batch 4×128). LoRA r=8 on both
expert tensors of every layer; PEFT's twin holds the same factors (its outputs are checked equal).
For each: the forward (no grad), one training step (forward, backward, AdamW on the factors), a
decode-sized forward (4 tokens), and the memory a training step holds (saved activations plus
gradients and AdamW state of the trainable tensors, counted exactly: benchmarks/common.py).
"hookdelta plain" is the same delta with every fast path off (`ops.plain()`: W + s·B·A built for
every expert at every call, as before issue 27). Medians of interleaved rounds; ratios in the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import transformers as tf

import hookdelta as hd
from benchmarks.common import interleave, perturb, training_memory
from hookdelta import ops
from hookdelta.methods.lora import peft_parameter_factors

MODELS = {
    "tiny Mixtral (8 experts, top-2, hidden 256, 2 layers), batch 4x64": (
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2),
        4,
        64,
    ),
    "8-expert model (hidden 512, 4 layers), batch 4x128": (
        dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4),
        4,
        128,
    ),
}
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def mixtral(sizes: dict) -> tf.MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        vocab_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        **sizes,
    )
    return tf.MixtralForCausalLM(cfg).eval()


def contenders(sizes: dict):
    import peft

    bare = mixtral(sizes)
    ours = copy.deepcopy(bare)
    delta = hd.attach(ours, hd.LoRAConfig(r=8, alpha=16, target_parameters=TARGETS))
    perturb(delta, std=0.02)
    twin = peft.get_peft_model(
        copy.deepcopy(bare), peft.LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=TARGETS)
    )
    model = twin.base_model.model
    with torch.no_grad():  # the same factors, in PEFT's layout
        for piece in delta.pieces.values():
            a, b = peft_parameter_factors(ours, piece.key, piece.lora_A, piece.lora_B, to_peft=True)
            owner, _, name = piece.key.rpartition(".")
            wrapper = model.get_submodule(owner)
            while getattr(wrapper, "parameter_name", name) != name:
                wrapper = wrapper.base_layer
            wrapper.lora_A["default"].weight.copy_(a)
            wrapper.lora_B["default"].weight.copy_(b)
    return bare, ours, delta, twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results/moe.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for title, (sizes, batch, seq) in MODELS.items():
        bare, ours, delta, twin = contenders(sizes)
        ids = torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(1))
        short = ids[:, :1]
        with torch.no_grad():
            same = torch.allclose(ours(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        if not same:
            raise SystemExit("hookdelta and PEFT disagree: the timings would compare different work")
        models = {"bare": bare, "hookdelta": ours, "hookdelta plain": ours, "peft": twin}

        def forward(name, x):
            model = models[name]

            def call():
                with torch.no_grad(), ops.plain() if name == "hookdelta plain" else _nothing():
                    model(input_ids=x)

            return call

        params = {
            "hookdelta": list(delta.parameters()),
            "hookdelta plain": list(delta.parameters()),
            "peft": [p for p in twin.parameters() if p.requires_grad],
        }
        opts = {k: torch.optim.AdamW(v, lr=1e-4) for k, v in params.items()}

        def step(name):
            model, opt = models[name], opts[name]

            def call():
                with ops.plain() if name == "hookdelta plain" else _nothing():
                    model.train()
                    loss = model(input_ids=ids).logits.float().square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    model.eval()

            return call

        fwd = interleave({k: forward(k, ids) for k in models}, rounds=args.rounds)
        dec = interleave({k: forward(k, short) for k in models}, rounds=args.rounds, calls=5)
        train = interleave({k: step(k) for k in params}, rounds=args.rounds)

        def held(name):
            model = models[name]
            with ops.plain() if name == "hookdelta plain" else _nothing():
                out = training_memory(
                    lambda: model(input_ids=ids).logits.float().square().mean(),
                    params[name],
                    weights=list(bare.parameters()) + list(model.parameters()),
                )
            model.zero_grad(set_to_none=True)
            return out["total"]

        memory = {k: held(k) for k in params}
        row = {
            "model": title,
            "forward_ms": {k: v.median * 1e3 for k, v in fwd.items()},
            "decode_ms": {k: v.median * 1e3 for k, v in dec.items()},
            "train_step_ms": {k: v.median * 1e3 for k, v in train.items()},
            "train_memory_mb": {k: v / 2**20 for k, v in memory.items()},
        }
        row["ratios"] = {
            "forward hookdelta / peft": row["forward_ms"]["hookdelta"] / row["forward_ms"]["peft"],
            "forward hookdelta / bare": row["forward_ms"]["hookdelta"] / row["forward_ms"]["bare"],
            "decode hookdelta / peft": row["decode_ms"]["hookdelta"] / row["decode_ms"]["peft"],
            "decode hookdelta / plain": row["decode_ms"]["hookdelta"] / row["decode_ms"]["hookdelta plain"],
            "train hookdelta / peft": row["train_step_ms"]["hookdelta"] / row["train_step_ms"]["peft"],
            "train hookdelta / plain": row["train_step_ms"]["hookdelta"] / row["train_step_ms"]["hookdelta plain"],
            "train memory hookdelta / peft": memory["hookdelta"] / memory["peft"],
        }
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"torch": torch.__version__, "transformers": tf.__version__, "rows": rows}, indent=1)
    )
    print(
        "\n| model | forward hd/PEFT | forward hd/bare | decode hd/PEFT | train step hd/PEFT | train step hd/plain "
        "| train memory hd/PEFT (MB) |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        q, m = r["ratios"], r["train_memory_mb"]
        print(
            f"| {r['model']} | {q['forward hookdelta / peft']:.2f} | {q['forward hookdelta / bare']:.2f} | "
            f"{q['decode hookdelta / peft']:.2f} | {q['train hookdelta / peft']:.2f} | "
            f"{q['train hookdelta / plain']:.2f} | {q['train memory hookdelta / peft']:.2f} "
            f"({m['hookdelta']:.0f} / {m['peft']:.0f}) |"
        )


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
