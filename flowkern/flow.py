"""Flow matching on policy latents: pairing, the training loss and the per-token score.

Each public function validates its inputs, then hands normalised tensors to
the backend chosen by `flowkern.backend.resolve`. The ``torch`` backend
here is the reference that fused backends are tested against.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from . import _checks
from . import backend as dispatch
from .config import CONTEXT_MODES
from .field import LayerRows, VelocityField

Scalar = Union[float, torch.Tensor]

# The `precision` values of `flow_scores` / `flow_reward`, defined here only. "auto" is bf16 on CUDA for an fp32
# field and the field's own dtype otherwise; a named precision scores through a copy of the field in that dtype;
# "fp8" runs e4m3 GEMMs with row-wise scales (`flowkern.ops.scores_fp8`), never chosen by "auto".
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flow_pairs(hidden: torch.Tensor, mode: str = "token_pre", shift: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a latent [B, T, D] into (context, target) pairs.

    Returns ``(cond, target, valid)``: `cond` and `target` are views of
    shape [B, T', D]; `valid` is a [T] bool tensor marking the target
    positions that have a pair, so ``scores_full[:, valid] = scores``.

    - ``token_pre``: target h[:, :T-s], context h[:, s:] (a token is predicted from a later one);
    - ``token_post``: target h[:, s:], context h[:, :T-s];
    - ``identity``: target = context = h.
    """
    _checks.floating("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {list(hidden.shape)}")
    if mode not in CONTEXT_MODES:
        raise ValueError(f"mode must be one of {CONTEXT_MODES}, got {mode!r}")
    T = hidden.shape[1]
    valid = torch.ones(T, dtype=torch.bool, device=hidden.device)
    if mode == "identity":
        return hidden, hidden, valid
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 1:
        raise ValueError(f"shift must be a positive integer, got {shift!r}")
    if shift >= T:
        raise ValueError(f"shift ({shift}) must be smaller than the sequence length T ({T})")
    if mode == "token_pre":
        valid[T - shift:] = False
        return hidden[:, shift:], hidden[:, :T - shift], valid
    valid[:shift] = False
    return hidden[:, :T - shift], hidden[:, shift:], valid


def _check_field_inputs(field: VelocityField, target: torch.Tensor, cond: torch.Tensor) -> None:
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a flowkern.VelocityField, got {type(field).__name__}")
    _checks.floating("target", target)
    _checks.floating("cond", cond)
    if target.shape != cond.shape:
        raise ValueError(f"target and cond must have the same shape, got {list(target.shape)} and {list(cond.shape)}")
    if target.dim() < 1 or target.shape[-1] != field.dim:
        raise ValueError(f"target's last dimension must be the field's dim {field.dim}, got shape {list(target.shape)}")


def _per_row(name: str, value: Union[Scalar, LayerRows], lead: Sequence[int], device: torch.device
             ) -> Union[Scalar, LayerRows]:
    """A float, a fp32 tensor of shape [N] for a per-row value given with shape `lead`, or a `LayerRows` table."""
    if isinstance(value, LayerRows):
        n = int(torch.Size(lead).numel())
        if tuple(value.index.shape) != (n,):
            raise ValueError(f"{name}: a LayerRows index must have shape [{n}], got {list(value.index.shape)}")
        _checks.same_device(**{f"{name}.values": value.values, f"{name}.index": value.index,
                               "target": torch.empty(0, device=device)})
        return value
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        return float(value)
    if value.dim() == 0:
        return float(value)
    if tuple(value.shape) != tuple(lead):
        raise ValueError(f"{name} must be a float or have shape {list(lead)}, got {list(value.shape)}")
    _checks.same_device(**{name: value, "target": torch.empty(0, device=device)})
    return value.reshape(-1).float()


# --------------------------------------------------------------------------- scoring precision

