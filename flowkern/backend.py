"""The single dispatch point that chooses an implementation for each op.

Each op ("flow_scores", "flow_matching_loss", "shape_rewards",
"shape_advantages") has a plain-PyTorch reference under the backend name
``torch``. Fused implementations register themselves from `flowkern.ops`
under ``triton`` or ``cuda``. ``auto`` takes the first available of
cuda, triton, torch; fused backends are only chosen automatically for
CUDA tensors. ``FLOWKERN_BACKEND=torch`` forces the reference everywhere.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "torch")
# Modules that register fused implementations when imported.
OP_MODULES = ("flowkern.ops",)


@dataclass(frozen=True)
class Implementation:
    """One backend of one op: the function and a check that explains unavailability."""

    fn: Callable
    why_unavailable: Callable[[torch.device], Optional[str]]


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# (op, backend) -> why the module that implements it failed to import (e.g. triton not installed)
_LOAD_ERRORS: dict[tuple[str, str], str] = {}
_loaded = False


def _always_available(device: torch.device) -> Optional[str]:
    return None


def register(op: str, backend: str, fn: Callable,
             why_unavailable: Callable[[torch.device], Optional[str]] = _always_available) -> None:
    """Register `fn` as the `backend` implementation of `op`."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"register: backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, why_unavailable)


def record_load_error(backend: str, ops: tuple[str, ...], reason: str) -> None:
    """Remember why the `backend` implementations of `ops` could not be imported."""
    for op in ops:
        _LOAD_ERRORS[(op, backend)] = reason


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in OP_MODULES:
            importlib.import_module(name)


def forced_backend() -> Optional[str]:
    """The backend forced by ``FLOWKERN_BACKEND`` (only ``torch`` may be forced), or None."""
    value = os.environ.get("FLOWKERN_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value != "torch":
        raise ValueError(f"FLOWKERN_BACKEND may only be 'torch' or 'auto', got {value!r}")
    return value


def implements(op: str, backend: str) -> bool:
    """Whether `op` has (or would have, had its module loaded) a `backend` implementation."""
    _ensure_loaded()
    return backend in ("auto", "torch") or backend in _REGISTRY.get(op, {}) or (op, backend) in _LOAD_ERRORS


def unavailable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run `op` on `device`, or None when it can."""
    _ensure_loaded()
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        if (op, backend) in _LOAD_ERRORS:
            return _LOAD_ERRORS[(op, backend)]
        return f"flowkern has no {backend!r} implementation of {op}"
    return impl.why_unavailable(device)


def resolve(op: str, backend: str, device: torch.device) -> tuple[str, Callable]:
    """The (name, function) that runs `op` on `device` for the requested `backend`.

    Raises:
        ValueError: `backend` is not a known name.
        RuntimeError: an explicitly requested backend is unavailable; the message says why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _ensure_loaded()
    if forced_backend() is not None:
        backend = "torch"
    if backend == "auto":
        for name in AUTO_ORDER:
            if name != "torch" and device.type != "cuda":
                continue
            if name in _REGISTRY.get(op, {}) and unavailable_reason(op, name, device) is None:
                return name, _REGISTRY[op][name].fn
        backend = "torch"
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable for {op} on {device}: {reason}")
    return backend, _REGISTRY[op][backend].fn


def available_backends(op: str, device: Union[str, torch.device]) -> list[str]:
    """The backends that can run `op` on `device` (a torch.device or a string such as "cuda:1") right now.

    Raises:
        ValueError: `op` is not one of flowkern's ops (the message lists them).
    """
    _ensure_loaded()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; flowkern's ops are {sorted(_REGISTRY)}")
    device = torch.device(device)
    return [name for name in _REGISTRY[op] if unavailable_reason(op, name, device) is None]
