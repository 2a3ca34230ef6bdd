"""Distributed row (issue 26): one FSDP2 training step of a LoRA, hookdelta against PEFT under
the same engine and config, on 1, 2 and 4 gloo processes on this CPU.

    python -m benchmarks.distributed            # about 5 minutes on 2 cores
    python -m benchmarks.distributed --repeats 1 --sizes 1,2

For every process count the two contenders alternate, `--repeats` launches each; a launch times
`--steps` steps after two warm-up steps and reports the median step time on rank 0 and the peak
resident memory of each rank (ru_maxrss: the whole process, torch included). The table gives the
medians over launches and hookdelta / PEFT ratios. With more processes than cores the step time
measures the machine's oversubscription as much as the libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
BATCH, SEQ = 8, 64  # the global batch, split over the ranks


def worker(library: str, steps: int, out: str) -> None:
    """One launch: FSDP2 on every decoder layer and the root, LoRA r=8 on q/k/v/o, AdamW."""
    import torch
    import torch.distributed as dist
    import transformers as tf
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if library == "hookdelta":
        import hookdelta as hd

        params = hd.attach(model, hd.LoRAConfig(r=8, targets=targets)).parameters()
        net = model
    else:
        import peft

        net = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets))
        params = [p for p in net.parameters() if p.requires_grad]
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.AdamW(list(params), lr=1e-3)
    batch = torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = batch.chunk(world)[rank]
    times = []
    for step in range(steps + 2):
        dist.barrier()
        start = time.perf_counter()
        loss = net(input_ids=mine, labels=mine).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step_ms": statistics.median(times) * 1000, "peak_mb": [p.item() for p in peaks]}, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(library: str, world: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                os.path.abspath(__file__),
                "--worker",
                library,
                str(steps),
                out,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if run.returncode != 0:
            raise RuntimeError(f"{library} on {world} processes failed:\n{run.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    rows = []
    for world in [int(n) for n in a.sizes.split(",")]:
        runs: dict[str, list[dict]] = {"hookdelta": [], "peft": []}
        for _ in range(a.repeats):  # interleaved: the machine's drift hits both alike
            for library in runs:
                runs[library].append(launch(library, world, a.steps))
        med = {
            lib: (statistics.median(r["step_ms"] for r in rs), statistics.median(max(r["peak_mb"]) for r in rs))
            for lib, rs in runs.items()
        }
        rows.append((world, med))
    print(
        "| processes | hookdelta step (ms) | PEFT step (ms) | step hookdelta/PEFT | peak RSS per rank, hookdelta / PEFT (MB) |"
    )
    print("|---|---|---|---|---|")
    for world, med in rows:
        (h_ms, h_mb), (p_ms, p_mb) = med["hookdelta"], med["peft"]
        print(f"| {world} | {h_ms:.1f} | {p_ms:.1f} | {h_ms / p_ms:.3f} | {h_mb:.0f} / {p_mb:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
