"""Run by tests/test_distributed.py under `torch.distributed.run` (2 processes, gloo, CPU): tensor
parallelism (DTensor `parallelize_module`, colwise q/k/v, rowwise o) is refused clearly, whether the
delta was attached before parallelizing (at the next forward) or after (at attach, leaving the model
as it was). Rank 0 writes the verdict as JSON to argv[1]."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, os.path.dirname(__file__))
import hookdelta as hd  # noqa: E402
from tiny_models import build  # noqa: E402

PLAN = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel()}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batch = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(7))
    verdict = {}
    model, _, _ = build("llama")
    hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "o_proj"]))
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, PLAN)
    try:
        with torch.no_grad():
            model(input_ids=batch)
        verdict["before"] = "ran"
    except hd.UnsupportedModuleError as exc:
        verdict["before"] = str(exc)
    other, _, _ = build("llama")
    for layer in other.model.layers:
        parallelize_module(layer.self_attn, mesh, PLAN)
    names = [n for n, _ in other.named_modules()]
    try:
        hd.attach(other, hd.LoRAConfig(r=4, targets=["q_proj"]))
        verdict["after"] = "attached"
    except hd.UnsupportedModuleError as exc:
        verdict["after"] = str(exc)
    verdict["untouched"] = [n for n, _ in other.named_modules()] == names and not hd.deltas(other)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(verdict, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
