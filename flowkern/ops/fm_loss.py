"""Triton training path of `flow_matching_loss`: fused forward and backward around cuBLAS GEMMs.

Registered as ``backend="triton"`` for ``flow_matching_loss``. The result and
every gradient equal the torch reference's (`flowkern.flow._flow_matching_loss_torch`)
up to rounding; the kernels are in `flowkern.ops.fm_loss_kernels`.

Design
------
The GEMMs run on cuBLAS (``torch.addmm`` with the bias in the cuBLASLt
epilogue); every elementwise step between them is one fused Triton row pass.
Why cuBLAS rather than fused Triton GEMMs: at the 7B shape one GEMM of the
block MLP (16,384 × 3584 × 3584) is 0.42 TFLOP, 0.67 ms at cuBLAS's 624 TF/s,
while the elementwise pass that a Triton epilogue would absorb moves 2 units
of 117 MB, 0.06 ms. The measured Triton GEMM with the bias·SiLU epilogue runs
at 583 TF/s on that shape (DESIGN.md §4), 0.72 ms: fusing saves 0.06 ms of
traffic and loses 0.05 ms of GEMM rate, a wash, while cuBLAS keeps the
GEMMs portable across Triton versions. Bytes are therefore cut where they
are cheap to cut: in the row passes and in what is saved for backward.

Per row (units of W elements of the activation dtype):

- forward: x_t (Philox ε in-kernel), ``y``/``silu(y)``, then per block one
  ``modulate`` pass that applies the previous block's ``a + gate·z2`` and this
  block's ``RMSNorm(a)(1+scale)+shift`` together, a SiLU pass, and a final
  per-token loss reduction: 12 + 9K units.
- backward: 15 + 20K units (see each kernel's docstring), plus the cuBLAS
  accumulation of d silu(y) over the K + 1 adaLN GEMMs.
- saved for backward: x_t, y, silu(y), v, each block's input a, z1 = W1·h+b1,
  z2 = W2·silu(z1)+b2 and the adaLN output [3W] (2W for the final layer), plus
  an fp32 rstd per row and norm: 6K + 7 units, and 2 more in the time
  embedder's autograd. The block input h and the MLP activation silu(z1) are
  recomputed in backward (fused into passes that run anyway); the noise ε is
  regenerated from its Philox seed, never stored. Counted with
  ``torch.autograd.graph.saved_tensors_hooks`` in bf16: 33 units at the 1.5B
  shape and 45 at the 7B shape, against eager's 66 and 92 (eager keeps ~13 per
  block: fp32 norm inputs, h, the (1+scale) and gate products, SiLU inputs and
  outputs per module).

At the 7B shape (D = 3584, K = 6, 16,384 tokens) the GEMMs are 44.7 TFLOP
(forward, data and weight gradients), 69 ms at 650 TF/s, and the row passes
move ~200 units = 23.5 GB, ≥ 5.6 ms at 4.2 TB/s: the floor of this design is
≈ 75 ms, against 92.8 ms eager (1.24×; the GEMMs alone bound any design at
≈ 1.35×). At the 1.5B shape (D = 1536, K = 4: 5.9 TFLOP, 142 units of 50 MB)
it is ≈ 9 + 1.7 ms against 19.7 ms.

Gradients are never computed in the forward pass: the backward reads
``grad_output`` and scales by it (Liger-Kernel #968 / PR #1298), so
``(c * loss).backward()`` and losses combined with others are exact.

The embedders (`cond_embed`, `time_embed`, `layer_embed`) run as ordinary
torch modules with autograd: their outputs enter the fused function as inputs,
``cond_embed(c)`` once per token (not once per repeat), and the function returns
their gradients. `t`, `noise` and the mask weights are constants (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import backend
from ..field import VelocityField
from . import _triton
from . import fm_loss_kernels as kern
from ._triton import why_unavailable

Scalar = Union[float, torch.Tensor]

# Triton kernels accumulate in fp32; float64 fields go to the float64 torch reference.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = torch.finfo(torch.float32).tiny
# Parameters of one residual block and of the final layer, in `field_parameters` order.
_BLOCK = ("in_ln.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
          "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
_FINAL = ("norm_final.weight", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "linear.weight",
          "linear.bias")
_FIRST_PARAM = 9  # index of the first parameter among _FlowMatchingLoss.forward's inputs


def field_parameters(field: VelocityField) -> list[torch.nn.Parameter]:
    """The parameters the fused function differentiates, in its order: input_proj (weight, bias),
    per block `_BLOCK`, then `_FINAL`. The embedders' parameters are handled by autograd."""
    params = [field.input_proj.weight, field.input_proj.bias]
    for block in field.res_blocks:
        named = dict(block.named_parameters())
        params += [named[name] for name in _BLOCK]
    named = dict(field.final_layer.named_parameters())
    return params + [named[name] for name in _FINAL]


