"""Run by tests/test_distributed.py under `torch.distributed.run` (2 processes, gloo, CPU): every
lifecycle call of a LoRA under FSDP2 (`fully_shard` on each decoder layer and the root), against
one plain process on the same global batch. Rank 0 writes the verdict as JSON to argv[1]; argv[2]
is a folder for the saves."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
import hookdelta as hd  # noqa: E402
from tiny_models import build  # noqa: E402

STEPS, LR = 3, 1e-2
CONFIG = hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"])


def shard(model):
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def whole(tensors) -> list[torch.Tensor]:
    """Every tensor's whole value (collective for DTensors: every rank, same order)."""
    return [(t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for t in tensors]


def main() -> None:
    out, folder = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, _, _ = build("llama")
    model.config.use_cache = False
    delta = hd.attach(model, CONFIG)
    reference = copy.deepcopy(model)
    ref_delta = hd.deltas(reference)["lora"]
    batch = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(7))
    mine = batch.chunk(world)[rank]
    ref_opt = torch.optim.AdamW(ref_delta.parameters(), lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        loss = reference(input_ids=batch, labels=batch).loss
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    shard(model)
    opt = torch.optim.AdamW(delta.parameters(), lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        loss = model(input_ids=mine, labels=mine).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = [n for n, _ in delta.named_parameters()]
    trained = dict(zip(names, whole(delta.parameters())))
    want = dict(ref_delta.named_parameters())
    verdict = {"sharded": all(hasattr(p, "full_tensor") for p in model.parameters()),
               "train_max_diff": max((trained[n] - want[n]).abs().max().item() for n in want)}
    model.eval()

    def loss_now() -> float:
        with torch.no_grad():
            return model(input_ids=batch, labels=batch).loss.item()

    unmerged = loss_now()
    with torch.no_grad():
        ref_delta.load_tensors(delta.tensors())
        verdict["reference_loss_diff"] = abs(reference(input_ids=batch, labels=batch).loss.item() - unmerged)
        with ref_delta.disabled():
            bare = reference(input_ids=batch, labels=batch).loss.item()
    delta.save(os.path.join(folder, "sharded"), overwrite=True)
    delta.save_peft(os.path.join(folder, "sharded-peft"), overwrite=True)
    if rank == 0:
        ref_delta.save(os.path.join(folder, "plain"), overwrite=True)
        ref_delta.save_peft(os.path.join(folder, "plain-peft"), overwrite=True)
    dist.barrier()

    with delta.disabled():
        verdict["disabled_loss_diff"] = abs(loss_now() - bare)
    verdict["enabled_loss_diff"] = abs(loss_now() - unmerged)
    with hd.route(model, ["lora", None, "lora", None]):
        with torch.no_grad():
            routed = model(input_ids=batch).logits
    with torch.no_grad():
        plain_on = reference(input_ids=batch).logits
        with ref_delta.disabled():
            plain_off = reference(input_ids=batch).logits
    expect = torch.stack([plain_on[0], plain_off[1], plain_on[2], plain_off[3]])
    verdict["route_max_diff"] = (routed - expect).abs().max().item()

    base = [p for n, p in model.named_parameters() if "_hookdelta" not in n]
    before = whole(base)
    try:
        delta.merge()
        verdict["merged_loss_diff"] = abs(loss_now() - unmerged)
        verdict["merge_changed_weights"] = any(not torch.equal(a, b) for a, b in zip(whole(base), before))
        delta.unmerge()
        verdict["unmerge_exact"] = all(torch.equal(a, b) for a, b in zip(whole(base), before))
    except hd.MergeError as exc:
        verdict["merge_refused"] = str(exc)
        verdict["unchanged"] = not delta.merged and all(torch.equal(a, b) for a, b in zip(whole(base), before))

    # a saved delta loaded into another sharded model, then hot-swapped
    other, _, _ = build("llama")
    other.config.use_cache = False
    shard(other)
    loaded = hd.load(other, os.path.join(folder, "sharded"))
    with torch.no_grad():
        verdict["loaded_loss_diff"] = abs(other(input_ids=batch, labels=batch).loss.item() - unmerged)
        loaded.load_tensors({k: torch.zeros_like(v) for k, v in loaded.tensors().items()})
        verdict["zeroed_loss_diff"] = abs(other(input_ids=batch, labels=batch).loss.item() - bare)
    hd.load(other, os.path.join(folder, "sharded"), into="lora")
    with torch.no_grad():
        verdict["hotswap_loss_diff"] = abs(other(input_ids=batch, labels=batch).loss.item() - unmerged)
    # and into the trained sharded delta itself (its tensors are DTensors): each rank gets its shard
    hd.load(model, os.path.join(folder, "plain"), into="lora")
    verdict["hotswap_sharded_loss_diff"] = abs(loss_now() - unmerged)

    delta.detach()
    verdict["detach_exact"] = all(torch.equal(a, b) for a, b in zip(whole(base), before))
    verdict["detached_loss_diff"] = abs(loss_now() - bare)
    if rank == 0:
        verdict["files"] = {}
        for kind, name in (("hookdelta", "delta.safetensors"), ("peft", "adapter_model.safetensors")):
            suffix = "" if kind == "hookdelta" else "-peft"
            a = load_file(os.path.join(folder, "sharded" + suffix, name))
            b = load_file(os.path.join(folder, "plain" + suffix, name))
            verdict["files"][kind] = {"keys_equal": set(a) == set(b), "empty": [k for k, v in a.items() if v.numel() == 0],
                                      "bit_equal": set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)}
        with open(out, "w") as f:
            json.dump(verdict, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
