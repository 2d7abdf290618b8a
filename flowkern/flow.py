"""Flow matching on policy latents: pairing, the training loss and the per-token score.

Each public function validates its inputs, then hands normalised tensors to
the backend chosen by `flowkern.backend.resolve`. The ``torch`` backend
here is the reference that fused backends are tested against.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _checks
from . import backend as dispatch
from .config import CONTEXT_MODES
from .field import VelocityField

Scalar = Union[float, torch.Tensor]


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
    _checks.finite("target", target)
    _checks.finite("cond", cond)


def _per_row(name: str, value: Scalar, lead: Sequence[int], device: torch.device) -> Scalar:
    """A float, or a fp32 tensor of shape [N] for a per-row value given with shape `lead`."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        return float(value)
    if value.dim() == 0:
        return float(value)
    if tuple(value.shape) != tuple(lead):
        raise ValueError(f"{name} must be a float or have shape {list(lead)}, got {list(value.shape)}")
    _checks.same_device(**{name: value, "target": torch.empty(0, device=device)})
    _checks.finite(name, value)
    return value.reshape(-1).float()


# --------------------------------------------------------------------------- scores

def flow_scores(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: Scalar, *,
                timesteps: Sequence[float] = (0.8,), noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
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
    """
    _check_field_inputs(field, target, cond)
    if target.dim() != 2:
        raise ValueError(f"target must be [N, D], got shape {list(target.shape)}")
    taus = _checks.timesteps(timesteps)
    device = _checks.same_device(target=target, cond=cond, noise=noise)
    n = target.shape[0]
    layer = _per_row("layer", layer, (n,), device)
    if noise is not None:
        _checks.floating("noise", noise)
        if tuple(noise.shape) not in ((n, field.dim), (len(taus), n, field.dim)):
            raise ValueError(f"noise must be [{n}, {field.dim}] or [{len(taus)}, {n}, {field.dim}], "
                             f"got {list(noise.shape)}")
        _checks.finite("noise", noise)
    _, fn = dispatch.resolve("flow_scores", backend, device)
    with torch.no_grad():
        return fn(field, target, cond, layer, taus, noise, generator)


def _flow_scores_torch(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: Scalar,
                       timesteps: tuple[float, ...], noise: Optional[torch.Tensor],
                       generator: Optional[torch.Generator]) -> torch.Tensor:
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
                       backend: str = "auto") -> torch.Tensor:
    """Masked-mean flow-matching loss (scalar fp32) over token latents.

    For each token and repeat r: ``x_t = t·x1 + (1-t)·ε``, ``u = x1 - ε`` and
    ``loss = mean_D (v(x_t, t, c, ℓ) - u)^2``; the result is the mask-weighted
    mean over tokens and repeats (0 when the mask is empty).

    Args:
        field: the velocity field; gradients flow to all its parameters.
        target: x1, [..., D].
        cond: contexts, same shape as `target`.
        layer: layer fraction, a float or a tensor of shape [...].
        mask: bool mask or non-negative float weights of shape [...]; None weighs all tokens 1.
        t: times of shape [...] (repeats = 1) or [repeats, ...]; logit-normal when None.
        noise: ε of shape [..., D] (repeats = 1) or [repeats, ..., D]; standard normal when None.
        repeats: draws of (t, ε) per token.
        generator: random source for `t` and `noise` when they are not given.
        input_grad: let gradients flow into `target` and `cond` (detached by default).
        backend: "auto", "torch", "triton" or "cuda".
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
        _checks.finite("t", t)
        if t.numel() and bool(((t < 0) | (t > 1)).any()):
            raise ValueError("t must lie in [0, 1]")
        t = t.reshape(repeats, n).float()
    if noise is not None:
        _checks.floating("noise", noise)
        allowed = ((repeats, *lead, d),) + (((*lead, d),) if repeats == 1 else ())
        if tuple(noise.shape) not in allowed:
            raise ValueError(f"noise must have shape {[repeats, *lead, d]}, got {list(noise.shape)}")
        _checks.finite("noise", noise)
        noise = noise.reshape(repeats, n, d)
    target, cond = target.reshape(n, d), cond.reshape(n, d)
    if not input_grad:
        target, cond = target.detach(), cond.detach()
    _, fn = dispatch.resolve("flow_matching_loss", backend, device)
    if n == 0:  # no token: a zero loss that still reaches every parameter (zero gradients)
        return sum(p.sum() for p in field.parameters()).float().mul(0.0) + 0.0
    return fn(field, target, cond, layer, weights, t, noise, generator)


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
    rows_layer = layer.repeat(repeats) if isinstance(layer, torch.Tensor) else layer
    v = field(x_t, t.reshape(-1), cond.to(dtype).repeat(repeats, 1), rows_layer).float()
    per_token = (v.reshape(repeats, n, target.shape[-1]) - (x1 - eps)).pow(2).mean(-1)
    total = weights.sum() * repeats
    return (per_token * weights).sum() / total.clamp_min(torch.finfo(torch.float32).tiny)


dispatch.register("flow_scores", "torch", _flow_scores_torch)
dispatch.register("flow_matching_loss", "torch", _flow_matching_loss_torch)
