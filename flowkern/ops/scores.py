"""Triton `flow_scores`: the fused scoring pass of RLFR (DESIGN.md §1).

Every (layer, token) row of the call and every rewarding timestep τ_j are
stacked along the row dimension, so each weight of the velocity field is
applied as one GEMM over ``J · N`` rows (row ``j · n + r`` is token r at
timestep j). Rows are streamed in chunks of at most `MAX_CHUNK_BYTES` of
intermediates, whatever N. Per chunk:

1. `_interpolate_kernel`  x_t = τ·x1 + (1-τ)·ε for every timestep, ε either
   loaded or drawn in-kernel from a seeded Philox stream.
2. `_cond_kernel`         cond GEMM, once per token (not per timestep); the
   epilogue adds the timestep and layer embeddings (each distinct value is
   embedded once, on the host) and stores ``SiLU(y)`` for every timestep.
3. `_linear_kernel` RMS   input_proj; the epilogue stores ``a`` and its
   per-row sum-of-squares partials (the next RMSNorm's statistics).
4. per block: `_modulate_kernel` (adaLN GEMM, shift/scale/gate accumulated
   side by side so the epilogue forms ``RMSNorm(a)·(1+scale)+shift``),
   `_linear_kernel` SILU (bias + SiLU), `_linear_kernel` RESID
   (``a + gate·(.)`` in place, with new RMS partials).
5. `_modulate_kernel` without gate for the final layer, then `_score_kernel`:
   the output GEMM's epilogue regenerates (or loads) ε, forms ``(v - u)²``
   and reduces it per row. v, u and ε never reach memory.

Row reductions across column tiles are written as fixed 64-column partial
sums (`SLOT`) and summed by the consumer, never with atomics, so a score
does not depend on the tile shapes or the launch order: a seed gives
identical scores on every call.

The interpolation is its own pass rather than the prologue of the
input_proj GEMM because drawing Philox noise inside the GEMM's A-tile load
would redo it for every one of the W / BN column tiles, which costs more
ALU time than the GEMM itself; as a separate pass it costs one read of x1
and one write of x_t plus one Philox call per four elements (about 1-2 % of
the GEMM floor at the DESIGN shapes).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, with one
autotune config and the dot operands upcast to fp32.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .. import backend
from .._device import small_tensor
from ..field import VelocityField
from ..flow import LayerRows
from . import _triton
from ._triton import interpreting, prune_configs, why_unavailable

# Intermediates held per chunk: SiLU(y), a, gate, h (x_t before input_proj), MLP hidden — each [J·n, W].
_N_BUFFERS = 5
# Bound on those intermediates: the whole call's extra memory is this plus O(N) fp32 (scores, layer index).
# With flow_reward's gathered copies (reward.SCORE_GATHER_BYTES, 128 MiB) the total stays under 0.5 GiB.
MAX_CHUNK_BYTES = 320 * 2**20
SLOT = tl.constexpr(64)  # columns per partial row sum; producers' BN must be a multiple of it
_SLOT = 64
_NOISE_TILE = (16, 256)  # (rows, cols) of `_interpolate_kernel`'s programs

_EPI_RMS, _EPI_SILU, _EPI_RESID = 0, 1, 2
_LAYER_SHARED, _LAYER_INDEXED, _LAYER_PER_ROW = 0, 1, 2  # how `_cond_kernel` finds a row's layer embedding


def _gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Plain GEMMs [M, W] x [W, W]^T; BN a multiple of SLOT. First entry: the tile DESIGN §4 measured near
# cuBLAS on an H200, and the interpreter's only config (large blocks keep its program count low). The
# 128x128 entry with 8 warps holds half the accumulator per thread: the only one of the three that
# `benchmarks/kernel_report.py` shows free of register spills with every epilogue (the cond GEMM's
# timestep loop and the residual epilogue spill 100-400 B per thread at 128x256 on sm_90), so autotuning
# can trade tile size against spills. Few configs on purpose: each is compiled per epilogue variant on
# first use (~1 s each for bf16 on sm_90). The last entry of each list is the one an fp32 field gets
# (`_prune`): its operands take twice the shared memory, and each fp32 variant takes ~20 s to compile.
_GEMM_CONFIGS = [
    _gemm_config(128, 256, 64, 8, 3),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(128, 256, 32, 8, 4),
]
# adaLN GEMMs carry 2 or 3 accumulators of [BM, BN] each (shift, scale[, gate]): narrower tiles.
_MODULATE_CONFIGS = [
    _gemm_config(128, 64, 64, 8, 3),
    _gemm_config(64, 128, 64, 4, 3),
    _gemm_config(128, 64, 32, 4, 4),
]
# The output GEMM's epilogue runs Philox on its tile: per thread on sm_90 (triton 3.8) it spills ~1.7 KB
# at 128x256, ~90 B at 128x128 and nothing beyond Philox's 32 B frame at 128x64, all with 8 warps.
_SCORE_CONFIGS = [
    _gemm_config(128, 128, 64, 8, 3),
    _gemm_config(128, 64, 64, 8, 3),
]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """The configs autotuning may time: only the last for an fp32 field (see above); for 16-bit fields all of
    them, or only the first when configs are pinned (`_triton.pinned_configs`). A single config is used
    without timing, so every process and rank runs the same tiles, hence the same summation order."""
    if named_args["w_ptr"].dtype == torch.float32:
        return configs[-1:]
    return configs[:1] if _triton.pinned_configs() else configs


def _autotune(configs: list, key: list, **kwargs):
    return triton.autotune(configs=prune_configs(configs), key=key,
                           prune_configs_by={"early_config_prune": _prune}, **kwargs)


# --------------------------------------------------------------------------- shared device helpers

@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped along M so that consecutive programs share W tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mainloop(a_ptr, stride_am, w_ptr, rm, rn, M, N, K, N_ACC: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``A[rm, :] @ W[i·N + rn, :]^T`` for i < N_ACC (nn.Linear weights, rows of K contiguous), fp32 accumulators.

    The A tile is cast to the weight dtype on load (the reference's ``.to(dtype)``); all loads are masked.
    """
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # [BK, BN] view of W^T
    row_ok = rm[:, None] < M
    col_ok = rn[None, :] < N
    acc0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        w0 = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok, other=0.0)
        a = tl.load(a_ptrs, mask=row_ok & k_ok[None, :], other=0.0).to(w0.dtype)
        if UPCAST:
            a = a.to(tl.float32)
        acc0 = _dot(a, w0, acc0, PREC, UPCAST)
        if N_ACC >= 2:
            w1 = tl.load(w_ptrs + N * K, mask=k_ok[:, None] & col_ok, other=0.0)
            acc1 = _dot(a, w1, acc1, PREC, UPCAST)
        if N_ACC >= 3:
            w2 = tl.load(w_ptrs + 2 * N * K, mask=k_ok[:, None] & col_ok, other=0.0)
            acc2 = _dot(a, w2, acc2, PREC, UPCAST)
        a_ptrs += BK
        w_ptrs += BK
    return acc0, acc1, acc2


