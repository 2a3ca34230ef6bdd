"""Run by tests/test_distributed.py under `torch.distributed.run` (1 or 2 processes, gloo, CPU):
every lifecycle call of a LoRA under DeepSpeed ZeRO-3 with every parameter partitioned
(`stage3_param_persistence_threshold=0`), against one plain process on the same global batch.
Rank 0 writes the verdict as JSON to argv[1]; argv[2] is a folder for the saves."""

import copy
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import hookdelta as hd  # noqa: E402
from tiny_models import build  # noqa: E402

STEPS, LR = 3, 1e-2
CONFIG = hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"])


def ds_config(world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}}}


def gathered(params) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(params)):
        return [p.detach().clone() for p in params]


def main() -> None:
    out, folder = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, _, _ = build("llama")
    model.config.use_cache = False
    delta = hd.attach(model, CONFIG)
    reference = copy.deepcopy(model)  # one plain process: the same model and delta, the whole batch
    ref_delta = hd.deltas(reference)["lora"]
    batch = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(7))
    mine = batch.chunk(world)[rank]
    ref_opt = torch.optim.AdamW(ref_delta.parameters(), lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        loss = reference(input_ids=batch, labels=batch).loss
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config(world),
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    verdict = {"partitioned": all(p.numel() == 0 for p in model.parameters())}
    for _ in range(STEPS):
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
    trained = dict(zip([n for n, _ in delta.named_parameters()], gathered(list(delta.parameters()))))
    want = dict(ref_delta.named_parameters())
    verdict["train_max_diff"] = max((trained[n] - want[n]).abs().max().item() for n in want)

    def loss_now() -> float:
        with torch.no_grad():
            return engine(input_ids=batch, labels=batch).loss.item()

    engine.eval()
    unmerged = loss_now()
    with torch.no_grad():  # the reference takes the sharded run's values: its save is what one process writes
        ref_delta.load_tensors({k: v for k, v in delta.tensors().items()})
        verdict["reference_loss_diff"] = abs(reference(input_ids=batch, labels=batch).loss.item() - unmerged)
    delta.save(os.path.join(folder, "sharded"), overwrite=True)
    delta.save_peft(os.path.join(folder, "sharded-peft"), overwrite=True)
    if rank == 0:
        ref_delta.save(os.path.join(folder, "plain"), overwrite=True)
        ref_delta.save_peft(os.path.join(folder, "plain-peft"), overwrite=True)
    dist.barrier()

    bare = reference_bare(reference, batch)
    with delta.disabled():
        verdict["disabled_loss_diff"] = abs(loss_now() - bare)
    verdict["enabled_loss_diff"] = abs(loss_now() - unmerged)
    with torch.no_grad():
        with hd.route(model, ["lora", None, "lora", None]):
            routed = engine(input_ids=batch).logits
        plain_on = reference(input_ids=batch).logits
        with ref_delta.disabled():
            plain_off = reference(input_ids=batch).logits
    expect = torch.stack([plain_on[0], plain_off[1], plain_on[2], plain_off[3]])
    verdict["route_max_diff"] = (routed - expect).abs().max().item()

    base = [p for n, p in model.named_parameters() if "_hookdelta" not in n]
    before = gathered(base)
    delta.merge()
    verdict["merged_loss_diff"] = abs(loss_now() - unmerged)
    verdict["merge_changed_weights"] = any(not torch.equal(a, b) for a, b in zip(gathered(base), before))
    delta.unmerge()
    verdict["unmerge_exact"] = all(torch.equal(a, b) for a, b in zip(gathered(base), before))
    verdict["unmerged_loss_diff"] = abs(loss_now() - unmerged)

    # a saved delta loaded into another ZeRO-3 model (attached after sharding), then hot-swapped
    other, _, _ = build("llama")
    other.config.use_cache = False
    other_engine, _, _, _ = deepspeed.initialize(model=other, config={k: v for k, v in ds_config(world).items()
                                                                           if k != "optimizer"})
    loaded = hd.load(other, os.path.join(folder, "sharded"))
    with torch.no_grad():
        verdict["loaded_loss_diff"] = abs(other_engine(input_ids=batch, labels=batch).loss.item() - unmerged)
        loaded.load_tensors({k: torch.zeros_like(v) for k, v in loaded.tensors().items()})
        verdict["zeroed_loss_diff"] = abs(other_engine(input_ids=batch, labels=batch).loss.item() - bare)
    hd.load(other, os.path.join(folder, "sharded"), into="lora")
    with torch.no_grad():
        verdict["hotswap_loss_diff"] = abs(other_engine(input_ids=batch, labels=batch).loss.item() - unmerged)

    delta.detach()
    verdict["detach_exact"] = all(torch.equal(a, b) for a, b in zip(gathered(base), before))
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


def reference_bare(reference, batch) -> float:
    with torch.no_grad(), hd.deltas(reference)["lora"].disabled():
        return reference(input_ids=batch, labels=batch).loss.item()


if __name__ == "__main__":
    main()
