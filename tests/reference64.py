"""An independent float64 re-derivation of DESIGN.md §1, written from the formulas, for parity tests.

It shares no code with flowkern: the velocity field is evaluated from a raw
state dict, and shaping/advantages use explicit per-row Python loops.
"""

from __future__ import annotations

import math

import torch


def _lin(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _silu(x):
    return x / (1 + torch.exp(-x))


def _embed(sd, prefix, values):
    # the frequencies are a buffer computed and stored in fp32, as in the official checkpoints
    i = torch.arange(128, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * i / 128).double()
    args = values[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return _lin(sd, f"{prefix}.mlp.2", _silu(_lin(sd, f"{prefix}.mlp.0", feats)))


def _rms(sd, name, x, eps):
    return sd[f"{name}.weight"] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def velocity(state: dict, x_t, t, cond, layer, eps=1e-6):
    """v(x_t, t, c, ℓ) in float64 from a VelocityField state dict; t and layer are [N] tensors."""
    sd = {k: v.double() for k, v in state.items()}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("res_blocks."))
    w = sd["input_proj.weight"].shape[0]
    y = _lin(sd, "cond_embed", cond.double()) + _embed(sd, "time_embed", t.double()) \
        + _embed(sd, "layer_embed", layer.double())
    sy = _silu(y)
    a = _lin(sd, "input_proj", x_t.double())
    for i in range(depth):
        mod = _lin(sd, f"res_blocks.{i}.adaLN_modulation.1", sy)
        shift, scale, gate = mod[:, :w], mod[:, w:2 * w], mod[:, 2 * w:]
        h = _rms(sd, f"res_blocks.{i}.in_ln", a, eps) * (1 + scale) + shift
        a = a + gate * _lin(sd, f"res_blocks.{i}.mlp.2", _silu(_lin(sd, f"res_blocks.{i}.mlp.0", h)))
    mod = _lin(sd, "final_layer.adaLN_modulation.1", sy)
    shift, scale = mod[:, :w], mod[:, w:]
    return _lin(sd, "final_layer.linear", _rms(sd, "final_layer.norm_final", a, eps) * (1 + scale) + shift)


def scores(state, x1, cond, layer, timesteps, noise):
    """Per-token debiased deviation averaged over timesteps; noise is [J, N, D]."""
    x1 = x1.double()
    out = torch.zeros(x1.shape[0], dtype=torch.float64)
    n = x1.shape[0]
    for j, tau in enumerate(timesteps):
        e = noise[j].double()
        v = velocity(state, tau * x1 + (1 - tau) * e, torch.full((n,), tau, dtype=torch.float64), cond,
                     layer.double())
        out += tau / (1 - tau) * ((v - (x1 - e)) ** 2).mean(-1)
    return out / len(timesteps)


def fm_loss(state, x1, cond, layer, weights, t, noise):
    """Masked-mean flow-matching loss (differentiable w.r.t. `state`); t is [R, N], noise [R, N, D]."""
    total = torch.zeros((), dtype=torch.float64)
    for r in range(t.shape[0]):
        e = noise[r].double()
        tt = t[r].double()[:, None]
        v = velocity(state, tt * x1.double() + (1 - tt) * e, t[r], cond, layer)
        total = total + (((v - (x1.double() - e)) ** 2).mean(-1) * weights.double()).sum()
    norm = float(weights.double().sum()) * t.shape[0]
    return total / norm if norm > 0 else total * 0.0


def shape_row(s, action, norm, threshold, topk, coef):
    """Shape one sequence (1-D float64 scores, bool action) with explicit loops."""
    T = len(s)
    idx = [k for k in range(T) if action[k]]
    out = [0.0] * T
    if not idx:
        return out
    vals = {k: float(s[k]) for k in idx}
    if norm != "none":
        lo, hi = min(vals.values()), max(vals.values())
        if hi == lo:
            vals = {k: 0.0 for k in idx}
        else:
            unit = {k: (v - lo) / (hi - lo) for k, v in vals.items()}
            if norm == "minmax":
                vals = unit
            elif norm == "minmax-bil":
                vals = {k: 2 * u - 1 for k, u in unit.items()}
            else:
                mean = sum(unit.values()) / len(unit)
                vals = {k: u - mean for k, u in unit.items()}
    two_sided = norm in ("minmax-bil", "mean")
    if two_sided:
        surv = [k for k in idx if abs(vals[k]) > threshold]
        if topk:
            pos = sorted((k for k in surv if vals[k] > 0), key=lambda k: -vals[k])[:topk // 2]
            neg = sorted((k for k in surv if vals[k] < 0), key=lambda k: vals[k])[:topk // 2]
            surv = pos + neg
    else:
        surv = [k for k in idx if vals[k] > threshold]
        if topk:
            surv = sorted(surv, key=lambda k: -vals[k])[:topk]
    for k in surv:
        out[k] = -coef * vals[k]
    return out


def advantages(outcome, rewards, action, group_size, gamma):
    """GRPO advantage plus discounted reward-to-go over action tokens, loops in float64."""
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for g in range(B // group_size):
        rs = [float(outcome[g * group_size + i]) for i in range(group_size)]
        mean = sum(rs) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (group_size - 1)) if group_size > 1 else 0.0
        for i in range(group_size):
            b = g * group_size + i
            adv = 0.0 if std == 0 else (rs[i] - mean) / (std + 1e-6)
            for k in range(T):
                if action[b, k]:
                    rtg = sum(gamma ** (s - k) * float(rewards[b, s]) for s in range(k, T) if action[b, s])
                    out[b, k] = adv + rtg
    return out
