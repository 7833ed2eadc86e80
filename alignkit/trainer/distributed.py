"""Data-parallel training under ``torchrun``: what the trainer needs from ``torch.distributed``.

Every rank holds a full replica of the policy; the iteration's prompts are split across ranks
(each prompt's whole group on one rank, so group advantages stay local). Losses are normalised by
the iteration's global token / sequence counts, so each rank's gradient is its share of the global
one and one all-reduce (a sum, coalesced into a few flat buffers) per optimizer step gives every
rank the gradient of the whole batch: DDP's semantics. (``torch.nn.parallel.DDP`` itself is not
used because the trainer runs the model's body and output head separately, around DDP's forward
hooks.) The parameters are broadcast from rank 0 once at start, so replicas start equal.

Without an initialised process group (a plain ``python`` run) every function here is the identity.
``init_from_env`` initialises one when ``torchrun`` has set ``WORLD_SIZE > 1``: gloo on CPU, nccl
when the model is on CUDA.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from ..ops.whiten import masked_whiten as _masked_whiten


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def init_from_env(device: torch.device) -> None:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE, RANK, MASTER_ADDR, ...)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # The group we opened is closed at exit: a gloo group left to the interpreter's teardown can
    # abort the process ("terminate called without an active exception") after a finished run.
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence, *, part: int, parts: int) -> list:
    """The ``part``-th of ``parts`` contiguous, equal slices of ``items`` (len divisible by parts)."""
    size = len(items) // parts
    return list(items[part * size : (part + 1) * size])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place; returned for chaining)."""
    if enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``tensor`` over ranks (in place; returned for chaining)."""
    if enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (the ranks may hold different
    numbers of rows, e.g. after DAPO's refills; the other dimensions must agree)."""
    if not enabled():
        return tensor
    counts = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not enabled():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], *, bucket_bytes: int = 25 << 20) -> None:
    """Sum every parameter's ``.grad`` over ranks, in flat buckets of about ``bucket_bytes``
    (a parameter with no gradient on this rank contributes zeros, so ranks never disagree on the
    collective's shape)."""
    if not enabled():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[torch.nn.Parameter]) -> None:
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in bucket:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_parameters(modules: Iterable[torch.nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if not enabled():
        return
    for module in modules:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if enabled():
        dist.barrier()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`alignkit.masked_whiten` with the mean and (unbiased) variance over every rank's
    selected entries; the single-process op when not distributed."""
    if not enabled():
        return _masked_whiten(x, mask)
    keep = mask != 0
    x = x.float()
    stats = torch.stack([keep.sum().float(), torch.where(keep, x, 0.0).sum()])
    count, total = all_reduce_sum(stats).unbind()
    if count < 2:
        raise ValueError(f"whitening needs at least 2 selected entries over all ranks, got {int(count)}")
    mean = total / count
    square = all_reduce_sum(torch.where(keep, (x - mean).square(), 0.0).sum())
    var = square / (count - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)
