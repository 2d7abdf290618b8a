"""Parity tolerances per dtype, in one place, for tests and benchmarks."""

from __future__ import annotations

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
