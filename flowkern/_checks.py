"""Input validation shared by the public functions: errors name the argument and the fault."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

# NaN/Inf checks cost a device-to-host synchronisation each. The public functions therefore check once, on the
# smallest tensor that a bad input must reach (the per-token result, or a per-position flag), and only when
# that check fails do they look at the inputs one by one (extra syncs on the error path only) to name the
# argument that held the bad value.


def floating(name: str, x: torch.Tensor) -> None:
    """`x` must be a floating tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")


def finite(name: str, x: torch.Tensor) -> None:
    """`x` must hold no NaN or Inf (one host sync)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def all_finite(**tensors: Optional[torch.Tensor]) -> None:
    """Every given tensor must hold no NaN or Inf: one host sync for all of them; the error names the first bad one."""
    given = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.numel()}
    if given and not bool(torch.stack([torch.isfinite(t).all() for t in given.values()]).all()):
        name_non_finite(**given)


def name_non_finite(**tensors: Optional[torch.Tensor]) -> None:
    """Raise the error naming the first of `tensors` that holds a NaN or Inf (error path: one sync per tensor)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            finite(name, t)


def finite_result(what: str, result: torch.Tensor, **inputs: Optional[torch.Tensor]) -> None:
    """`result` must be finite: one host sync. When it is not, the error names the first of `inputs` that holds a
    NaN or Inf (a bad input reaches the result), or says that every input was finite."""
    if result.numel() and not bool(torch.isfinite(result).all()):
        name_non_finite(**inputs)
        raise ValueError(f"{what} contains NaN or Inf although every input is finite: the velocity field's "
                         "weights hold NaN/Inf, or its activations overflowed in the dtype it was evaluated in")


def non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool [...] map of the rows (last dim reduced) of `x` [..., D] that hold a NaN or Inf.

    One read of `x` and an output the size of one row-set: no [..., D] temporary, no host sync.
    """
    return ~torch.isfinite(torch.linalg.vector_norm(x, ord=float("inf"), dim=-1))


def shape(name: str, x: torch.Tensor, expected: Sequence[int]) -> None:
    """`x` must have exactly the shape `expected`."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(x.shape)}")


def mask(name: str, m: torch.Tensor, expected: Sequence[int], allow_float: bool = False) -> None:
    """`m` must be a bool (or, if allowed, floating weight) tensor of shape `expected`."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool and not (allow_float and m.is_floating_point()):
        kinds = "bool or floating" if allow_float else "bool"
        raise TypeError(f"{name} must be a {kinds} tensor, got dtype {m.dtype}")
    shape(name, m, expected)
    if m.is_floating_point() and m.numel() and not bool((m >= 0).logical_and_(torch.isfinite(m)).all()):  # one sync
        finite(name, m)
        raise ValueError(f"{name} weights must be non-negative")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors must live on one device, which is returned."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    distinct = set(devices.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return distinct.pop()


def timesteps(values: Iterable[float]) -> tuple[float, ...]:
    """A non-empty tuple of timesteps, each strictly inside (0, 1)."""
    out = tuple(float(v) for v in values)
    if not out:
        raise ValueError("timesteps must not be empty")
    for tau in out:
        if not 0.0 < tau < 1.0:
            raise ValueError(f"timesteps must lie in (0, 1), got {tau}")
    return out


def group_size(value: int, batch: int) -> None:
    """`value` must be a positive integer that divides `batch`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"group_size must be a positive integer, got {value!r}")
    if batch % value:
        raise ValueError(f"group_size ({value}) must divide the batch size B ({batch})")


def gamma(value: float) -> float:
    """A discount in [0, 1], as a float."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {value}")
    return value
