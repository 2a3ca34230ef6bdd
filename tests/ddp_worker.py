"""Run by tests/test_ecosystem.py under `torchrun --nproc_per_node=2` (gloo, CPU): trains a
LoRA delta with DDP on different data per rank, then checks the delta is identical on both
ranks and the loss fell. Rank 0 writes the verdict as JSON to argv[1]."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
import hookdelta as hd  # noqa: E402
from tiny_models import build  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model, _, _ = build("llama")  # same seed: same base and same fresh delta on every rank
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"], also_train="lm_head"))
    model.train()
    ddp = DDP(model)
    opt = torch.optim.AdamW(delta.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    batch = torch.randint(3, 96, (4, 8), generator=g)
    losses = []
    for _ in range(8):
        loss = ddp(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in delta.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    base_frozen = all(not p.requires_grad for n, p in model.named_parameters() if "_hookdelta" not in n)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"identical": all(torch.equal(gathered[0], t) for t in gathered[1:]),
                       "first": losses[0], "last": losses[-1], "base_frozen": base_frozen}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