@triton.jit
def _gemm_tile(a_ptr, stride_am, w_ptr, M, N, K, N_ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: (pid_n, rows rm, columns rn, their masks, the N_ACC accumulators)."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc0, acc1, acc2 = _mainloop(a_ptr, stride_am, w_ptr, rm, rn, M, N, K, N_ACC, PREC, UPCAST, BM, BN, BK)
    return pid_n, rm, rn, rm < M, rn < N, acc0, acc1, acc2


@triton.jit
def _plus_bias(acc, b_ptr, rn, col_ok):
    return acc + tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _dot(a, w, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter's low-precision dot is wrong: do it in fp32
        return tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc, input_precision=PREC)


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round fp32 `x` to the field dtype and back, as the reference's dtype ops do."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _normal_tile(seed, rows, col0, QD, BM: tl.constexpr, BN: tl.constexpr):
    """Standard normals [BM, BN] of global token rows `rows` (int64) and columns col0 .. col0+BN-1.

    Element (r, c) is output ``c % 4`` of Philox counter ``r · QD + c // 4`` (QD = ⌈D/4⌉), so every
    kernel gets the same ε whatever its tile shape (col0 and BN multiples of 4), and one Philox call
    serves four columns.
    """
    q = col0 // 4 + tl.arange(0, BN // 4)
    counter = rows[:, None] * QD + q[None, :]
    n0, n1, n2, n3 = tl.randn4x(seed, counter)
    # join(join(n0, n2), join(n1, n3))[r, i, a, b] = n_{2a+b}; row-major reshape puts it at column 4i + 2a + b
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BM, BN))


