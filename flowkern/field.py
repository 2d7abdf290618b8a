"""`VelocityField`: the small adaLN-MLP velocity network v(x_t, t, c, ℓ) of RLFR.

Its parameter names are exactly those of the official `flow_model.bin`
(without the leading ``model.``), so official checkpoints load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

Scalar = Union[float, torch.Tensor]


@dataclass(frozen=True)
class LayerRows:
    """Per-row layer fractions given as a table: ``ℓ[r] = values[index[r]]``.

    `flow_reward` and `latent_flow_loss` pass their rows' layers this way (one value per hooked layer), so
    each distinct value is embedded once without having to discover them (``torch.unique`` would synchronise
    the host).
    """

    values: torch.Tensor  # [U] fp32
    index: torch.Tensor  # [N] integer

    def per_row(self) -> torch.Tensor:
        """The [N] fp32 layer fraction of every row."""
        return self.values[self.index]

    def repeat(self, times: int) -> "LayerRows":
        """The same table for the rows repeated `times` times (``index.repeat(times)``)."""
        return LayerRows(self.values, self.index.repeat(times))

FREQ_FEATURES = 256  # sinusoidal features per embedder: 128 cos then 128 sin


def sinusoid_frequencies(n_features: int = FREQ_FEATURES) -> torch.Tensor:
    """``exp(-ln(10000) * i / half)`` for ``i < half``, in fp32."""
    half = n_features // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)


class RMSNorm(nn.Module):
    """RMSNorm in fp32 (or wider), cast back to the input dtype, then scaled by its weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class ScalarEmbedder(nn.Module):
    """Embeds a scalar (timestep or layer fraction): sinusoids -> Linear -> SiLU -> Linear.

    A shared value is embedded once and broadcast; a `LayerRows` table embeds each of its values once and
    gathers per row; an [N] tensor embeds every row (finding its distinct values would need
    ``torch.unique``, a host sync).
    """

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("freqs", sinusoid_frequencies(), persistent=True)
        self.mlp = nn.Sequential(nn.Linear(FREQ_FEATURES, width), nn.SiLU(), nn.Linear(width, width))

    @property
    def feature_dtype(self) -> torch.dtype:
        """Sinusoids are computed in fp32, or in the weights' dtype when that is wider."""
        return torch.promote_types(torch.float32, self.mlp[0].weight.dtype)

    def embed_values(self, values: torch.Tensor) -> torch.Tensor:
        """Embeddings [M, W] of M scalar values (no deduplication)."""
        args = values.to(self.feature_dtype)[:, None] * self.freqs.to(self.feature_dtype)[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))

    def forward(self, value: Union[Scalar, LayerRows], n_rows: int) -> torch.Tensor:
        """Embedding of `value` for `n_rows` rows: [1, W] (broadcasts) or [N, W]."""
        device, dtype = self.freqs.device, self.feature_dtype
        if isinstance(value, LayerRows):
            if value.index.shape != (n_rows,):
                raise ValueError(f"per-row table index must have shape [{n_rows}], got {tuple(value.index.shape)}")
            return self.embed_values(value.values.to(device=device, dtype=dtype))[value.index]
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return self.embed_values(torch.as_tensor(value, dtype=dtype, device=device).reshape(1))
        if value.shape != (n_rows,):
            raise ValueError(f"per-row scalar must have shape [{n_rows}], got {tuple(value.shape)}")
        return self.embed_values(value.to(device=device, dtype=dtype))


class ResBlock(nn.Module):
    """``a + gate * MLP(RMSNorm(a) * (1 + scale) + shift)`` with (shift, scale, gate) from adaLN."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.in_ln = RMSNorm(width, eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.in_ln(a) * (1 + scale) + shift
        return a + gate * self.mlp(h)


class FinalLayer(nn.Module):
    """``Linear_out(RMSNorm(a) * (1 + scale) + shift)`` with (shift, scale) from adaLN."""

    def __init__(self, width: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_final = RMSNorm(width, eps)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(a) * (1 + scale) + shift)


class VelocityField(nn.Module):
    """The velocity network of DESIGN.md §1, width W = dim, K = depth blocks.

    ``y = layer_embed(ℓ) + cond_embed(c) + time_embed(t)``; ``a = input_proj(x_t)``;
    K adaLN residual MLP blocks; an adaLN final layer projecting back to dim.
    Initialised so that v ≡ 0 (adaLN outputs and the output linear are zero).

    Args:
        dim: hidden size D of the policy (and the width W of this network).
        depth: number of residual blocks K (>= 1).
        eps: RMSNorm epsilon, the policy's ``rms_norm_eps``.
    """

    def __init__(self, dim: int, depth: int, eps: float = 1e-6):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"VelocityField: dim must be a positive integer, got {dim!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"VelocityField: depth must be a positive integer, got {depth!r}")
        if not eps > 0:
            raise ValueError(f"VelocityField: eps must be positive, got {eps!r}")
        self.dim, self.depth, self.eps = dim, depth, float(eps)
        self.input_proj = nn.Linear(dim, dim)
        self.cond_embed = nn.Linear(dim, dim)
        self.time_embed = ScalarEmbedder(dim)
        self.layer_embed = ScalarEmbedder(dim)
        self.res_blocks = nn.ModuleList(ResBlock(dim, eps) for _ in range(depth))
        self.final_layer = FinalLayer(dim, dim, eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero biases; adaLN outputs and the output linear zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        zeroed = [block.adaLN_modulation[1] for block in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def conditioning(self, cond: torch.Tensor, t: Scalar, layer: Union[Scalar, LayerRows]) -> torch.Tensor:
        """The adaLN conditioning ``y`` [N, W] for contexts `cond` [N, D].

        Summed as the released RLFR module sums it, ``(lemb + cond) + temb``: in bf16 another order rounds
        differently, and this one gives bit-identical velocities to the released module on CPU.
        """
        n = cond.shape[0]
        return self.layer_embed(layer, n) + self.cond_embed(cond) + self.time_embed(t, n)

    def forward(self, x_t: torch.Tensor, t: Scalar, cond: torch.Tensor, layer: Union[Scalar, LayerRows]
                ) -> torch.Tensor:
        """Velocity v [N, D] at points `x_t` [N, D], times `t`, contexts `cond` [N, D], layer fractions `layer`.

        `t` and `layer` are Python floats, 0-d tensors, or [N] tensors; `layer` may also be a `LayerRows`.
        """
        if x_t.dim() != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"VelocityField: x_t must be [N, {self.dim}], got {tuple(x_t.shape)}")
        if cond.shape != x_t.shape:
            raise ValueError(f"VelocityField: cond must match x_t {tuple(x_t.shape)}, got {tuple(cond.shape)}")
        y = self.conditioning(cond, t, layer)
        a = self.input_proj(x_t)
        for block in self.res_blocks:
            a = block(a, y)
        return self.final_layer(a, y)
