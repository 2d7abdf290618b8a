"""Small host-to-device helpers for the hot path: nothing here synchronises the host with the GPU."""

from __future__ import annotations

from typing import Sequence

import torch


def small_tensor(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D tensor of host `values` on `device`.

    On CUDA the values go through pinned memory with a non-blocking copy: a plain ``torch.tensor(values,
    device="cuda")`` copies from pageable memory, which waits for the GPU to drain (a host sync).
    """
    host = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
