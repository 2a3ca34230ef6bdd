"""Unmerged LoRA forward: hookdelta vs PEFT vs the bare model, same tiny Llama, same run.

Contenders are timed in interleaved rounds (shuffled order each round) and the medians
compared as ratios; an absolute time alone means little on a shared machine.

    python -m benchmarks.lora_forward [--rounds 30] [--targets q_proj,v_proj]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import hookdelta as hd  # noqa: E402


def tiny_llama(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


def contenders(layers: int, width: int, r: int, targets: list[str]) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(layers, width)
    ours = copy.deepcopy(base)
    delta = hd.attach(ours, hd.LoRAConfig(r=r, alpha=2 * r, targets=targets[0] if targets == ["all-linear"] else targets))
    peft_targets = "all-linear" if targets == ["all-linear"] else targets  # PEFT wants the bare string
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=peft_targets))
    with torch.no_grad():  # same LoRA weights in both, so both do the same arithmetic
        for piece in delta.pieces.values():
            piece.lora_B.normal_(0, 0.02)
            peft_layer = theirs.base_model.model.get_submodule(piece.key)
            peft_layer.lora_A["default"].weight.copy_(piece.lora_A)
            peft_layer.lora_B["default"].weight.copy_(piece.lora_B)
    return {"bare": base, "hookdelta": ours, "peft": theirs.eval()}


def timed(model: torch.nn.Module, ids: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(calls):
            model(input_ids=ids)
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    targets = args.targets.split(",")
    models = contenders(args.layers, args.width, args.r, targets)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outs = {k: m(input_ids=ids).logits for k, m in models.items()}
    torch.testing.assert_close(outs["hookdelta"], outs["peft"], rtol=1e-4, atol=1e-4)  # same work, same answer
    for m in models.values():
        timed(m, ids, 2)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for _ in range(args.rounds):
        random.shuffle(order)
        for k in order:
            times[k].append(timed(models[k], ids, args.calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"LoRA r={args.r} on {targets}, Llama {args.layers}x{args.width}, batch {args.batch}x{args.seq}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:10s} median {v * 1e3:8.3f} ms/forward")
    print(f"  hookdelta / peft = {med['hookdelta'] / med['peft']:.3f}x   "
          f"hookdelta / bare = {med['hookdelta'] / med['bare']:.3f}x   peft / bare = {med['peft'] / med['bare']:.3f}x")


if __name__ == "__main__":
    main()