def check_precision(precision: str) -> None:
    """`precision` must be one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def scoring_dtype(field: VelocityField, precision: str, device: torch.device) -> torch.dtype:
    """The dtype in which `flow_scores` evaluates `field` on `device` for a `precision` of `PRECISIONS`."""
    check_precision(precision)
    if precision == "fp8":
        return torch.bfloat16  # between the fp8 GEMMs: their output and the residual stream
    if precision != "auto":
        return PRECISION_DTYPES[precision]
    dtype = field.input_proj.weight.dtype
    return torch.bfloat16 if dtype == torch.float32 and device.type == "cuda" else dtype


@dataclass
class _CastCopy:
    key: tuple
    field: VelocityField


# field -> {dtype: its cached copy}; an entry dies with its field.
_CAST_COPIES: "weakref.WeakKeyDictionary[VelocityField, dict[torch.dtype, _CastCopy]]" = weakref.WeakKeyDictionary()


def _state_tensors(field: VelocityField) -> list[torch.Tensor]:
    return [*field.parameters(), *field.buffers()]


def _version_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """Identity, storage and in-place version of every tensor: changes whenever one is replaced or written
    in place (optimizer steps, ``load_state_dict``, ``copy_``). Read on the host: no device synchronisation."""
    key = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter: never reuse their copy
            version = object()
        key.append((id(t), t.data_ptr(), t.device, version))
    return tuple(key)


def cast_field(field: VelocityField, dtype: torch.dtype) -> VelocityField:
    """`field` itself when its floating tensors already have `dtype`, else a cached copy cast to `dtype`.

    The copy behaves as ``field.to(dtype)`` and is built once per (field, dtype); it is refreshed in place (one
    fused copy, no host synchronisation) whenever a parameter or buffer of `field` has been replaced or written
    in place since. Writes through ``.data`` bypass torch's version counters: after such a write, call
    `drop_cast_copies` (or the copy keeps the old weights).
    """
    source = _state_tensors(field)
    if all(t.dtype == dtype for t in source if t.is_floating_point()):
        return field
    key = _version_key(source)
    copies = _CAST_COPIES.setdefault(field, {})
    entry = copies.get(dtype)
    device = field.input_proj.weight.device
    if entry is None or entry.field.input_proj.weight.device != device:
        with torch.device("meta"):
            copy = VelocityField(field.dim, field.depth, field.eps)
        copy = copy.to(dtype).to_empty(device=device).requires_grad_(False).eval()
        shapes = [t.shape for t in _state_tensors(copy)]
        if shapes != [t.shape for t in source]:
            raise TypeError(f"cannot cast {type(field).__name__} for scoring: its parameters and buffers differ from "
                            "a VelocityField's")
        entry = copies[dtype] = _CastCopy(key=(), field=copy)
    if entry.key != key:
        with torch.no_grad():
            torch._foreach_copy_(_state_tensors(entry.field), source)
        entry.key = key
    return entry.field


def scoring_call(backend_name: str, fn: Callable, field: VelocityField, precision: str, device: torch.device
                 ) -> tuple[Callable, VelocityField]:
    """The scoring function and the field to hand it for `precision`, given the resolved `flow_scores`
    backend (`backend_name`, `fn`): a cast copy of the field for the dtype precisions; for ``"fp8"`` the
    fp8 GEMM route (`flowkern.ops.scores_gemm.fp8_scores`) on the field itself, its row passes as Triton
    kernels under the ``triton`` backend and as torch ops under ``torch``."""
    if precision != "fp8":
        return fn, cast_field(field, scoring_dtype(field, precision, device))
    try:
        from .ops import scores_gemm
    except ImportError as exc:
        raise RuntimeError(f"precision='fp8' needs triton installed (flowkern.ops.scores_gemm): {exc}") from None
    return functools.partial(scores_gemm.fp8_scores, triton_rows=backend_name == "triton"), field


def drop_cast_copies(field: VelocityField) -> None:
    """Forget the cached low-precision copies of `field` (see `cast_field`); the next call rebuilds them."""
    _CAST_COPIES.pop(field, None)


# --------------------------------------------------------------------------- scores

def flow_scores(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: Scalar, *,
                timesteps: Sequence[float] = (0.8,), noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, backend: str = "auto",
                precision: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Per-token velocity deviation [N] fp32 (no grad).

    ``score = mean_j (τ_j / (1 - τ_j)) * mean_D (v(x_τj, τj, c, ℓ) - u_j)^2`` with
    ``x_τ = τ·x1 + (1-τ)·ε`` and ``u = x1 - ε``.

    Args:
        field: the velocity field.
        target: x1, [N, D].
        cond: contexts c, [N, D].
        layer: layer fraction ℓ, a float or an [N] tensor.
        timesteps: rewarding timesteps, each in (0, 1).
        noise: ε as [N, D] (shared by all timesteps) or [len(timesteps), N, D]; drawn from
            `generator` when None.
        generator: random source for ε when `noise` is None.
        backend: "auto", "torch", "triton" or "cuda".
        precision: the dtype the field is evaluated in, one of `PRECISIONS`: "auto" (bf16 on CUDA for an
            fp32 field, the field's own dtype otherwise), "fp32", "bf16" or "fp16". Another dtype than the
            field's scores through a cached copy of its weights in that dtype (`cast_field`), refreshed
            when the parameters change; every backend honours it. "fp8": float8_e4m3fn GEMMs with per-channel
            weight and per-row activation scales, fp32 accumulation (`flowkern.ops.scores_fp8`), on CPU
            (``torch`` backend) and on CUDA GPUs with compute capability >= 8.9 (``triton``).
        check_finite: check that no score is NaN or Inf (a NaN/Inf in `target`, `cond`, `noise` or `layer`
            makes its token's score non-finite), naming the argument that held the bad value: one host sync
            on the [N] scores. False skips it, for callers that validate upstream: no host sync at all on the
            fused path.

    Raises:
        ValueError: bad shapes or values, naming the argument; with `check_finite`, a non-finite input.
    """
    _check_field_inputs(field, target, cond)
    if target.dim() != 2:
        raise ValueError(f"target must be [N, D], got shape {list(target.shape)}")
    taus = _checks.timesteps(timesteps)
    device = _checks.same_device(target=target, cond=cond, noise=noise)
    n = target.shape[0]
    rows_layer = _per_row("layer", layer, (n,), device)
    if noise is not None:
        _checks.floating("noise", noise)
        if tuple(noise.shape) not in ((n, field.dim), (len(taus), n, field.dim)):
            raise ValueError(f"noise must be [{n}, {field.dim}] or [{len(taus)}, {n}, {field.dim}], "
                             f"got {list(noise.shape)}")
    fn, scoring = scoring_call(*dispatch.resolve("flow_scores", backend, device), field, precision, device)
    scores = score_rows(fn, scoring, target, cond, rows_layer, taus, noise, generator)
    if check_finite:
        _checks.finite_result("flow_scores", scores, target=target, cond=cond, noise=noise,
                              layer=layer.values if isinstance(layer, LayerRows) else
                              layer if isinstance(layer, torch.Tensor) else None)
    return scores


