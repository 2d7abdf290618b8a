"""Data parallelism under ``torchrun``: DDP for the policy, gradient averaging for the flow.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op.
On CPU the process group uses gloo, on CUDA nccl. Each rank draws the same
batch indices from the shared generator and keeps its own slice, so ranks
see disjoint data; gradients are averaged, and both the policy (DDP) and the
flow (all-reduce in `average_gradients`) stay identical on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on rank 0 (the one that logs and writes files)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one rank is running."""
        return self.world > 1


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun and choose this rank's device."""
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        dev = torch.device("cuda", local) if world > 1 or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local, device=dev)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group (if this process started one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when distributed, else `model` itself.

    DDP broadcasts rank 0's parameters at construction, so every rank starts equal.
    """
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or `model` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers into `module` on every rank."""
    if info.enabled:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of `params` over ranks (one flattened all-reduce)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Element-wise sum of a list of floats over ranks."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes (in state-dict order)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_strings(value: str, info: DistInfo) -> list[str]:
    """`value` from every rank, in rank order (on every rank)."""
    if not info.enabled:
        return [value]
    out: list = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def shard(items: Sequence, info: DistInfo) -> list:
    """This rank's contiguous slice of `items` (len must divide by the world size)."""
    n = len(items)
    if n % info.world:
        raise ValueError(f"{n} items cannot be split evenly over {info.world} ranks")
    per = n // info.world
    return list(items[info.rank * per:(info.rank + 1) * per])


def shard_uneven(items: Sequence, info: DistInfo) -> list:
    """This rank's strided share of `items` (any length; used for evaluation)."""
    return list(items[info.rank::info.world])
