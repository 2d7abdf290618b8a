"""Parity tolerances per dtype and a CPU peak-memory probe, in one place, for tests and benchmarks."""

from __future__ import annotations

from typing import Callable

import torch

# (rtol, atol) for comparing a fused backend with the torch reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for `dtype`, ready for `torch.testing.assert_close`."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no parity tolerance defined for {dtype}")
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """`torch.testing.assert_close` at the tolerance of `dtype`, comparing in fp32."""
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance(dtype),
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def peak_cpu_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes that torch's CPU allocator holds during `fn()` above what it held before.

    torch's profiler with ``profile_memory=True`` reports every allocation and free of the
    CPU allocator as a ``[memory]`` event carrying its signed size and its time; summing them
    in time order gives the bytes allocated since the call began at each instant, and the
    maximum is the peak. (``torch.cuda.max_memory_allocated`` is the GPU counterpart.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for event in events:
        now += event.nbytes()
        peak = max(peak, now)
    return peak