@dataclass(frozen=True)
class _Config:
    n_tok: int
    repeats: int
    width: int
    depth: int
    eps: float


class _Params:
    """Named views of the flat parameter tuple."""

    def __init__(self, params: tuple[torch.Tensor, ...], depth: int):
        self.flat = params
        self.depth = depth

    @property
    def input(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flat[0], self.flat[1]

    def block(self, k: int) -> tuple[torch.Tensor, ...]:
        """(norm weight, W1, b1, W2, b2, W_ada, b_ada) of block k."""
        base = 2 + len(_BLOCK) * k
        return self.flat[base:base + len(_BLOCK)]

    def final(self) -> tuple[torch.Tensor, ...]:
        """(norm weight, W_ada, b_ada, W_out, b_out)."""
        base = 2 + len(_BLOCK) * self.depth
        return self.flat[base:base + len(_FINAL)]

    def norm_and_ada(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(norm weight, W_ada, b_ada) of block k, or of the final layer for k == depth."""
        if k == self.depth:
            return self.final()[:3]
        ln, _, _, _, _, wa, ba = self.block(k)
        return ln, wa, ba

    def index_block(self, k: int) -> int:
        return _FIRST_PARAM + 2 + len(_BLOCK) * k

    def index_final(self) -> int:
        return _FIRST_PARAM + 2 + len(_BLOCK) * self.depth


def _slots(ada: torch.Tensor, width: int) -> list[torch.Tensor]:
    """The [rows, W] column slots (shift, scale[, gate]) of an adaLN output or its gradient."""
    return [ada[:, i * width:(i + 1) * width] for i in range(ada.shape[1] // width)]


def _launch(kernel, tiling: kern.RowTiling, *args, **constexprs) -> None:
    """Launch `kernel` on the device of its first tensor argument (`_triton.device_guard`), not the current one."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with _triton.device_guard(device):
        kernel[(tiling.grid,)](*args, tiling.rows_per_prog, BLOCK_M=tiling.block_m, BLOCK_D=tiling.block_d,
                               num_warps=tiling.num_warps, **constexprs)


def _partials(tiling: kern.RowTiling, slots: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.empty((tiling.grid, slots, width), dtype=torch.float32, device=device)


class _FlowMatchingLoss(torch.autograd.Function):
    """loss = Σ_r Σ_n w_n · mean_D (v(x_t) - u)² / (R·Σw) for the block network, given the embeddings."""

    @staticmethod
    def forward(ctx, x1, cond_lin, e_t, e_l, noise, seed, t, weights, cfg: _Config, *params):
        p = _Params(params, cfg.depth)
        R, N, W = cfg.repeats, cfg.n_tok, cfg.width
        rows, dtype, device = R * N, params[0].dtype, x1.device
        tiling = kern.row_tiling(rows, W, device)
        has_noise = noise is not None
        noise_arg, noise_stride = (noise, noise.stride(0)) if has_noise else (x1, 0)
        seed_arg = seed if seed is not None else t

        x_t = torch.empty((rows, W), dtype=dtype, device=device)
        _launch(kern.interp_kernel, tiling, x1, x1.stride(0), noise_arg, noise_stride, seed_arg, t, x_t,
                rows, N, W, HAS_NOISE=has_noise)
        y = torch.empty_like(x_t)
        silu_y = torch.empty_like(x_t)
        per_token_l = e_l.shape[0] != 1
        _launch(kern.cond_kernel, tiling, cond_lin, e_t, e_l, e_l.stride(0), y, silu_y, rows, N, W,
                EL_PER_TOKEN=per_token_l)

        w_in, b_in = p.input
        a = torch.addmm(b_in, x_t, w_in.t())
        adas = []
        for k in range(cfg.depth + 1):
            _, wa, ba = p.norm_and_ada(k)
            adas.append(torch.addmm(ba, silu_y, wa.t()))

        acts, rstds, z1s, z2s = [], [], [], []
        h = torch.empty_like(x_t)
        rstd = torch.empty(rows, dtype=torch.float32, device=device)
        shift, scale = _slots(adas[0], W)[:2]
        _launch(kern.modulate_kernel, tiling, a, a, 0, a, shift, scale, adas[0].stride(0), p.block(0)[0],
                a, h, rstd, rstd, rows, W, cfg.eps, RESIDUAL=False, QUANT=False)
        for k in range(cfg.depth):
            acts.append(a)
            rstds.append(rstd)
            _, w1, b1, w2, b2, _, _ = p.block(k)
            z1 = torch.addmm(b1, h, w1.t())
            z2 = torch.addmm(b2, F.silu(z1), w2.t())
            z1s.append(z1)
            z2s.append(z2)
            gate = _slots(adas[k], W)[2]
            ln_next = p.norm_and_ada(k + 1)[0]
            shift, scale = _slots(adas[k + 1], W)[:2]
            a_next, h, rstd = torch.empty_like(a), torch.empty_like(h), torch.empty_like(rstd)
            _launch(kern.modulate_kernel, tiling, a, gate, adas[k].stride(0), z2, shift, scale,
                    adas[k + 1].stride(0), ln_next,
                    a_next, h, rstd, rstd, rows, W, cfg.eps, RESIDUAL=True, QUANT=False)
            a = a_next
        acts.append(a)
        rstds.append(rstd)
        w_out, b_out = p.final()[3:]
        v = torch.addmm(b_out, h, w_out.t())
        del h

        part = torch.empty(tiling.grid, dtype=torch.float32, device=device)
        _launch(kern.loss_kernel, tiling, v, x1, x1.stride(0), noise_arg, noise_stride, seed_arg, weights, part,
                rows, N, W, HAS_NOISE=has_noise)
        total = weights.sum() * R
        loss = part.sum() / total.clamp_min(_TINY)

        ctx.cfg = cfg
        ctx.has_noise = has_noise
        ctx.e_l_shape = tuple(e_l.shape)
        ctx.save_for_backward(x1, noise, seed, t, weights, total, x_t, y, silu_y, v,
                              *acts, *rstds, *z1s, *z2s, *adas, *params)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cfg: _Config = ctx.cfg
        K, R, N, W = cfg.depth, cfg.repeats, cfg.n_tok, cfg.width
        saved = ctx.saved_tensors
        x1, noise, seed, t, weights, total, x_t, y, silu_y, v = saved[:10]
        rest = saved[10:]
        acts, rstds = rest[:K + 1], rest[K + 1:2 * K + 2]
        z1s, z2s = rest[2 * K + 2:3 * K + 2], rest[3 * K + 2:4 * K + 2]
        adas, params = rest[4 * K + 2:5 * K + 3], rest[5 * K + 3:]
        p = _Params(params, K)
        need = ctx.needs_input_grad
        rows, dtype, device = R * N, params[0].dtype, x1.device
        tiling = kern.row_tiling(rows, W, device)
        noise_arg, noise_stride = (noise, noise.stride(0)) if ctx.has_noise else (x1, 0)
        seed_arg = seed if seed is not None else t
        grads: list[Optional[torch.Tensor]] = [None] * (_FIRST_PARAM + len(params))
        need_sy = any(need[1:4])

        # d loss / d v[r, n] = grad_out · 2/(D·R·Σw) · w_n · (v - u): the scale is read from grad_out here.
        coef = torch.where(total > 0, grad_out.float() * (2.0 / W) / total.clamp_min(_TINY),
                           torch.zeros((), dtype=torch.float32, device=device)).reshape(1)

        # ---- final layer
        ln_f, wa_f, _, w_out, _ = p.final()
        fi = p.index_final()
        dv = torch.empty((rows, W), dtype=dtype, device=device)
        h = torch.empty_like(dv)
        shift, scale = _slots(adas[K], W)
        part = _partials(tiling, 1, W, device)
        _launch(kern.loss_bwd_kernel, tiling, v, x1, x1.stride(0), noise_arg, noise_stride, seed_arg, weights,
                coef, dv, acts[K], rstds[K], shift, scale, adas[K].stride(0), ln_f, h, part, rows, N, W,
                HAS_NOISE=ctx.has_noise)
        if need[fi + 3]:
            grads[fi + 3] = dv.t() @ h
        if need[fi + 4]:
            grads[fi + 4] = part.sum(0)[0].to(dtype)
        d_ada = torch.empty((rows, 2 * W), dtype=dtype, device=device)
        d_shift, d_scale = _slots(d_ada, W)
        torch.mm(dv, w_out, out=d_shift)
        del dv, h
        da = torch.empty((rows, W), dtype=dtype, device=device)
        part = _partials(tiling, 3, W, device)
        _launch(kern.modulate_bwd_kernel, tiling, d_shift, d_scale, d_ada.stride(0), acts[K], rstds[K], scale,
                adas[K].stride(0), ln_f, da, da, part, rows, W, HAS_RES=False, SUM_DA=False)
        sums = part.sum(0)
        grads[fi] = sums[0].to(dtype) if need[fi] else None
        if need[fi + 1]:
            grads[fi + 1] = d_ada.t() @ silu_y
        if need[fi + 2]:
            grads[fi + 2] = sums[1:3].reshape(-1).to(dtype)
        d_sy = d_ada @ wa_f if need_sy else None
        del d_ada

        # ---- residual blocks, last to first; da is the gradient of the block's output
        for k in reversed(range(K)):
            ln, w1, _, w2, _, wa, _ = p.block(k)
            bi = p.index_block(k)
            shift, scale, gate = _slots(adas[k], W)
            d_ada = torch.empty((rows, 3 * W), dtype=dtype, device=device)
            d_shift, d_scale, d_gate = _slots(d_ada, W)
            dz2, s1 = torch.empty_like(da), torch.empty_like(da)
            part = _partials(tiling, 2, W, device)
            _launch(kern.gate_bwd_kernel, tiling, da, gate, adas[k].stride(0), z2s[k], z1s[k], dz2, d_gate,
                    d_ada.stride(0), s1, part, rows, W)
            sums_gate = part.sum(0)
            if need[bi + 3]:
                grads[bi + 3] = dz2.t() @ s1
            if need[bi + 4]:
                grads[bi + 4] = sums_gate[0].to(dtype)
            ds1 = dz2 @ w2
            del dz2
            h = s1  # s1 is dead: its buffer receives the recomputed block input
            part = _partials(tiling, 1, W, device)
            _launch(kern.silu_bwd_modulate_kernel, tiling, ds1, z1s[k], ds1, acts[k], rstds[k], shift, scale,
                    adas[k].stride(0), ln, h, part, rows, W)
            dz1 = ds1
            if need[bi + 1]:
                grads[bi + 1] = dz1.t() @ h
            if need[bi + 2]:
                grads[bi + 2] = part.sum(0)[0].to(dtype)
            torch.mm(dz1, w1, out=d_shift)
            del dz1, ds1, h, s1
            sum_da = k == 0
            part = _partials(tiling, 4 if sum_da else 3, W, device)
            _launch(kern.modulate_bwd_kernel, tiling, d_shift, d_scale, d_ada.stride(0), acts[k], rstds[k], scale,
                    adas[k].stride(0), ln, da, da, part, rows, W, HAS_RES=True, SUM_DA=sum_da)
            sums = part.sum(0)
            if need[bi]:
                grads[bi] = sums[0].to(dtype)
            if need[bi + 5]:
                grads[bi + 5] = d_ada.t() @ silu_y
            if need[bi + 6]:
                grads[bi + 6] = torch.cat([sums[1], sums[2], sums_gate[1]]).to(dtype)
            if need_sy:
                d_sy.addmm_(d_ada, wa)
            del d_ada
            if sum_da:
                in_bias_grad = sums[3]

        # ---- input projection and interpolation
        w_in, _ = p.input
        if need[_FIRST_PARAM]:
            grads[_FIRST_PARAM] = da.t() @ x_t
        if need[_FIRST_PARAM + 1]:
            grads[_FIRST_PARAM + 1] = in_bias_grad.to(dtype)
        if need[0]:
            dxt = da @ w_in
            dx1 = torch.empty((N, W), dtype=x1.dtype, device=device)
            n_tiling = kern.row_tiling(N, W, device)
            _launch(kern.input_grad_kernel, n_tiling, dxt, t, v, x1, x1.stride(0), noise_arg, noise_stride,
                    seed_arg, weights, coef, dx1, N, R, W, HAS_NOISE=ctx.has_noise)
            grads[0] = dx1
        del da

        # ---- conditioning: y = lemb(ℓ) + cond_embed(c)[n] + temb(t)[r, n]
        if need_sy:
            dy = torch.empty_like(d_sy)
            _launch(kern.cond_bwd_kernel, tiling, d_sy, y, dy, rows, W)
            per_token = dy.view(R, N, W).sum(0) if R > 1 else dy
            grads[1] = per_token if need[1] else None
            grads[2] = dy if need[2] else None
            if need[3]:
                grads[3] = dy.sum(0, keepdim=True) if ctx.e_l_shape[0] == 1 else per_token
        return tuple(grads)


def flow_matching_loss_triton(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: Scalar,
                              weights: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor],
                              generator: Optional[torch.Generator]) -> torch.Tensor:
    """The ``triton`` backend of `flowkern.flow_matching_loss` (normalised inputs, see `flowkern.flow`).

    Args:
        field: the velocity field; its weights must share one dtype.
        target: x1 [N, D]; gets a gradient when it requires one (``input_grad=True``).
        cond: contexts [N, D]; gradient through ``cond_embed`` likewise.
        layer: a float, an fp32 [N] tensor of layer fractions, or a `LayerRows` table.
        weights: fp32 [N] mask weights.
        t: fp32 [R, N] times.
        noise: ε [R, N, D], or None to draw it in-kernel (Philox keyed by a seed from `generator`).
        generator: source of the Philox key when `noise` is None.

    Float64 fields are evaluated by the float64 torch reference (the kernels compute in fp32).
    """
    dtypes = {p.dtype for p in field.parameters()}
    if len(dtypes) != 1:
        raise TypeError(f"flow_matching_loss (triton): the field's parameters must share one dtype, got "
                        f"{sorted(str(d) for d in dtypes)}")
    dtype = dtypes.pop()
    if dtype not in _KERNEL_DTYPES:
        from ..flow import _flow_matching_loss_torch
        return _flow_matching_loss_torch(field, target, cond, layer, weights, t, noise, generator)
    repeats, n = t.shape
    width = field.dim
    device = target.device
    x1 = target if target.stride(-1) == 1 else target.contiguous()
    t = t.contiguous()
    weights = weights.contiguous()
    if noise is not None:
        noise = noise.reshape(repeats * n, width)
        if noise.stride(-1) != 1:
            noise = noise.contiguous()
    seed = _triton.draw_seed(generator, device) if noise is None else None
    cond_lin = field.cond_embed(cond.to(dtype))
    e_t = field.time_embed.embed_values(t.reshape(-1))
    e_l = field.layer_embed(layer, n)
    cfg = _Config(n_tok=n, repeats=repeats, width=width, depth=field.depth, eps=field.eps)
    return _FlowMatchingLoss.apply(x1, cond_lin.contiguous(), e_t.contiguous(), e_l.contiguous(), noise, seed,
                                   t, weights, cfg, *field_parameters(field))


backend.register("flow_matching_loss", "triton", flow_matching_loss_triton, why_unavailable)