@triton.jit
def _store_slot_sums(part_ptr, x, rm, pid_n, M, n_slots, BM: tl.constexpr, BN: tl.constexpr):
    """Store per-row sums of `x` [BM, BN] over each 64-column slot into part[rm, pid_n·BN/64 + s]."""
    sums = tl.sum(tl.reshape(x, (BM, BN // SLOT, SLOT)), axis=2)
    slot = pid_n * (BN // SLOT) + tl.arange(0, BN // SLOT)
    ptrs = part_ptr + rm[:, None].to(tl.int64) * n_slots + slot[None, :]
    tl.store(ptrs, sums, mask=(rm[:, None] < M) & (slot[None, :] < n_slots))


# --------------------------------------------------------------------------- kernels

# Elementwise. Per token row: reads x1 (D·e_in) [+ ε, D·e_noise, when supplied], writes J·D·e bytes of
# x_t; ALU ≈ 40 ops per element for Philox-4x32-10 + Box–Muller (one call per four columns).
# 1.5B shape (N = 196,608, D = 1536, J = 1, bf16): 1.2 GB -> floor 0.29 ms at 4.2 TB/s; ALU ~0.4 ms on
# the CUDA cores; the two overlap.
# Largest offset: j·stride_nj + r·stride_nr + c into a supplied [J, N, D] noise (≥ 2**31 once J·N·D does), so
# j, r and the products are int64; out's (j·n_tok + r)·D likewise.
@triton.jit(do_not_specialize=["row0"])
def _interpolate_kernel(x1_ptr, stride_x1, noise_ptr, stride_nj, stride_nr, out_ptr, tau_ptr, omt_ptr,
                        n_tok, D, J, row0, seed_ptr, QD,
                        HAS_NOISE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """out[j·n_tok + r] = τ_j · x1[r] + (1 - τ_j) · ε_j[r], in the field dtype (x1, noise: this chunk's rows)."""
    DT: tl.constexpr = out_ptr.dtype.element_ty
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (r[:, None] < n_tok) & (c[None, :] < D)
    r64 = r.to(tl.int64)
    x1 = tl.load(x1_ptr + r64[:, None] * stride_x1 + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.zeros((BM, BD), dtype=tl.float32)  # loaded per timestep below
    else:
        eps = _normal_tile(tl.load(seed_ptr), row0 + r64, tl.program_id(1) * BD, QD, BM, BD)
    for j in range(J):
        j64 = tl.full((), j, tl.int64)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + j64 * stride_nj + r64[:, None] * stride_nr + c[None, :],
                          mask=mask, other=0.0).to(tl.float32)
        tau = tl.load(tau_ptr + j)
        omt = tl.load(omt_ptr + j)
        x_t = tau * x1 + omt * eps
        tl.store(out_ptr + (j64 * n_tok + r64)[:, None] * D + c[None, :], x_t.to(DT), mask=mask)


# GEMM [n, W] x [W, W]^T once per token (not per timestep): 2·n·W² FLOPs; bytes ≈ n·W·e_c (cond) + W²·e
# + J·n·W·e (SiLU(y) for every timestep) + n·W·e per extra gather of the layer embedding (L2-resident).
# 1.5B shape: 0.93 TFLOP -> 1.19 ms at 781 TFLOP/s vs 1.2 GB -> 0.29 ms: compute-bound, floor 1.19 ms.
# Largest offset: (j·n_tok + r)·N into s (J·n·W, int64); rows of c and lemb are int64 too.
@_autotune(_GEMM_CONFIGS, key=["N", "K"])
@triton.jit
def _cond_kernel(c_ptr, stride_c, w_ptr, b_ptr, lemb_ptr, idx_ptr, temb_ptr, s_ptr, n_tok, N, K, J,
                 LAYER: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """s[j·n_tok + r] = SiLU((lemb[row r's entry] + cond_embed(c[r])) + temb[j]) for every timestep j.

    LAYER: 0 one shared lemb row, 1 row ``idx[r]`` of a table, 2 row r (one embedding per row).
    """
    DT: tl.constexpr = s_ptr.dtype.element_ty
    _, rm, rn, row_ok, col_ok, acc, _, _ = _gemm_tile(c_ptr, stride_c, w_ptr, n_tok, N, K, 1, PREC, UPCAST,
                                                      BM, BN, BK, GROUP_M)
    mask = row_ok[:, None] & col_ok[None, :]
    # lemb + cond_embed(c) is summed once, in the reference's (and the released module's) order, and kept in the
    # field dtype across the timestep loop (it is rounded to it anyway): half the registers
    ce = _plus_bias(acc, b_ptr, rn, col_ok).to(DT)
    if LAYER == 1:
        li = tl.load(idx_ptr + rm, mask=row_ok, other=0).to(tl.int64)
    elif LAYER == 2:
        li = rm.to(tl.int64)
    else:
        li = tl.zeros((BM,), dtype=tl.int64)
    le = tl.load(lemb_ptr + li[:, None] * N + rn[None, :], mask=mask, other=0.0)
    lc = (le.to(tl.float32) + ce.to(tl.float32)).to(DT)
    for j in range(J):
        te = tl.load(temb_ptr + j * N + rn, mask=col_ok, other=0.0).to(tl.float32)
        y = _rnd(lc.to(tl.float32) + te[None, :], DT)
        out = s_ptr + (tl.full((), j, tl.int64) * n_tok + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(out, _silu(y).to(DT), mask=mask)


# GEMM [M, W] x [W, W]^T, M = J·n: 2·M·W² FLOPs; bytes ≈ 2·M·W·e (A, out) + W²·e, plus 2·M·W·e for
# RESID (a and gate) and M·W/16 for the RMS partials. 1.5B shape: 0.93 TFLOP -> 1.19 ms at 781 TFLOP/s
# vs ≤ 2.4 GB -> 0.58 ms: compute-bound, floor 1.19 ms per call (K=4: 9 calls).
# Largest offset: M·N into a, out, res, gate (J·n·W); row offsets are int64 (`_mainloop`, `offs`).
@_autotune(_GEMM_CONFIGS, key=["N", "K", "EPI"], restore_value=["res_ptr"])
@triton.jit
def _linear_kernel(a_ptr, w_ptr, b_ptr, out_ptr, res_ptr, gate_ptr, part_ptr, M, N, K, n_slots,
                   EPI: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out = epilogue(a @ w^T + b), all [M, N] contiguous.

    EPI 0 (RMS): out = o, RMS partials of o. EPI 1 (SILU): out = SiLU(o).
    EPI 2 (RESID): out = res + gate·o in place (out is res), RMS partials of it.
    """
    DT: tl.constexpr = out_ptr.dtype.element_ty
    pid_n, rm, rn, row_ok, col_ok, acc, _, _ = _gemm_tile(a_ptr, K, w_ptr, M, N, K, 1, PREC, UPCAST,
                                                          BM, BN, BK, GROUP_M)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    o = _rnd(_plus_bias(acc, b_ptr, rn, col_ok), DT)
    if EPI == 1:
        o = _rnd(_silu(o), DT)
    if EPI == 2:
        res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = _rnd(res + _rnd(gate * o, DT), DT)
    tl.store(out_ptr + offs, o.to(DT), mask=mask)
    if EPI != 1:
        _store_slot_sums(part_ptr, tl.where(mask, o * o, 0.0), rm, pid_n, M, n_slots, BM, BN)


# adaLN GEMM [M, W] x [W, N_ACC·W]^T: 2·N_ACC·M·W² FLOPs; bytes ≈ M·W·e (SiLU(y)) + M·W·e (a) + M·W·e (h)
# [+ M·W·e gate] + N_ACC·W²·e. 1.5B shape, block (N_ACC 3): 2.78 TFLOP -> 3.56 ms vs 2.4 GB -> 0.58 ms;
# final (N_ACC 2): 1.86 TFLOP -> 2.38 ms. Compute-bound; shift/scale never reach memory.
# Largest offset: M·N into s, a, h, gate (int64 rows); 3·N·K into w (the adaLN weight, < 2**31 for W < 26,000).
@_autotune(_MODULATE_CONFIGS, key=["N", "K", "N_ACC"])
@triton.jit
def _modulate_kernel(s_ptr, w_ptr, b_ptr, a_ptr, lnw_ptr, part_ptr, h_ptr, gate_ptr, M, N, K, n_slots, eps,
                     N_ACC: tl.constexpr, SLOTS_P2: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """(shift, scale[, gate]) = s @ w^T + b; h = RMSNorm(a)·(1 + scale) + shift; gate stored when N_ACC == 3.

    RMSNorm's row statistics come from the 64-column partials `part` [M, n_slots] of the producer of `a`.
    """
    DT: tl.constexpr = h_ptr.dtype.element_ty
    _, rm, rn, row_ok, col_ok, acc_shift, acc_scale, acc_gate = _gemm_tile(s_ptr, K, w_ptr, M, N, K, N_ACC, PREC,
                                                                           UPCAST, BM, BN, BK, GROUP_M)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    slot = tl.arange(0, SLOTS_P2)
    sums = tl.load(part_ptr + rm[:, None].to(tl.int64) * n_slots + slot[None, :],
                   mask=row_ok[:, None] & (slot[None, :] < n_slots), other=0.0)
    rstd = tl.rsqrt(tl.sum(sums, axis=1) / N + eps)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lnw = tl.load(lnw_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
    shift = _rnd(_plus_bias(acc_shift, b_ptr, rn, col_ok), DT)
    scale = _rnd(_plus_bias(acc_scale, b_ptr + N, rn, col_ok), DT)
    normed = _rnd(lnw[None, :] * _rnd(a * rstd[:, None], DT), DT)
    h = _rnd(normed * _rnd(1.0 + scale, DT), DT) + shift
    tl.store(h_ptr + offs, h.to(DT), mask=mask)
    if N_ACC == 3:
        gate = _plus_bias(acc_gate, b_ptr + 2 * N, rn, col_ok)
        tl.store(gate_ptr + offs, gate.to(DT), mask=mask)


# Output GEMM [M, W] x [D, W]^T with the loss epilogue: 2·M·W·D FLOPs; bytes ≈ M·W·e (h) + n·D·e_in (x1,
# shared by the J timestep rows, L2-resident) [+ ε when supplied] + M·D/16 (partials); ALU ≈ 40 ops per
# element to regenerate ε. 1.5B shape: 0.93 TFLOP -> 1.19 ms vs 1.2 GB -> 0.29 ms: compute-bound.
# Largest offset: j·stride_nj + tok·stride_nr + c into a supplied [J, N, D] noise: int64, like every row offset.
@_autotune(_SCORE_CONFIGS, key=["N", "K"])
@triton.jit(do_not_specialize=["row0"])
def _score_kernel(h_ptr, w_ptr, b_ptr, x1_ptr, stride_x1, noise_ptr, stride_nj, stride_nr, weight_ptr, part_ptr,
                  M, n_tok, N, K, n_slots, row0, seed_ptr, QD,
                  HAS_NOISE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """part[j·n_tok + r, s] = weight_j · Σ_{c in slot s} (v - (x1 - ε))², v = h @ w^T + b in the field dtype."""
    DT: tl.constexpr = w_ptr.dtype.element_ty
    pid_n, rm, rn, row_ok, col_ok, acc, _, _ = _gemm_tile(h_ptr, K, w_ptr, M, N, K, 1, PREC, UPCAST,
                                                          BM, BN, BK, GROUP_M)
    mask = row_ok[:, None] & col_ok[None, :]
    v = _plus_bias(acc, b_ptr, rn, col_ok).to(DT)  # held in the field dtype: frees acc's registers
    j = rm // n_tok
    tok = (rm % n_tok).to(tl.int64)
    x1 = tl.load(x1_ptr + tok[:, None] * stride_x1 + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + j[:, None].to(tl.int64) * stride_nj + tok[:, None] * stride_nr + rn[None, :],
                      mask=mask, other=0.0).to(tl.float32)
    else:
        eps = _normal_tile(tl.load(seed_ptr), row0 + tok, pid_n * BN, QD, BM, BN)
    diff = v.to(tl.float32) - (x1 - eps)
    weight = tl.load(weight_ptr + j, mask=row_ok, other=0.0)
    _store_slot_sums(part_ptr, tl.where(mask, diff * diff, 0.0) * weight[:, None], rm, pid_n, M, n_slots, BM, BN)


# --------------------------------------------------------------------------- launcher

def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 for fp32 fields (as cuBLAS without TF32), the default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_bounds(n_tok: int, n_timesteps: int, width: int, itemsize: int) -> list[int]:
    """Token offsets 0 = b_0 < b_1 < ... < b_c = n_tok of the fewest chunks whose intermediates fit in
    `MAX_CHUNK_BYTES`, their sizes differing by at most one token.

    Equal sizes, because every chunk runs each GEMM as its own launch: a small ragged last chunk would be a
    mostly idle wave of tiles per GEMM (at the 1.5B shape, 9 full chunks and one of 9 %).
    """
    per_token = n_timesteps * (_N_BUFFERS * width * itemsize + 4 * triton.cdiv(width, _SLOT))
    count = triton.cdiv(n_tok, max(1, MAX_CHUNK_BYTES // per_token))
    return [i * n_tok // count for i in range(count + 1)]


def _noise_args(noise: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer, timestep stride, row stride) of a [n, D] or [J, n, D] noise; a never-read placeholder when None."""
    if noise is None:
        return placeholder, 0, 0
    return noise, (noise.stride(0) if noise.dim() == 3 else 0), noise.stride(-2)


def _interpolate(out: torch.Tensor, x1: torch.Tensor, noise: Optional[torch.Tensor], taus: torch.Tensor,
                 omts: torch.Tensor, row0: int, seed: torch.Tensor) -> None:
    """Launch `_interpolate_kernel` over the [n, D] rows `x1` (noise: [n, D] or [J, n, D] or None)."""
    n, d = x1.shape[0], out.shape[-1]
    noise_arg, stride_nj, stride_nr = _noise_args(noise, x1)
    bm, bd = _NOISE_TILE
    grid = (triton.cdiv(n, bm), triton.cdiv(d, bd))
    _interpolate_kernel[grid](x1, x1.stride(0), noise_arg, stride_nj, stride_nr, out, taus, omts,
                              n, d, taus.numel(), row0, seed, triton.cdiv(d, 4),
                              HAS_NOISE=noise is not None, BM=bm, BD=bd, num_warps=4)


def seeded_noise(seed: Union[int, torch.Tensor], n: int, dim: int, device: Union[str, torch.device] = "cpu"
                 ) -> torch.Tensor:
    """The ε [n, dim] fp32 that the seeded Triton scoring pass draws for token rows 0..n-1 with `seed`.

    With ``noise=None`` the kernels use exactly this ε (row r of the call's stacked rows), so
    ``flow_scores(..., noise=seeded_noise(seed, n, D))`` on any backend reproduces the seeded scores.
    `seed` is a Philox key in [0, 2**62): an int, or the 1-element int64 tensor a call draws (`draw_seed`).
    """
    device = torch.device(device)
    reason = why_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"seeded_noise: {reason}")
    out = torch.empty(n, dim, dtype=torch.float32, device=device)
    if n:
        if isinstance(seed, torch.Tensor):
            key = seed.reshape(1).to(device=device, dtype=torch.int64)
        else:
            key = torch.full((1,), int(seed), dtype=torch.int64, device=device)
        zeros = torch.zeros(dim, dtype=torch.float32, device=device)
        x1 = zeros.expand(n, dim)  # row stride 0: reads stay inside `zeros`
        taus = torch.zeros(1, dtype=torch.float32, device=device)
        with _triton.device_guard(device):
            _interpolate(out, x1, None, taus, torch.ones_like(taus), 0, key)
    return out


def _layer_table(field: VelocityField, layer: Union[float, torch.Tensor, LayerRows], device: torch.device
                 ) -> tuple[int, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(`_cond_kernel`'s LAYER mode, the embedding table [U, W] or None, the per-row index [N] int32 or None).

    A float is embedded once; a `LayerRows` table once per distinct value; an [N] tensor gets one embedding
    per row, per chunk (finding its distinct values would need ``torch.unique``, a host sync).
    """
    if isinstance(layer, LayerRows):
        return _LAYER_INDEXED, field.layer_embed.embed_values(layer.values).contiguous(), layer.index.to(torch.int32)
    if isinstance(layer, torch.Tensor):
        return _LAYER_PER_ROW, None, None
    value = torch.full((1,), float(layer), dtype=torch.float32, device=device)  # a fill: no host-to-device copy
    return _LAYER_SHARED, field.layer_embed.embed_values(value).contiguous(), None


def _flow_scores_triton(field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
                        layer: Union[float, torch.Tensor, LayerRows], timesteps: tuple[float, ...],
                        noise: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
    """The `flow_scores` backend: fused Triton scoring of [N, D] rows (see the module docstring)."""
    with _triton.device_guard(target.device):
        return _score_launches(field, target, cond, layer, timesteps, noise, generator)


def _score_launches(field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
                    layer: Union[float, torch.Tensor, LayerRows], timesteps: tuple[float, ...],
                    noise: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
    """Every launch of one scoring call (run inside `_triton.device_guard`). No host sync: the Philox key is
    drawn on the device and the per-timestep constants reach it through pinned memory."""
    device = target.device
    n_tok, width = target.shape
    n_t = len(timesteps)
    dtype = field.input_proj.weight.dtype
    scores = torch.zeros(n_tok, dtype=torch.float32, device=device)
    if n_tok == 0:
        return scores
    target, cond = _unit_stride(target), _unit_stride(cond)
    noise = None if noise is None else _unit_stride(noise)
    seed = _triton.draw_seed(generator, device) if noise is None else scores  # scores: a never-read placeholder

    consts = small_tensor([*timesteps, *(1.0 - t for t in timesteps),
                           *(t / (1.0 - t) / (n_t * width) for t in timesteps)], device)
    taus, omts, weights = consts.view(3, n_t)
    temb = field.time_embed.embed_values(taus).contiguous()
    layer_mode, lemb, layer_idx = _layer_table(field, layer, device)

    n_slots = triton.cdiv(width, _SLOT)
    flags = dict(PREC=_precision(dtype), UPCAST=interpreting())
    bounds = _chunk_bounds(n_tok, n_t, width, torch.finfo(dtype).bits // 8)
    chunk = max(end - start for start, end in zip(bounds, bounds[1:]))
    silu_y, resid, gate, hid, mlp = torch.empty((_N_BUFFERS, n_t * chunk, width), dtype=dtype, device=device)
    part = torch.empty((n_t * chunk, n_slots), dtype=torch.float32, device=device)
    final = field.final_layer

    def linear(a: torch.Tensor, lin: torch.nn.Linear, out: torch.Tensor, epi: int, rows: int) -> None:
        _linear_kernel[_grid(rows, width)](a, lin.weight.contiguous(), lin.bias, out, resid, gate, part,
                                           rows, width, width, n_slots, EPI=epi, **flags)

    def modulate(ada: torch.nn.Linear, norm: torch.nn.Module, n_acc: int, rows: int) -> None:
        _modulate_kernel[_grid(rows, width)](silu_y, ada.weight.contiguous(), ada.bias, resid, norm.weight, part,
                                             hid, gate, rows, width, width, n_slots, float(norm.eps),
                                             N_ACC=n_acc, SLOTS_P2=triton.next_power_of_2(n_slots), **flags)

    for row0, end in zip(bounds, bounds[1:]):
        n = end - row0
        rows = n_t * n
        x1 = target[row0:row0 + n]
        eps = None if noise is None else noise[..., row0:row0 + n, :]
        idx = None if layer_idx is None else layer_idx[row0:row0 + n]
        table = field.layer_embed.embed_values(layer[row0:row0 + n]) if layer_mode == _LAYER_PER_ROW else lemb
        _interpolate(hid, x1, eps, taus, omts, row0, seed)
        _cond_kernel[_grid(n, width)](cond[row0:row0 + n], cond.stride(0), field.cond_embed.weight.contiguous(),
                                      field.cond_embed.bias, table, idx if idx is not None else table, temb, silu_y,
                                      n, width, width, n_t, LAYER=layer_mode, **flags)
        linear(hid, field.input_proj, resid, _EPI_RMS, rows)
        for block in field.res_blocks:
            modulate(block.adaLN_modulation[1], block.in_ln, 3, rows)
            linear(hid, block.mlp[0], mlp, _EPI_SILU, rows)
            linear(mlp, block.mlp[2], resid, _EPI_RESID, rows)
        modulate(final.adaLN_modulation[1], final.norm_final, 2, rows)
        noise_arg, stride_nj, stride_nr = _noise_args(eps, x1)
        _score_kernel[_grid(rows, width)](hid, final.linear.weight.contiguous(), final.linear.bias, x1, x1.stride(0),
                                          noise_arg, stride_nj, stride_nr, weights, part, rows, n, width, width,
                                          n_slots, row0, seed, triton.cdiv(width, 4), HAS_NOISE=eps is not None,
                                          **flags)
        scores[row0:row0 + n] = part[:rows].view(n_t, n, n_slots).sum(dim=(0, 2))
    return scores


backend.register("flow_scores", "triton", _flow_scores_triton, why_unavailable)
