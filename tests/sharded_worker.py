"""Run by tests/test_distributed.py under `torch.distributed.run` (gloo, CPU): every lifecycle call
of a LoRA on a sharded engine, argv[3] "zero3" (DeepSpeed ZeRO-3, every parameter partitioned:
`stage3_param_persistence_threshold=0`) or "fsdp" (FSDP2 `fully_shard` on each decoder layer and
the root), against one plain process on the same global batch. Rank 0 writes the verdict as JSON
to argv[1]; argv[2] is a folder for the saves."""

import copy
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import report  # noqa: E402
from tiny_models import build  # noqa: E402

import hookdelta as hd  # noqa: E402

STEPS, LR = 3, 1e-2
CONFIG = hd.LoRAConfig(r=4, targets=["q_proj", "v_proj"])


class ZeRO3:
    """DeepSpeed ZeRO-3: the engine wraps the model and steps its own AdamW."""

    def __init__(self) -> None:
        import deepspeed

        self.ds = deepspeed
        deepspeed.init_distributed(dist_backend="gloo")

    def config(self, optimizer: bool) -> dict:
        cfg = {
            "train_micro_batch_size_per_gpu": 4 // dist.get_world_size(),
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
        if optimizer:
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}}
        return cfg

    def wrap(self, model, delta=None):
        params = [p for p in model.parameters() if p.requires_grad] if delta is not None else None
        engine, _, _, _ = self.ds.initialize(
            model=model, config=self.config(delta is not None), model_parameters=params
        )
        return engine

    def step(self, engine, loss) -> None:
        engine.backward(loss)
        engine.step()

    def sharded(self, model) -> bool:
        return all(p.numel() == 0 for p in model.parameters())

    def whole(self, params) -> list[torch.Tensor]:
        with self.ds.zero.GatheredParameters(list(params)):
            return [p.detach().clone() for p in params]


class FSDP2:
    """FSDP2: fully_shard on each decoder layer and the root; a torch AdamW on the delta."""

    def __init__(self) -> None:
        dist.init_process_group("gloo")
        self.opt = None

    def wrap(self, model, delta=None):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if delta is not None:
            self.opt = torch.optim.AdamW(delta.parameters(), lr=LR, weight_decay=0.0)
        return model

    def step(self, engine, loss) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def sharded(self, model) -> bool:
        return all(hasattr(p, "full_tensor") for p in model.model.layers.parameters())

    def whole(self, params) -> list[torch.Tensor]:  # (collective: every rank, same order)
        return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in params]


def main() -> None:
    out, folder, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    engine_kind = {"zero3": ZeRO3, "fsdp": FSDP2}[kind]()
    torch.set_num_threads(1)
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

    engine = engine_kind.wrap(model, delta)
    verdict = {"sharded": engine_kind.sharded(model)}
    for _ in range(STEPS):
        engine_kind.step(engine, engine(input_ids=mine, labels=mine).loss)
    trained = dict(
        zip([n for n, _ in delta.named_parameters()], engine_kind.whole(list(delta.parameters())), strict=True)
    )
    want = dict(ref_delta.named_parameters())
    verdict["train_max_diff"] = max((trained[n] - want[n]).abs().max().item() for n in want)

    def loss_of(net) -> float:
        with torch.no_grad():
            return net(input_ids=batch, labels=batch).loss.item()

    engine.eval()
    unmerged = loss_of(engine)
    with torch.no_grad():  # the reference takes the sharded run's values: its save is what one process writes
        ref_delta.load_tensors(delta.tensors())
        verdict["reference_loss_diff"] = abs(loss_of(reference) - unmerged)
        with ref_delta.disabled():
            bare = loss_of(reference)
    delta.save(os.path.join(folder, "sharded"), overwrite=True)
    delta.save_peft(os.path.join(folder, "sharded-peft"), overwrite=True)
    if rank == 0:
        ref_delta.save(os.path.join(folder, "plain"), overwrite=True)
        ref_delta.save_peft(os.path.join(folder, "plain-peft"), overwrite=True)
    dist.barrier()

    with delta.disabled():
        verdict["disabled_loss_diff"] = abs(loss_of(engine) - bare)
    verdict["enabled_loss_diff"] = abs(loss_of(engine) - unmerged)
    with torch.no_grad():
        with hd.route(model, ["lora", None, "lora", None]):
            routed = engine(input_ids=batch).logits
        plain_on = reference(input_ids=batch).logits
        with ref_delta.disabled():
            plain_off = reference(input_ids=batch).logits
    expect = torch.stack([plain_on[0], plain_off[1], plain_on[2], plain_off[3]])
    verdict["route_max_diff"] = (routed - expect).abs().max().item()

    base = [p for n, p in model.named_parameters() if "_hookdelta" not in n]
    before = engine_kind.whole(base)
    delta.merge()
    verdict["merged_loss_diff"] = abs(loss_of(engine) - unmerged)
    verdict["merge_changed_weights"] = any(
        not torch.equal(a, b) for a, b in zip(engine_kind.whole(base), before, strict=True)
    )
    delta.unmerge()
    verdict["unmerge_exact"] = all(torch.equal(a, b) for a, b in zip(engine_kind.whole(base), before, strict=True))
    verdict["unmerged_loss_diff"] = abs(loss_of(engine) - unmerged)

    # a saved delta loaded into another sharded model (attached after sharding), then hot-swapped;
    # then a hot-swap into the trained delta itself, whose tensors are sharded
    other, _, _ = build("llama")
    other.config.use_cache = False
    other_engine = engine_kind.wrap(other)
    loaded = hd.load(other, os.path.join(folder, "sharded"))
    verdict["loaded_loss_diff"] = abs(loss_of(other_engine) - unmerged)
    with torch.no_grad():
        loaded.load_tensors({k: torch.zeros_like(v) for k, v in loaded.tensors().items()})
    verdict["zeroed_loss_diff"] = abs(loss_of(other_engine) - bare)
    hd.load(other, os.path.join(folder, "sharded"), into="lora")
    verdict["hotswap_loss_diff"] = abs(loss_of(other_engine) - unmerged)
    hd.load(model, os.path.join(folder, "plain"), into="lora")
    verdict["hotswap_sharded_loss_diff"] = abs(loss_of(engine) - unmerged)

    delta.detach()
    verdict["detach_exact"] = all(torch.equal(a, b) for a, b in zip(engine_kind.whole(base), before, strict=True))
    verdict["detached_loss_diff"] = abs(loss_of(engine) - bare)
    if rank == 0:
        verdict["files"] = {}
        for kind, name in (("hookdelta", "delta.safetensors"), ("peft", "adapter_model.safetensors")):
            suffix = "" if kind == "hookdelta" else "-peft"
            a = load_file(os.path.join(folder, "sharded" + suffix, name))
            b = load_file(os.path.join(folder, "plain" + suffix, name))
            verdict["files"][kind] = {
                "keys_equal": set(a) == set(b),
                "empty": [k for k, v in a.items() if v.numel() == 0],
                "bit_equal": set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a),
            }
    report(verdict, out)


if __name__ == "__main__":
    main()
