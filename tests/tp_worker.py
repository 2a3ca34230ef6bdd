"""Run by tests/test_distributed.py under `torch.distributed.run` (2 processes, gloo, CPU): tensor
parallelism with DTensor `parallelize_module` (colwise q/k/v and gate/up, rowwise o and down).
A LoRA attached after parallelizing has its factors sharded to match and is compared with one
plain process holding the same values: outputs, gradients, training, save, load, hot-swap,
merge, detach, disable. A delta attached before parallelizing, and a method without a sharded
form, are refused clearly. Rank 0 writes the verdict as JSON to argv[1]; argv[2] is a folder."""

import copy
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, os.path.dirname(__file__))
from helpers import report  # noqa: E402
from tiny_models import build  # noqa: E402

import hookdelta as hd  # noqa: E402

ATTENTION = {
    "q_proj": ColwiseParallel(),
    "k_proj": ColwiseParallel(),
    "v_proj": ColwiseParallel(),
    "o_proj": RowwiseParallel(),
}
MLP = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
CONFIG = hd.LoRAConfig(r=4, targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def parallelize(model, mesh) -> None:
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, ATTENTION)
        parallelize_module(layer.mlp, mesh, MLP)


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def main() -> None:
    out, folder = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batch = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(7))
    verdict = {}

    early, _, _ = build("llama")  # attached before parallelizing: its factors are not sharded
    hd.attach(early, hd.LoRAConfig(r=4, targets=["q_proj", "o_proj"]))
    parallelize(early, mesh)
    try:
        with torch.no_grad():
            early(input_ids=batch)
        verdict["before"] = "ran"
    except hd.UnsupportedModuleError as exc:
        verdict["before"] = str(exc)

    torch.manual_seed(0)
    model, _, _ = build("llama")
    model.config.use_cache = False
    reference = copy.deepcopy(model)
    parallelize(model, mesh)
    names = [n for n, _ in model.named_modules()]
    try:
        hd.attach(model, hd.IA3Config(targets=["down_proj"]))
        verdict["ia3"] = "attached"
    except hd.UnsupportedModuleError as exc:
        verdict["ia3"] = str(exc)
    verdict["untouched"] = [n for n, _ in model.named_modules()] == names and not hd.deltas(model)
    delta = hd.attach(model, CONFIG)
    ref_delta = hd.attach(reference, CONFIG)
    verdict["sharded_factors"] = all(hasattr(p, "full_tensor") for p in delta.parameters())
    with torch.no_grad():  # the same values in both (B is zero at first: make the delta act)
        for i, (p, q) in enumerate(zip(delta.parameters(), ref_delta.parameters(), strict=True)):
            value = torch.randn(q.shape, generator=torch.Generator().manual_seed(i)) * 0.3
            q.copy_(value)
            p.copy_(torch.distributed.tensor.distribute_tensor(value, p.device_mesh, p.placements))

    out_tp, out_ref = model(input_ids=batch, labels=batch), reference(input_ids=batch, labels=batch)
    verdict["forward_max_diff"] = (out_tp.logits - out_ref.logits).abs().max().item()
    out_tp.loss.backward()
    out_ref.loss.backward()
    verdict["grad_max_diff"] = max(
        (whole(p.grad) - q.grad).abs().max().item()
        for p, q in zip(delta.parameters(), ref_delta.parameters(), strict=True)
    )
    opts = [torch.optim.AdamW(d.parameters(), lr=1e-2, weight_decay=0.0) for d in (delta, ref_delta)]
    for _ in range(2):
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for net in (model, reference):
            net(input_ids=batch, labels=batch).loss.backward()
    verdict["train_max_diff"] = max(
        (whole(p) - q).abs().max().item() for p, q in zip(delta.parameters(), ref_delta.parameters(), strict=True)
    )
    with torch.no_grad():
        ref_delta.load_tensors(delta.tensors())

    def logits(net):
        with torch.no_grad():
            return net(input_ids=batch).logits

    on = logits(model)
    verdict["trained_max_diff"] = (on - logits(reference)).abs().max().item()
    with ref_delta.disabled():
        off = logits(reference)
    with delta.disabled():
        verdict["disabled_max_diff"] = (logits(model) - off).abs().max().item()
    try:
        with hd.route(model, ["lora", None]):
            routed = logits(model)
        verdict["route_max_diff"] = (routed - torch.stack([on[0], off[1]])).abs().max().item()
    except hd.HookdeltaError as exc:
        verdict["route_max_diff"] = f"{type(exc).__name__}: {exc}"
    delta.save(os.path.join(folder, "tp"), overwrite=True)
    delta.save_peft(os.path.join(folder, "tp-peft"), overwrite=True)
    if rank == 0:
        ref_delta.save(os.path.join(folder, "plain"), overwrite=True)
    dist.barrier()

    base = [p for n, p in model.named_parameters() if "_hookdelta" not in n]
    before = [whole(p) for p in base]
    delta.merge()
    verdict["merged_max_diff"] = (logits(model) - on).abs().max().item()
    verdict["merge_changed_weights"] = any(not torch.equal(whole(p), b) for p, b in zip(base, before, strict=True))
    delta.unmerge()
    verdict["unmerge_exact"] = all(torch.equal(whole(p), b) for p, b in zip(base, before, strict=True))

    other, _, _ = build("llama")
    other.config.use_cache = False
    torch.manual_seed(0)
    other.load_state_dict(reference.state_dict(), strict=False)
    parallelize(other, mesh)
    loaded = hd.load(other, os.path.join(folder, "plain"))
    verdict["loaded_max_diff"] = (logits(other) - on).abs().max().item()
    with torch.no_grad():
        loaded.load_tensors({k: torch.zeros_like(v) for k, v in loaded.tensors().items()})
    verdict["zeroed_max_diff"] = (logits(other) - off).abs().max().item()
    hd.load(other, os.path.join(folder, "tp"), into="lora")
    verdict["hotswap_max_diff"] = (logits(other) - on).abs().max().item()

    delta.detach()
    verdict["detach_exact"] = all(torch.equal(whole(p), b) for p, b in zip(base, before, strict=True))
    verdict["detached_max_diff"] = (logits(model) - off).abs().max().item()
    if rank == 0:
        a, b = (
            load_file(os.path.join(folder, "tp", "delta.safetensors")),
            load_file(os.path.join(folder, "plain", "delta.safetensors")),
        )
        verdict["save_bit_equal"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        verdict["peft_whole"] = all(
            v.numel() > 0 for v in load_file(os.path.join(folder, "tp-peft", "adapter_model.safetensors")).values()
        )
    report(verdict, out)


if __name__ == "__main__":
    main()
