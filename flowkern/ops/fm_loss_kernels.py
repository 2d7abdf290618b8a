"""Triton row kernels of the fused flow-matching training path (see `flowkern.ops.fm_loss`).

Every kernel walks whole rows of width W (the field's width, = D): a
program owns ``rows_per_prog`` consecutive rows, processed ``BLOCK_M`` at a
time as a [BLOCK_M, BLOCK_D] tile with ``BLOCK_D = next_pow2(W)``, so a row
reduction (RMSNorm, the per-token loss) is one ``tl.sum`` and a column
reduction (bias and norm-weight gradients) is a register accumulator written
once per program as a partial sum. The partials [grid, k, W] are summed by
the launcher in a fixed order, so every gradient is deterministic (no atomics).

Conventions, shared by all kernels:
- every load and store is masked (rows ``< rows``, columns ``< width``);
- every value is upcast to fp32 before arithmetic; ``_rnd`` reproduces the
  reference's intermediate roundings to the activation dtype where the
  torch reference rounds (a no-op in fp32);
- row offsets are int64 (R·N·3W can exceed 2**31);
- no ``tl.make_block_ptr``, no autotune: the launch geometry comes from
  `row_tiling`, which gives the interpreter few, large programs.

Byte counts in the kernel comments are per row of W elements, in units of
``E`` = bytes per element of the activation dtype (2 for bf16). The floor
quoted is for 16,384 rows at the 7B shape (W = 3584, E = 2: one unit is
117 MB) at the H200's 4.2 TB/s device-copy rate: 28 µs per unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._triton import interpreting

# Elements of one [BLOCK_M, BLOCK_D] fp32 tile per program iteration on a GPU:
# 4096 fp32 over 8 warps is 16 registers per thread per live tile.
_GPU_TILE = 4096
# The interpreter runs each program as numpy calls: fewer, larger programs are faster.
_INTERPRETER_TILE = 1 << 16
# Programs per SM on a GPU: enough waves to hide the tail, few enough partial-sum rows.
_PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class RowTiling:
    """Launch geometry of a row kernel: ``grid`` programs of ``rows_per_prog`` rows each."""

    block_d: int
    block_m: int
    rows_per_prog: int
    grid: int
    num_warps: int


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_tiling(rows: int, width: int, device: torch.device) -> RowTiling:
    """The launch geometry for `rows` rows of `width` elements on `device` (rows >= 1)."""
    if interpreting() or device.type != "cuda":
        block_d = triton.next_power_of_2(width)
        block_m = max(1, min(triton.next_power_of_2(rows), _INTERPRETER_TILE // block_d))
        return RowTiling(block_d, block_m, block_m, triton.cdiv(rows, block_m), 1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return gpu_row_tiling(rows, width, _sm_count(index))


def gpu_row_tiling(rows: int, width: int, sm_count: int) -> RowTiling:
    """The GPU launch geometry for `rows` rows of `width` elements on a device with `sm_count` SMs."""
    block_d = triton.next_power_of_2(width)
    block_m = max(1, min(32, _GPU_TILE // block_d))
    num_warps = max(1, min(16, block_m * block_d // 512))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, _PROGRAMS_PER_SM * sm_count), block_m) * block_m
    return RowTiling(block_d, block_m, rows_per_prog, triton.cdiv(rows, rows_per_prog), num_warps)


# --------------------------------------------------------------------------- shared helpers

def _device_fn(fn):
    """``@triton.jit`` for a device helper; a plain function under the interpreter, which re-patches
    ``triton.language`` on every call of a nested jit function (~3 ms each, ~250 calls per training
    step). The interpreter runs the kernel bodies as Python either way, with the same tl calls."""
    return fn if interpreting() else triton.jit(fn)


@_device_fn
def _rnd(x, DT: tl.constexpr):
    """Round fp32 `x` to the activation dtype and back (the reference's intermediate rounding)."""
    return x.to(DT).to(tl.float32)


@_device_fn
def _tile(row0, rows, width, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row indices [BLOCK_M] (int32 and int64), their mask, and the [BLOCK_M, BLOCK_D] tile mask."""
    r = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = r < rows
    mask = rmask[:, None] & (cols < width)[None, :]
    return r, r.to(tl.int64), rmask, mask


@_device_fn
def _load(ptr, r64, stride, mask, BLOCK_D: tl.constexpr):
    """A [BLOCK_M, BLOCK_D] fp32 tile of rows `r64` of a row-major matrix with row stride `stride`."""
    cols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + r64[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@_device_fn
def _store(ptr, r64, stride, value, mask, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    tl.store(ptr + r64[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@_device_fn
def _store_partial(part_ptr, pid, slot, n_slots, width, acc, BLOCK_D: tl.constexpr):
    """Write a program's column partial sum `acc` [BLOCK_D] to ``part[pid, slot, :width]``."""
    cols = tl.arange(0, BLOCK_D)
    base = (pid * n_slots + slot).to(tl.int64) * width
    tl.store(part_ptr + base + cols, acc, mask=cols < width)


@_device_fn
def _round_e4m3(q):
    """`q` (fp32, |q| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, still as fp32.

    Done in integer arithmetic so that the cast to fp8 that follows is exact: the interpreter's own
    fp32 -> fp8 conversion rounds ties away and drops the carry into the exponent (127.9 -> 64), while
    the GPU's cvt.rn.satfinite rounds to nearest even. Normal range (|q| >= 2^-6): round the fp32 bit
    pattern to 3 mantissa bits. Subnormals: multiples of 2^-9, rounded half to even, sign kept (-0.0).
    """
    bits = q.to(tl.uint32, bitcast=True)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    k = tl.abs(q) * 512.0
    up = tl.floor(k + 0.5)
    tie_odd = (up - k == 0.5) & (up - 2.0 * tl.floor(up * 0.5) != 0.0)
    sub = (tl.where(tie_odd, up - 1.0, up) * 0.001953125).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    return tl.where(tl.abs(q) >= 0.015625, normal, sub).to(tl.float32, bitcast=True)


@_device_fn
def _store_rows(ptr, scale_ptr, r64, rmask, width, value, mask, QUANT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store rows `value` [BLOCK_M, BLOCK_D] (fp32, row stride `width`) in `ptr`'s dtype, or, with QUANT,
    as float8_e4m3fn with one fp32 scale per row: ``inv = 448 / max(amax, 1e-30)``, ``q = value · inv``
    stored as e4m3 and ``scale = 1 / inv``, so that ``value ≈ q · scale`` (``torch._scaled_mm``'s row-wise
    ``scale_a``). The same arithmetic as `flowkern.ops.scores_fp8.quantize_rows` (448 = FP8_MAX there)."""
    if QUANT:
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(value), 0.0), axis=1), 1e-30)
        inv = 448.0 / amax
        q = tl.minimum(tl.maximum(value * inv[:, None], -448.0), 448.0)
        tl.store(scale_ptr + r64, 1.0 / inv, mask=rmask)
        _store(ptr, r64, width, _round_e4m3(q), mask, BLOCK_D)
    else:
        _store(ptr, r64, width, value, mask, BLOCK_D)


@_device_fn
def _std_normal(seed, r64, BLOCK_D: tl.constexpr):
    """ε ~ N(0, 1) for rows `r64` × columns: Philox-4x32 keyed by `seed`, counter (column, row lo, row hi, 0),
    then Box–Muller. A pure function of (seed, row, column): the backward pass regenerates the same ε."""
    cols = tl.arange(0, BLOCK_D)
    zero = (r64[:, None] * 0 + cols[None, :] * 0).to(tl.uint32)
    c0 = zero + cols[None, :].to(tl.uint32)
    c1 = zero + (r64 & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = zero + (r64 >> 32).to(tl.uint32)[:, None]
    i1, i2, _, _ = tl.philox(seed, c0, c1, c2, zero)
    x1 = i1.to(tl.int32, bitcast=True)
    x2 = i2.to(tl.int32, bitcast=True)
    u1 = tl.where(x1 < 0, -x1 - 1, x1).to(tl.float32) * 4.6566127342e-10
    u2 = tl.where(x2 < 0, -x2 - 1, x2).to(tl.float32) * 4.6566127342e-10
    u1 = tl.maximum(u1, 1.0e-7)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@_device_fn
def _noise(noise_ptr, noise_stride, seed_ptr, r64, mask, HAS_NOISE: tl.constexpr, BLOCK_D: tl.constexpr):
    """ε for rows `r64`: loaded from the caller's noise, or regenerated from the Philox seed."""
    if HAS_NOISE:
        eps = _load(noise_ptr, r64, noise_stride, mask, BLOCK_D)
    else:
        eps = _std_normal(tl.load(seed_ptr), r64, BLOCK_D)
    return eps


@_device_fn
def _velocity_error(v_ptr, x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, wt_ptr, r, r64, rmask, mask,
                    n_tok, width, HAS_NOISE: tl.constexpr, BLOCK_D: tl.constexpr):
    """``v - u`` with ``u = x1[token] - ε`` (0 outside the tile) and the token weights, for rows r = repeat·N + token."""
    tok = (r % n_tok).to(tl.int64)
    eps = _noise(noise_ptr, noise_stride, seed_ptr, r64, mask, HAS_NOISE, BLOCK_D)
    diff = _load(v_ptr, r64, width, mask, BLOCK_D) - (_load(x1_ptr, tok, x1_stride, mask, BLOCK_D) - eps)
    return tl.where(mask, diff, 0.0), tl.load(wt_ptr + tok, mask=rmask, other=0.0)


@_device_fn
def _modulate(a, rstd, w, shift, scale, DT: tl.constexpr):
    """``h = (w · cast(a·rstd)) · (1 + scale) + shift`` with the reference's roundings; fp32 in and out."""
    n = _rnd(w[None, :] * _rnd(a * rstd[:, None], DT), DT)
    return _rnd(n * _rnd(1.0 + scale, DT), DT) + shift


@_device_fn
def _recompute_h(h_ptr, a_ptr, rstd_ptr, shift_ptr, scale_ptr, ada_stride, w, r64, rmask, mask, width,
                 BLOCK_D: tl.constexpr):
    """Store the block input ``h`` recomputed from the saved residual `a`, its rstd and the adaLN output."""
    a = _load(a_ptr, r64, width, mask, BLOCK_D)
    rstd = tl.load(rstd_ptr + r64, mask=rmask, other=0.0)
    shift = _load(shift_ptr, r64, ada_stride, mask, BLOCK_D)
    scale = _load(scale_ptr, r64, ada_stride, mask, BLOCK_D)
    _store(h_ptr, r64, width, _modulate(a, rstd, w, shift, scale, h_ptr.dtype.element_ty), mask, BLOCK_D)


@_device_fn
def _silu(z):
    return z * tl.sigmoid(z)


@_device_fn
def _dsilu(z):
    """d silu(z) / dz = σ(z) · (1 + z · (1 - σ(z)))."""
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# --------------------------------------------------------------------------- forward kernels

# Largest offset: r·W into x_t and noise ([R·N, W], R·N·W ≥ 2**31 at large batches): int64 rows (`_tile`).
@triton.jit
def interp_kernel(x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, t_ptr, xt_ptr,
                  rows, n_tok, width, rows_per_prog,
                  HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``x_t = t·x1 + (1-t)·ε`` for rows r = repeat·N + token.

    Bytes: reads x1 (1, or 2 for fp32 targets), ε (1 when supplied, 0 with Philox), t (4 B);
    writes x_t (1) -> 2-3 units, 56-84 µs floor. Philox: ~70 integer ops per element, compute-bound
    only below ~3 units of traffic.
    """
    pid = tl.program_id(0)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        tok = (r % n_tok).to(tl.int64)
        t = tl.load(t_ptr + r64, mask=rmask, other=0.0)[:, None]
        x1 = _load(x1_ptr, tok, x1_stride, mask, BLOCK_D)
        eps = _noise(noise_ptr, noise_stride, seed_ptr, r64, mask, HAS_NOISE, BLOCK_D)
        _store(xt_ptr, r64, width, t * x1 + (1.0 - t) * eps, mask, BLOCK_D)


# Largest offset: r·W into y and SiLU(y) (R·N·W): int64 rows.
@triton.jit
def cond_kernel(cl_ptr, et_ptr, el_ptr, el_stride, y_ptr, sy_ptr,
                rows, n_tok, width, rows_per_prog,
                EL_PER_TOKEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``y = (lemb(ℓ)[token or 0] + cond_embed(c)[token]) + temb(t)[row]`` (the reference's and the released
    module's order, rounded as they round) and ``silu(y)``.

    Bytes: reads cond_embed(c) and temb (2 units; lemb is one cached row unless per token),
    writes y and silu(y) (2) -> 4 units, 112 µs floor.
    """
    pid = tl.program_id(0)
    DT = y_ptr.dtype.element_ty
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        tok = (r % n_tok).to(tl.int64)
        if EL_PER_TOKEN:
            y = _load(el_ptr, tok, el_stride, mask, BLOCK_D)
        else:
            y = _load(el_ptr, tok * 0, 0, mask, BLOCK_D)
        y = _rnd(y + _load(cl_ptr, tok, width, mask, BLOCK_D), DT)
        y = _rnd(y + _load(et_ptr, r64, width, mask, BLOCK_D), DT)
        _store(y_ptr, r64, width, y, mask, BLOCK_D)
        _store(sy_ptr, r64, width, _silu(y), mask, BLOCK_D)


# Largest offset: r·ada_stride into the adaLN output (R·N·3W, the largest): int64 rows.
@triton.jit
def modulate_kernel(a_ptr, gate_ptr, gate_stride, z2_ptr, shift_ptr, scale_ptr, ada_stride, w_ptr,
                    a_out_ptr, h_ptr, h_scale_ptr, rstd_ptr, rows, width, eps, rows_per_prog,
                    RESIDUAL: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """[``a = a + gate·z2`` (the previous block's residual, when RESIDUAL)], then
    ``h = RMSNorm(a)·(1 + scale) + shift`` and ``rstd = 1/sqrt(mean(a²) + eps)``.

    Fusing block k's gate/residual with block k+1's norm saves one read of a. Arithmetic rounds to a's
    dtype; with QUANT (fp8 scoring, `flowkern.ops.scores_gemm`) h is stored as e4m3 with one scale per
    row in `h_scale_ptr` (`_store_rows`), otherwise `h_scale_ptr` is never read.
    Bytes: reads a, shift, scale (+ gate, z2), writes h (+ a) and rstd (4 B) -> 4 units
    (7 with the residual), 112 (196) µs floor; ~12 FLOP per element.
    """
    pid = tl.program_id(0)
    DT = a_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        a = _load(a_ptr, r64, width, mask, BLOCK_D)
        if RESIDUAL:
            gz = _load(gate_ptr, r64, gate_stride, mask, BLOCK_D) * _load(z2_ptr, r64, width, mask, BLOCK_D)
            a = _rnd(a + _rnd(gz, DT), DT)
            _store(a_out_ptr, r64, width, a, mask, BLOCK_D)
        rstd = 1.0 / tl.sqrt(tl.sum(a * a, axis=1) / width + eps)
        tl.store(rstd_ptr + r64, rstd, mask=rmask)
        shift = _load(shift_ptr, r64, ada_stride, mask, BLOCK_D)
        scale = _load(scale_ptr, r64, ada_stride, mask, BLOCK_D)
        _store_rows(h_ptr, h_scale_ptr, r64, rmask, width, _rnd(_modulate(a, rstd, w, shift, scale, DT), DT), mask,
                    QUANT, BLOCK_D)


# Largest offset: r·W into v and noise (R·N·W): int64 rows; part[pid] is small.
@triton.jit
def loss_kernel(v_ptr, x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, wt_ptr, part_ptr,
                rows, n_tok, width, rows_per_prog,
                HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per program: ``Σ_rows w[token] · mean_D (v - (x1 - ε))²`` in fp32 -> part[pid].

    Bytes: reads v, x1 (+ ε when supplied) -> 2-3 units, 56-84 µs floor; 4 FLOP per element.
    """
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        diff, wt = _velocity_error(v_ptr, x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, wt_ptr, r, r64,
                                   rmask, mask, n_tok, width, HAS_NOISE, BLOCK_D)
        acc += wt * (tl.sum(diff * diff, axis=1) / width)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


# --------------------------------------------------------------------------- backward kernels

# Largest offset: r·ada_stride into shift/scale (R·N·3W): int64 rows.
@triton.jit
def loss_bwd_kernel(v_ptr, x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, wt_ptr, coef_ptr, dv_ptr,
                    a_ptr, rstd_ptr, shift_ptr, scale_ptr, ada_stride, w_ptr, h_ptr, part_ptr,
                    rows, n_tok, width, rows_per_prog,
                    HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dv = coef · w[token] · (v - u)`` with coef = grad_output·2/(D·R·Σw) read from memory (never
    baked in at forward time), plus the recomputed final-layer input ``h = RMSNorm(a)(1+scale)+shift``
    that the output GEMM's weight gradient needs. Partial column sums of dv give the output bias grad.

    Bytes: reads v, x1, a, shift, scale (+ ε), writes dv, h -> 7-8 units, 196-224 µs floor.
    """
    pid = tl.program_id(0)
    DT = dv_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
    coef = tl.load(coef_ptr)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        diff, wt = _velocity_error(v_ptr, x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, wt_ptr, r, r64,
                                   rmask, mask, n_tok, width, HAS_NOISE, BLOCK_D)
        dv = _rnd(coef * wt[:, None] * diff, DT)
        _store(dv_ptr, r64, width, dv, mask, BLOCK_D)
        acc += tl.sum(dv, axis=0)
        _recompute_h(h_ptr, a_ptr, rstd_ptr, shift_ptr, scale_ptr, ada_stride, w, r64, rmask, mask, width, BLOCK_D)
    _store_partial(part_ptr, pid, 0, 1, width, acc, BLOCK_D)


# Largest offset: r·ada_stride (R·N·3W): int64 rows; partials (pid·slots + s)·W cast to int64.
@triton.jit
def modulate_bwd_kernel(dh_ptr, dscale_ptr, d_stride, a_ptr, rstd_ptr, scale_ptr, ada_stride, w_ptr,
                        dres_ptr, da_ptr, part_ptr, rows, width, rows_per_prog,
                        HAS_RES: tl.constexpr, SUM_DA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of ``h = (w·cast(RMSNorm(a)))·(1+scale) + shift`` (+ the residual's pass-through).

    dh is the shift gradient already (it sits in the shift slot of d_ada, written there by the GEMM);
    writes ``d_scale = dh·n`` into the scale slot and ``da = d_res + rstd·(g - x̂·mean(g·x̂))`` with
    ``g = dh·(1+scale)·w``. `da` may alias `dres` (row-local read-before-write).
    Partial column sums: [Σ dh·(1+scale)·cast(x̂) (norm weight), Σ dh (shift bias), Σ d_scale
    (scale bias), Σ da (input bias, when SUM_DA)].

    Bytes: reads dh, a, scale (+ d_res), writes d_scale, da -> 5-6 units, 140-168 µs floor.
    """
    pid = tl.program_id(0)
    DT = da_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_da = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        dh = _load(dh_ptr, r64, d_stride, mask, BLOCK_D)
        a = _load(a_ptr, r64, width, mask, BLOCK_D)
        rstd = tl.load(rstd_ptr + r64, mask=rmask, other=0.0)
        scale = _load(scale_ptr, r64, ada_stride, mask, BLOCK_D)
        xhat = a * rstd[:, None]
        xc = _rnd(xhat, DT)
        n = _rnd(w[None, :] * xc, DT)
        dscale = _rnd(dh * n, DT)
        _store(dscale_ptr, r64, d_stride, dscale, mask, BLOCK_D)
        dn = dh * _rnd(1.0 + scale, DT)
        g = dn * w[None, :]
        da = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / width)[:, None])
        if HAS_RES:
            da += _load(dres_ptr, r64, width, mask, BLOCK_D)
        da = tl.where(mask, _rnd(da, DT), 0.0)
        _store(da_ptr, r64, width, da, mask, BLOCK_D)
        acc_w += tl.sum(dn * xc, axis=0)
        acc_shift += tl.sum(dh, axis=0)
        acc_scale += tl.sum(dscale, axis=0)
        if SUM_DA:
            acc_da += tl.sum(da, axis=0)
    if SUM_DA:
        _store_partial(part_ptr, pid, 0, 4, width, acc_w, BLOCK_D)
        _store_partial(part_ptr, pid, 1, 4, width, acc_shift, BLOCK_D)
        _store_partial(part_ptr, pid, 2, 4, width, acc_scale, BLOCK_D)
        _store_partial(part_ptr, pid, 3, 4, width, acc_da, BLOCK_D)
    else:
        _store_partial(part_ptr, pid, 0, 3, width, acc_w, BLOCK_D)
        _store_partial(part_ptr, pid, 1, 3, width, acc_shift, BLOCK_D)
        _store_partial(part_ptr, pid, 2, 3, width, acc_scale, BLOCK_D)


# Largest offset: r·ada_stride (R·N·3W): int64 rows; partials cast to int64.
@triton.jit
def gate_bwd_kernel(da_ptr, gate_ptr, ada_stride, z2_ptr, z1_ptr, dz2_ptr, dgate_ptr, d_stride, s1_ptr,
                    part_ptr, rows, width, rows_per_prog, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of ``a' = a + gate·z2``: ``dz2 = da'·gate``, ``d_gate = da'·z2`` (into the gate slot),
    and ``s1 = silu(z1)`` recomputed for the second MLP GEMM's weight gradient.
    Partial column sums: [Σ dz2 (second MLP bias), Σ d_gate (gate bias)].

    Bytes: reads da', gate, z2, z1, writes dz2, d_gate, s1 -> 7 units, 196 µs floor.
    """
    pid = tl.program_id(0)
    DT = dz2_ptr.dtype.element_ty
    acc_z2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        da = _load(da_ptr, r64, width, mask, BLOCK_D)
        dz2 = _rnd(da * _load(gate_ptr, r64, ada_stride, mask, BLOCK_D), DT)
        dgate = _rnd(da * _load(z2_ptr, r64, width, mask, BLOCK_D), DT)
        _store(dz2_ptr, r64, width, dz2, mask, BLOCK_D)
        _store(dgate_ptr, r64, d_stride, dgate, mask, BLOCK_D)
        _store(s1_ptr, r64, width, _silu(_load(z1_ptr, r64, width, mask, BLOCK_D)), mask, BLOCK_D)
        acc_z2 += tl.sum(dz2, axis=0)
        acc_gate += tl.sum(dgate, axis=0)
    _store_partial(part_ptr, pid, 0, 2, width, acc_z2, BLOCK_D)
    _store_partial(part_ptr, pid, 1, 2, width, acc_gate, BLOCK_D)


# Largest offset: r·ada_stride (R·N·3W): int64 rows.
@triton.jit
def silu_bwd_modulate_kernel(ds1_ptr, z1_ptr, dz1_ptr, a_ptr, rstd_ptr, shift_ptr, scale_ptr, ada_stride,
                             w_ptr, h_ptr, part_ptr, rows, width, rows_per_prog,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dz1 = ds1 · silu'(z1)`` and the recomputed block input ``h`` for the first MLP GEMM's weight
    gradient (h is never stored between forward and backward). `dz1` may alias `ds1`.
    Partial column sums: [Σ dz1 (first MLP bias)].

    Bytes: reads ds1, z1, a, shift, scale, writes dz1, h -> 7 units, 196 µs floor.
    """
    pid = tl.program_id(0)
    DT = dz1_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < width, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        dz1 = _rnd(_load(ds1_ptr, r64, width, mask, BLOCK_D) * _dsilu(_load(z1_ptr, r64, width, mask, BLOCK_D)), DT)
        _store(dz1_ptr, r64, width, dz1, mask, BLOCK_D)
        acc += tl.sum(dz1, axis=0)
        _recompute_h(h_ptr, a_ptr, rstd_ptr, shift_ptr, scale_ptr, ada_stride, w, r64, rmask, mask, width, BLOCK_D)
    _store_partial(part_ptr, pid, 0, 1, width, acc, BLOCK_D)


# Largest offset: r·W (R·N·W): int64 rows.
@triton.jit
def cond_bwd_kernel(dsy_ptr, y_ptr, dy_ptr, rows, width, rows_per_prog,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dy = d silu(y) · silu'(y)``, the gradient of cond_embed(c), temb(t) and lemb(ℓ).

    Bytes: reads d silu(y), y, writes dy -> 3 units, 84 µs floor.
    """
    pid = tl.program_id(0)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = _tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        dy = _load(dsy_ptr, r64, width, mask, BLOCK_D) * _dsilu(_load(y_ptr, r64, width, mask, BLOCK_D))
        _store(dy_ptr, r64, width, dy, mask, BLOCK_D)


# Largest offset: (rep·N + n)·W into dx_t and noise (R·N·W): int64 rows.
@triton.jit
def input_grad_kernel(dxt_ptr, t_ptr, v_ptr, x1_ptr, x1_stride, noise_ptr, noise_stride, seed_ptr, wt_ptr,
                      coef_ptr, dx1_ptr, n_tok, repeats, width, rows_per_prog,
                      HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradient of the target x1 (only with ``input_grad=True``), over tokens n:
    ``dx1[n] = Σ_r t[r,n]·dx_t[r,n] - coef·w[n]·(v[r,n] - x1[n] + ε[r,n])`` (interpolation + target velocity).

    Bytes: reads dx_t, v (+ ε) per repeat and x1 once, writes dx1 -> 2R+2 units (+R with supplied ε).
    """
    pid = tl.program_id(0)
    coef = tl.load(coef_ptr)
    for i in range(0, rows_per_prog, BLOCK_M):
        n, n64, nmask, mask = _tile(pid * rows_per_prog + i, n_tok, width, BLOCK_M, BLOCK_D)
        x1 = _load(x1_ptr, n64, x1_stride, mask, BLOCK_D)
        wt = tl.load(wt_ptr + n64, mask=nmask, other=0.0)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for rep in range(0, repeats):
            r64 = n64 + rep * n_tok
            t = tl.load(t_ptr + r64, mask=nmask, other=0.0)[:, None]
            eps = _noise(noise_ptr, noise_stride, seed_ptr, r64, mask, HAS_NOISE, BLOCK_D)
            diff = _load(v_ptr, r64, width, mask, BLOCK_D) - (x1 - eps)
            acc += t * _load(dxt_ptr, r64, width, mask, BLOCK_D) - coef * wt * diff
        _store(dx1_ptr, n64, width, acc, mask, BLOCK_D)
