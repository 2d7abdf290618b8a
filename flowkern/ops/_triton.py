"""Helpers shared by the Triton ops: interpreter detection, availability and autotune pruning."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on `device`, or None when they can."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return (f"Triton kernels need CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing flowkern to run them on CPU in the interpreter")


def prune_configs(configs: Sequence[T]) -> list[T]:
    """All autotune configs on a GPU, only the first under the interpreter (which rejects several)."""
    return list(configs[:1]) if interpreting() else list(configs)


def pinned_configs() -> bool:
    """Whether the scoring kernels use one fixed tile config instead of timing several (autotuning).

    On when ``torch.use_deterministic_algorithms(True)`` is in force or ``FLOWKERN_DETERMINISTIC=1`` is set,
    at a kernel's first call for a shape (the choice is then kept for the process). Autotuning picks the
    fastest config per process by timing, and the tile shape (BK) sets the order of the fp32 sums in the GEMMs,
    so two ranks may score the same tokens differently in the last bits unless configs are pinned.
    """
    return os.environ.get("FLOWKERN_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def device_guard(device: torch.device) -> ContextManager:
    """Make `device` current for the Triton launches inside: Triton launches on the current CUDA device, not on
    the device of its tensors (on rank N of a job with tensors on cuda:N and the current device 0, it would read
    the wrong memory). Every launcher of `flowkern.ops` wraps its launches in this."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """A Philox key in [0, 2**62) as a 1-element int64 tensor on `device`, drawn from `generator` (or torch's
    default generator of `device`). The kernels load it from memory: no host sync; deterministic per generator
    state. A CPU generator's draw reaches a CUDA device through pinned memory, without a sync."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    if seed.device == device:
        return seed
    if device.type == "cuda" and seed.device.type == "cpu":
        seed = seed.pin_memory()
    return seed.to(device, non_blocking=True)
