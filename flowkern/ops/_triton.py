"""Helpers shared by the Triton ops: interpreter detection, availability and autotune pruning."""

from __future__ import annotations

import os
from typing import Optional, Sequence, TypeVar

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
