"""Sharded tensors seen whole: DeepSpeed ZeRO-3 partitions and torch DTensors (FSDP2, tensor
parallelism).

Under ZeRO-3 a parameter outside its module's forward is an empty tensor (its values are spread
over the ranks), so a save would write `(0,)` tensors and a merge would add into nothing. Every
lifecycle call that reads or writes whole values (save, save_peft, load, merge, unmerge) does
it inside `whole(...)`, which gathers the ZeRO-3 partitions for the block with DeepSpeed's own
`GatheredParameters` (collective: every rank must make the call, as with DeepSpeed's own saves)
and, when the block writes, partitions rank 0's values again on exit. DTensors (FSDP2) are read
with `full_tensor()` and written in their own layout (`like`): a merge adds ΔW, redistributed to
the weight's placements, into each rank's shard, which is exactly the shard of W + ΔW. Nothing
here imports DeepSpeed unless a tensor is partitioned.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_partitioned(t: Any) -> bool:
    """A ZeRO-3 parameter (DeepSpeed marks each with `ds_id`)."""
    return hasattr(t, "ds_id")


@functools.cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (torch built without distributed)
        return None
    return DTensor


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    cls = _dtensor_class()  # (checked per site in each forward under a process group: no import there)
    return cls is not None and isinstance(t, cls)


def is_sharded(t: Any) -> bool:
    return is_partitioned(t) or is_dtensor(t)


@contextlib.contextmanager
def whole(tensors: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Inside the block the ZeRO-3 partitions among `tensors` hold their whole values; with
    `modify`, what rank 0 wrote into them is partitioned again on exit."""
    parts = [t for t in tensors if is_partitioned(t)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=0 if modify else None):
        yield


def shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of `t` (a ZeRO-3 partition is empty outside its module's forward)."""
    return tuple(t.ds_shape) if is_partitioned(t) else tuple(t.shape)  # type: ignore[attr-defined]  # (DeepSpeed's)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of `t` (a DTensor is gathered: collective; a ZeRO-3 partition must be inside `whole`)."""
    return t.full_tensor() if is_dtensor(t) else t


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `target` is: a DTensor target gets it as a DTensor with the same mesh
    and placements (redistributed, or distributed from a whole value every rank holds)."""
    if not is_dtensor(target):
        return value
    if is_dtensor(value):
        return value.redistribute(target.device_mesh, target.placements)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach(), target.device_mesh, target.placements)


def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole value into `target` in place: a DTensor gets its shard of it (every rank
    calls this with the same value), a ZeRO-3 partition must be inside `whole(modify=True)`."""
    target.copy_(like(value.to(target.device, target.dtype), target))


def writes_files(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether this process writes the files of a save: with sharded tensors the save is
    collective and rank 0 writes; otherwise every process that calls it writes."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return True
    return not any(is_sharded(t) for t in tensors)


def fsdp_managed(model: Any) -> bool:
    """Whether FSDP2 manages the model (`fully_shard` on its root): it gathers every shard for the
    forward, so the deltas' hooks see whole weights."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def tensor_parallel_sites(model: Any, sites: Iterable[tuple[str, Any]]) -> list[str]:
    """Paths of the sites (path, module) whose weight is a DTensor that no FSDP2 root gathers
    (tensor parallelism): the deltas' math there would mix whole and sharded tensors."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or fsdp_managed(model):
        return []
    return [path for path, module in sites if is_dtensor(module._parameters.get("weight"))]


def tensor_parallel_message(path: str) -> str:
    return (
        f"{path!r} is tensor-parallel (its weight is a DTensor sharded across ranks in the forward, as "
        "parallelize_module or transformers' tp_plan make it), and this delta's tensors are not sharded to "
        "match. Attach after parallelizing, on every rank: a plain LoRA is then built sharded like its layer "
        "(other methods are not yet); or merge the delta before parallelizing"
    )