def score_rows(fn, field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
               layer: Union[float, torch.Tensor, LayerRows], timesteps: tuple[float, ...],
               noise: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Run the resolved `flow_scores` backend `fn` on validated inputs (no checks: internal callers validate)."""
    with torch.no_grad():
        return fn(field, target, cond, layer, timesteps, noise, generator)


def _flow_scores_torch(field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
                       layer: Union[float, torch.Tensor, LayerRows], timesteps: tuple[float, ...],
                       noise: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
    dtype = field.input_proj.weight.dtype
    x1 = target.float()
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=torch.float32)
    cond = cond.to(dtype)
    scores = torch.zeros(x1.shape[0], dtype=torch.float32, device=x1.device)
    for j, tau in enumerate(timesteps):
        eps = (noise if noise.dim() == 2 else noise[j]).float()
        x_t = (tau * x1 + (1.0 - tau) * eps).to(dtype)
        v = field(x_t, tau, cond, layer).float()
        scores += (tau / (1.0 - tau)) * (v - (x1 - eps)).pow(2).mean(-1)
    return scores / len(timesteps)


# --------------------------------------------------------------------------- training loss

def flow_matching_loss(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: Scalar,
                       mask: Optional[torch.Tensor] = None, *, t: Optional[torch.Tensor] = None,
                       noise: Optional[torch.Tensor] = None, repeats: int = 1,
                       generator: Optional[torch.Generator] = None, input_grad: bool = False,
                       backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Masked-mean flow-matching loss (scalar fp32) over token latents.

    For each token and repeat r: ``x_t = t·x1 + (1-t)·ε``, ``u = x1 - ε`` and
    ``loss = mean_D (v(x_t, t, c, ℓ) - u)^2``; the result is the mask-weighted
    mean over tokens and repeats (0 when the mask is empty).

    Args:
        field: the velocity field; gradients flow to all its parameters.
        target: x1, [..., D].
        cond: contexts, same shape as `target`.
        layer: layer fraction, a float, a tensor of shape [...], or a `LayerRows` table over the N rows
            (each distinct value embedded once).
        mask: bool mask or non-negative float weights of shape [...]; None weighs all tokens 1.
        t: times of shape [...] (repeats = 1) or [repeats, ...]; logit-normal when None.
        noise: ε of shape [..., D] (repeats = 1) or [repeats, ..., D]; standard normal when None.
        repeats: draws of (t, ε) per token.
        generator: random source for `t` and `noise` when they are not given.
        input_grad: let gradients flow into `target` and `cond` (detached by default).
        backend: "auto", "torch", "triton" or "cuda".
        check_finite: check that the loss is finite (one host sync on the scalar); when it is not, the error
            names the input that holds a NaN or Inf. A supplied `t` or float `mask` costs one more sync for
            its range check.
    """
    _check_field_inputs(field, target, cond)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    device = _checks.same_device(target=target, cond=cond, mask=mask, t=t, noise=noise)
    lead = tuple(target.shape[:-1])
    n, d = (int(torch.Size(lead).numel()), field.dim)
    layer = _per_row("layer", layer, lead, device)
    if mask is None:
        weights = torch.ones(n, dtype=torch.float32, device=device)
    else:
        _checks.mask("mask", mask, lead, allow_float=True)
        weights = mask.reshape(n).float()
    if t is None:
        t = torch.sigmoid(torch.randn((repeats, n), generator=generator, device=device))
    else:
        _checks.floating("t", t)
        if tuple(t.shape) not in ((repeats, *lead),) + (((*lead,),) if repeats == 1 else ()):
            raise ValueError(f"t must have shape {[repeats, *lead]}" + (f" or {list(lead)}" if repeats == 1 else "")
                             + f", got {list(t.shape)}")
        if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):  # also false for NaN: one sync for both checks
            _checks.finite("t", t)
            raise ValueError("t must lie in [0, 1]")
        t = t.reshape(repeats, n).float()
    if noise is not None:
        _checks.floating("noise", noise)
        allowed = ((repeats, *lead, d),) + (((*lead, d),) if repeats == 1 else ())
        if tuple(noise.shape) not in allowed:
            raise ValueError(f"noise must have shape {[repeats, *lead, d]}, got {list(noise.shape)}")
        noise = noise.reshape(repeats, n, d)
    target, cond = target.reshape(n, d), cond.reshape(n, d)
    if not input_grad:
        target, cond = target.detach(), cond.detach()
    _, fn = dispatch.resolve("flow_matching_loss", backend, device)
    if n == 0:  # no token: a zero loss that still reaches every parameter (zero gradients)
        return sum(p.sum() for p in field.parameters()).float().mul(0.0) + 0.0
    loss = fn(field, target, cond, layer, weights, t, noise, generator)
    if check_finite:
        _checks.finite_result("flow_matching_loss", loss.detach(), target=target, cond=cond, noise=noise,
                              layer=layer.values if isinstance(layer, LayerRows) else
                              layer if isinstance(layer, torch.Tensor) else None)
    return loss


def _flow_matching_loss_torch(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: Scalar,
                              weights: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor],
                              generator: Optional[torch.Generator]) -> torch.Tensor:
    repeats, n = t.shape
    dtype = field.input_proj.weight.dtype
    x1 = target.float().unsqueeze(0)
    if noise is None:
        noise = torch.randn((repeats, *target.shape), generator=generator, device=target.device)
    eps = noise.float()
    tt = t.unsqueeze(-1)
    x_t = (tt * x1 + (1.0 - tt) * eps).to(dtype).reshape(repeats * n, target.shape[-1])
    rows_layer = layer.repeat(repeats) if isinstance(layer, (torch.Tensor, LayerRows)) else layer
    v = field(x_t, t.reshape(-1), cond.to(dtype).repeat(repeats, 1), rows_layer).float()
    per_token = (v.reshape(repeats, n, target.shape[-1]) - (x1 - eps)).pow(2).mean(-1)
    total = weights.sum() * repeats
    return (per_token * weights).sum() / total.clamp_min(torch.finfo(torch.float32).tiny)


dispatch.register("flow_scores", "torch", _flow_scores_torch)
dispatch.register("flow_matching_loss", "torch", _flow_matching_loss_torch)
