"""Run by tests/test_ecosystem.py under `torchrun --nproc_per_node=2` (gloo, CPU): trains a
LoRA delta with DDP or FSDP2 (`fully_shard`) on different data per rank, then checks the
first loss equals the unwrapped model's, the loss fell, and the delta is identical on both
ranks. Rank 0 writes the verdict as JSON to argv[1]; argv[2] is "ddp" or "fsdp".

"ddp_toggle" trains two deltas and disables the second on odd steps: plain DDP must fail
with its own error naming find_unused_parameters, and DDP(find_unused_parameters=True) must
train both deltas identically on every rank."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
from internals import leave  # noqa: E402
from tiny_models import build  # noqa: E402

import hookdelta as hd  # noqa: E402


def toggle(rank: int) -> dict:
    model, _, _ = build("llama")
    first = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj"]))
    second = hd.attach(model, hd.LoRAConfig(r=4, targets=["v_proj"]))
    model.train()
    batch = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(100 + rank))
    verdict = {}
    for find_unused in (False, True):
        wrapped = DDP(model, find_unused_parameters=find_unused)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        try:
            for step in range(6):
                if step % 2:
                    second.disable()
                loss = wrapped(input_ids=batch, labels=batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                second.enable()
                losses.append(loss.item())
        except RuntimeError as exc:
            second.enable()
            verdict["plain_error"] = str(exc)
            continue
        verdict["losses"] = losses
    flat = torch.cat([p.detach().reshape(-1) for d in (first, second) for p in d.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    verdict["identical"] = all(torch.equal(gathered[0], t) for t in gathered[1:])
    return verdict


def finish() -> None:
    # every rank reaches this point before any tears gloo down: a rank that destroyed the group
    # while the other still had work in flight aborted now and then ("terminate called without
    # an active exception")
    dist.barrier()
    dist.destroy_process_group()
    leave()


def main() -> None:
    dist.init_process_group("gloo")
    rank, mode = dist.get_rank(), sys.argv[2]
    if mode == "ddp_toggle":
        verdict = toggle(rank)
        if rank == 0:
            with open(sys.argv[1], "w") as f:
                json.dump(verdict, f)
        finish()
        return
    torch.set_num_threads(1)
    model, _, _ = build("llama")  # same seed: same base and same fresh delta on every rank
    delta = hd.attach(model, hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"], also_train="lm_head"))
    model.train()
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    batch = torch.randint(3, 96, (4, 8), generator=g)
    with torch.no_grad():
        unwrapped = model(input_ids=batch, labels=batch).loss.item()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = DDP(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = wrapped(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in delta.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in full])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(
                {
                    "identical": all(torch.equal(gathered[0], t) for t in gathered[1:]),
                    "first": losses[0],
                    "last": losses[-1],
                    "unwrapped": unwrapped,
                },
                f,
            )
    finish()


if __name__ == "__main__":
    main()
