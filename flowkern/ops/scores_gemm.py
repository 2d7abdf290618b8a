"""The GEMM route of `flow_scores`: library GEMMs joined by fused row kernels, in 16-bit or fp8.

The fused Triton route (`flowkern.ops.scores`) runs every GEMM of the velocity field as a Triton
kernel with its epilogue fused. This route instead runs each GEMM through the vendor library
(``torch.addmm`` -> cuBLAS(Lt) with the bias in its epilogue, or ``torch._scaled_mm`` for fp8) and
does everything between two GEMMs in one fused row pass, the design of the training forward
(`flowkern.ops.fm_loss`), reusing its row kernel `fm_loss_kernels.modulate_kernel` and device
helpers. Nothing is saved for a backward, and rows are streamed in equal chunks whose buffers stay
under `MAX_CHUNK_BYTES`, like the fused route. Per chunk of n tokens and J timesteps (M = J·n rows):

1. ``cond_embed(c)`` GEMM once per token; `_cond_rows_kernel` adds the timestep and layer embeddings
   and stores ``SiLU(y)`` for every timestep.
2. `_interp_rows_kernel`: x_t = τ·x1 + (1-τ)·ε, ε loaded or drawn from the same Philox stream as the
   fused route (`scores._normal_tile`), so one seed gives the same ε on both routes.
3. ``input_proj`` GEMM -> a. Per block: adaLN GEMMs (shift|scale into one buffer, gate into one of
   two alternating buffers, since the next block's residual still needs it), `modulate_kernel`
   (the previous block's ``a += gate·z2`` and this block's ``RMSNorm(a)(1+scale)+shift``), MLP GEMM,
   `_act_rows_kernel` (SiLU), MLP GEMM.
4. The final adaLN GEMM and `modulate_kernel`, the output GEMM -> v, and `_score_rows_kernel`:
   ``weight_j · Σ_D (v - (x1 - ε))²`` per row in fp32 (ε regenerated, never stored).

With fp8 (`flowkern.ops.scores_fp8`) every row kernel whose output feeds an fp8 GEMM stores it as
e4m3 plus one fp32 scale per row (`fm_loss_kernels._store_rows`). On CPU tensors without
``TRITON_INTERPRET=1`` the same pipeline runs with torch row ops (`_TorchRows`); that is how
``precision="fp8"`` scores on CPU.

Which of the two 16-bit routes the ``triton`` backend takes is `score_route`: the environment
variable ``FLOWKERN_SCORE_ROUTE`` (``fused`` or ``gemm``) when set, else the measured winner for
the GPU's architecture in `MEASURED_ROUTE`, else the fused route.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import backend
from .._device import small_tensor
from ..field import VelocityField
from ..flow import LayerRows
from . import fm_loss_kernels as kern
from . import scores, scores_fp8
from ._triton import device_guard, draw_seed, interpreting, why_unavailable
from .fm_loss import _launch

ROUTE_ENV = "FLOWKERN_SCORE_ROUTE"
ROUTES = ("fused", "gemm")
# The faster 16-bit route per GPU compute capability, from committed measurements of
# benchmarks/bench_scores.py (benchmarks/results/). Empty until a GPU run has measured both routes:
# the fused route stays the default.
MEASURED_ROUTE: dict[tuple[int, int], str] = {}
# Bound on one chunk's buffers (the route's whole extra memory, plus O(N) fp32 for the scores).
MAX_CHUNK_BYTES = scores.MAX_CHUNK_BYTES
# Buffers per row, in units of W elements of the activation dtype: SiLU(y), a, shift|scale (2), gate (2,
# alternating), h, MLP hidden, MLP output, x_t (or the cast context). With fp8, SiLU(y), h and x_t
# shrink to 1 byte per element and the SiLU'd MLP hidden gets its own 1-byte buffer: fewer bytes.
_UNITS = 10
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def score_route(device: torch.device) -> str:
    """The 16-bit scoring route of the ``triton`` backend on `device`: ``"fused"`` or ``"gemm"``."""
    forced = os.environ.get(ROUTE_ENV, "").strip().lower()
    if forced not in ("", "auto") + ROUTES:
        raise ValueError(f"{ROUTE_ENV} must be one of {('auto',) + ROUTES}, got {forced!r}")
    if forced in ROUTES:
        return forced
    if device.type == "cuda":
        return MEASURED_ROUTE.get(tuple(torch.cuda.get_device_capability(device)), "fused")
    return "fused"


# --------------------------------------------------------------------------- row kernels

@triton.jit
def _eps_rows(noise_ptr, stride_nj, stride_nr, seed_ptr, j, tok, row0, QD, mask,
              HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """ε [BLOCK_M, BLOCK_D] fp32 of timestep rows `j` and tokens `tok`: loaded ([n, D] or [J, n, D] strides, int64
    offsets j·stride_nj + tok·stride_nr) when HAS_NOISE, else Philox ε of global token row0 + tok (`scores._normal_tile`)."""
    if HAS_NOISE:
        cols = tl.arange(0, BLOCK_D)
        eps = tl.load(noise_ptr + j[:, None].to(tl.int64) * stride_nj + tok[:, None] * stride_nr + cols[None, :],
                      mask=mask, other=0.0).to(tl.float32)
    else:
        eps = scores._normal_tile(tl.load(seed_ptr), row0 + tok, 0, QD, BLOCK_M, BLOCK_D)
    return eps


@triton.jit(do_not_specialize=["row0"])
def _interp_rows_kernel(x1_ptr, x1_stride, noise_ptr, stride_nj, stride_nr, tau_ptr, omt_ptr, out_ptr, out_scale_ptr,
                        rows, n_tok, width, row0, seed_ptr, QD, rows_per_prog,
                        HAS_NOISE: tl.constexpr, QUANT: tl.constexpr, DT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j·n_tok + r] = τ_j·x1[r] + (1-τ_j)·ε_j[r] in dtype DT (or e4m3 of it, QUANT), for this chunk's rows.

    ε is loaded ([n, D] or [J, n, D] strides) or Philox ε of global token row0 + r (`scores._normal_tile`),
    keyed by the int64 at `seed_ptr`. Largest offsets: j·stride_nj + r·stride_nr and (j·n + r)·D, int64.
    Bytes per row: reads x1 (and ε when supplied), writes x_t: 2-3 units.
    """
    pid = tl.program_id(0)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = kern._tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        j = r // n_tok
        tok = (r % n_tok).to(tl.int64)
        x1 = kern._load(x1_ptr, tok, x1_stride, mask, BLOCK_D)
        eps = _eps_rows(noise_ptr, stride_nj, stride_nr, seed_ptr, j, tok, row0, QD, mask, HAS_NOISE, BLOCK_M, BLOCK_D)
        tau = tl.load(tau_ptr + j, mask=rmask, other=0.0)[:, None]
        omt = tl.load(omt_ptr + j, mask=rmask, other=0.0)[:, None]
        x_t = kern._rnd(tau * x1 + omt * eps, DT)
        kern._store_rows(out_ptr, out_scale_ptr, r64, rmask, width, tl.where(mask, x_t, 0.0), mask, QUANT, BLOCK_D)


@triton.jit
def _cond_rows_kernel(ce_ptr, temb_ptr, lemb_ptr, idx_ptr, out_ptr, out_scale_ptr, rows, n_tok, width, rows_per_prog,
                      LAYER: tl.constexpr, QUANT: tl.constexpr, DT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j·n_tok + r] = SiLU(y), y = (lemb[row r's entry] + cond_embed(c)[r]) + temb[j], rounded like the reference
    (`VelocityField.conditioning`'s order, the released module's).

    LAYER as `scores._cond_kernel`'s: 0 one shared lemb row, 1 row ``idx[r]`` of a table, 2 row r.

    Bytes per row: reads cond_embed(c) (once per token for J = 1; temb and lemb are a few cached rows),
    writes SiLU(y): 2 units.
    """
    pid = tl.program_id(0)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = kern._tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        j = (r // n_tok).to(tl.int64)
        tok = (r % n_tok).to(tl.int64)
        if LAYER == 1:
            li = tl.load(idx_ptr + tok, mask=rmask, other=0).to(tl.int64)
        elif LAYER == 2:
            li = tok
        else:
            li = tok * 0
        y = kern._rnd(kern._load(lemb_ptr, li, width, mask, BLOCK_D) + kern._load(ce_ptr, tok, width, mask, BLOCK_D), DT)
        y = kern._rnd(y + kern._load(temb_ptr, j, width, mask, BLOCK_D), DT)
        s = kern._rnd(kern._silu(y), DT)
        kern._store_rows(out_ptr, out_scale_ptr, r64, rmask, width, tl.where(mask, s, 0.0), mask, QUANT, BLOCK_D)


@triton.jit
def _act_rows_kernel(x_ptr, x_stride, out_ptr, out_scale_ptr, rows, width, rows_per_prog,
                     SILU: tl.constexpr, QUANT: tl.constexpr, DT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = [SiLU](x) rounded to DT, stored as out's dtype or quantised (QUANT). In place when out is x.

    Bytes per row: 2 units (16-bit), 1.5 (fp8 output).
    """
    pid = tl.program_id(0)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = kern._tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        x = kern._load(x_ptr, r64, x_stride, mask, BLOCK_D)
        if SILU:
            x = kern._silu(x)
        kern._store_rows(out_ptr, out_scale_ptr, r64, rmask, width, tl.where(mask, kern._rnd(x, DT), 0.0), mask,
                         QUANT, BLOCK_D)


@triton.jit(do_not_specialize=["row0"])
def _score_rows_kernel(v_ptr, x1_ptr, x1_stride, noise_ptr, stride_nj, stride_nr, weight_ptr, out_ptr,
                       rows, n_tok, width, row0, seed_ptr, QD, rows_per_prog,
                       HAS_NOISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[j·n_tok + r] = weight_j · Σ_D (v - (x1[r] - ε_j[r]))² in fp32.

    Bytes per row: reads v and x1 (and ε when supplied), writes 4 B: 2-3 units.
    """
    pid = tl.program_id(0)
    for i in range(0, rows_per_prog, BLOCK_M):
        r, r64, rmask, mask = kern._tile(pid * rows_per_prog + i, rows, width, BLOCK_M, BLOCK_D)
        j = r // n_tok
        tok = (r % n_tok).to(tl.int64)
        eps = _eps_rows(noise_ptr, stride_nj, stride_nr, seed_ptr, j, tok, row0, QD, mask, HAS_NOISE, BLOCK_M, BLOCK_D)
        diff = kern._load(v_ptr, r64, width, mask, BLOCK_D) - (kern._load(x1_ptr, tok, x1_stride, mask, BLOCK_D) - eps)
        diff = tl.where(mask, diff, 0.0)
        weight = tl.load(weight_ptr + j, mask=rmask, other=0.0)
        tl.store(out_ptr + r64, weight * tl.sum(diff * diff, axis=1), mask=rmask)


# --------------------------------------------------------------------------- activations and row ops

@dataclass
class Act:
    """A GEMM input: `x` [M, K] in 16 bits, or e4m3 with fp32 row scales `scale` [M, 1]."""

    x: torch.Tensor
    scale: Optional[torch.Tensor] = None

    def rows(self, m: int) -> "Act":
        return Act(self.x[:m], None if self.scale is None else self.scale[:m])


def _act_buffer(rows: int, width: int, quant: bool, dtype: torch.dtype, device: torch.device) -> Act:
    if not quant:
        return Act(torch.empty((rows, width), dtype=dtype, device=device))
    return Act(torch.empty((rows, width), dtype=scores_fp8.FP8_DTYPE, device=device),
               torch.empty((rows, 1), dtype=torch.float32, device=device))


def _eps_torch(noise: torch.Tensor, n_t: int) -> torch.Tensor:
    """ε as [J, n, D] fp32 from [n, D] or [J, n, D]."""
    return noise.float().expand(n_t, *noise.shape[-2:]) if noise.dim() == 2 else noise.float()


def _fill(out: Act, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Store `value` (rounded to `dtype` first) into `out`, quantising when `out` is fp8."""
    value = value.to(dtype)
    if out.scale is None:
        out.x.copy_(value)
    else:
        q, s = scores_fp8.quantize_rows(value)
        out.x.copy_(q)
        out.scale.copy_(s)


class _TorchRows:
    """The row ops as torch ops (CPU without the Triton interpreter); same arithmetic as the kernels."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def interp(self, out: Act, x1, noise, taus, omts, row0, seed) -> None:
        eps = _eps_torch(noise, taus.numel())
        _fill(out, (taus[:, None, None] * x1.float() + omts[:, None, None] * eps).flatten(0, 1), self.dtype)

    def cond(self, out: Act, ce, temb, lemb, idx, mode) -> None:
        le = {scores._LAYER_SHARED: lambda: lemb[0], scores._LAYER_INDEXED: lambda: lemb[idx.long()],
              scores._LAYER_PER_ROW: lambda: lemb}[mode]()
        y = ((le + ce).to(self.dtype)[None] + temb[:, None]).to(self.dtype)
        _fill(out, F.silu(y.flatten(0, 1).float()), self.dtype)

    def act(self, out: Act, x, silu: bool) -> None:
        _fill(out, F.silu(x.float()) if silu else x, self.dtype)

    def modulate(self, out: Act, a, gate, z2, shift, scale, weight, eps) -> None:
        if gate is not None:
            a.copy_(a + (gate.float() * z2.float()).to(self.dtype))
        af = a.float()
        normed = (af * torch.rsqrt(af.pow(2).mean(-1, keepdim=True) + eps)).to(self.dtype)
        h = (weight.to(self.dtype) * normed) * (1 + scale) + shift
        _fill(out, h, self.dtype)

    def score(self, out, v, x1, noise, weights, row0, seed) -> None:
        n_t = weights.numel()
        diff = v.float().view(n_t, *x1.shape) - (x1.float()[None] - _eps_torch(noise, n_t))
        out.copy_((weights[:, None] * diff.pow(2).sum(-1)).flatten())


class _TritonRows:
    """The row ops as the Triton row kernels above and `fm_loss_kernels.modulate_kernel`."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.tl_dtype = _TL_DTYPES[dtype]

    def _tiling(self, rows: int, width: int, device: torch.device) -> kern.RowTiling:
        return kern.row_tiling(rows, width, device)

    def interp(self, out: Act, x1, noise, taus, omts, row0, seed) -> None:
        rows, width = out.x.shape
        noise_arg, stride_nj, stride_nr = scores._noise_args(noise, x1)
        _launch(_interp_rows_kernel, self._tiling(rows, width, x1.device), x1, x1.stride(0), noise_arg, stride_nj,
                stride_nr, taus, omts, out.x, _scale_arg(out), rows, x1.shape[0], width, row0, seed,
                triton.cdiv(width, 4), HAS_NOISE=noise is not None, QUANT=out.scale is not None, DT=self.tl_dtype)

    def cond(self, out: Act, ce, temb, lemb, idx, mode) -> None:
        rows, width = out.x.shape
        _launch(_cond_rows_kernel, self._tiling(rows, width, ce.device), ce, temb, lemb,
                lemb if idx is None else idx, out.x, _scale_arg(out), rows, ce.shape[0], width,
                LAYER=mode, QUANT=out.scale is not None, DT=self.tl_dtype)

    def act(self, out: Act, x, silu: bool) -> None:
        rows, width = out.x.shape
        _launch(_act_rows_kernel, self._tiling(rows, width, x.device), x, x.stride(0), out.x, _scale_arg(out),
                rows, width, SILU=silu, QUANT=out.scale is not None, DT=self.tl_dtype)

    def modulate(self, out: Act, a, gate, z2, shift, scale, weight, eps) -> None:
        rows, width = a.shape
        rstd = torch.empty(rows, dtype=torch.float32, device=a.device)  # not needed for scoring
        residual = gate is not None
        _launch(kern.modulate_kernel, self._tiling(rows, width, a.device), a, gate if residual else a,
                gate.stride(0) if residual else 0, z2 if residual else a, shift, scale, shift.stride(0), weight,
                a, out.x, _scale_arg(out), rstd, rows, width, float(eps), RESIDUAL=residual,
                QUANT=out.scale is not None)

    def score(self, out, v, x1, noise, weights, row0, seed) -> None:
        rows, width = v.shape
        noise_arg, stride_nj, stride_nr = scores._noise_args(noise, x1)
        _launch(_score_rows_kernel, self._tiling(rows, width, v.device), v, x1, x1.stride(0), noise_arg, stride_nj,
                stride_nr, weights, out, rows, x1.shape[0], width, row0, seed, triton.cdiv(width, 4),
                HAS_NOISE=noise is not None)


def _scale_arg(out: Act) -> torch.Tensor:
    """The row-scale pointer of `out`; a never-read placeholder for 16-bit outputs."""
    return out.scale if out.scale is not None else out.x


# --------------------------------------------------------------------------- GEMMs

Gemm = Callable[[Act, torch.Tensor], torch.Tensor]


def _addmm(weight: torch.Tensor, bias: torch.Tensor) -> Gemm:
    """A 16-bit library GEMM ``out = x @ weight^T + bias`` (bias in the cuBLASLt epilogue)."""
    def run(x: Act, out: torch.Tensor) -> torch.Tensor:
        return torch.addmm(bias, x.x, weight.t(), out=out)
    return run


def _scaled(lin: scores_fp8.Fp8Linear) -> Gemm:
    def run(x: Act, out: torch.Tensor) -> torch.Tensor:
        return lin(x.x, x.scale, out=out)
    return run


@dataclass(frozen=True)
class _Plan:
    """Per GEMM of the field: the function, and whether its input is quantised (fp8)."""

    cond: Gemm
    input: Gemm
    blocks: tuple[tuple[Gemm, Gemm, Gemm, Gemm], ...]  # (shift|scale, gate, mlp.0, mlp.2)
    final_ada: Gemm
    final: Gemm
    quant_raw: bool  # cond_embed and input_proj read e4m3 inputs
    quant: bool  # the block and adaLN GEMMs read e4m3 inputs
    quant_final: bool  # the output GEMM reads e4m3 inputs
    smooth: bool  # fp8 with per-call per-channel smoothing of the raw-latent GEMMs (torch rows only)


def _plan_16bit(field: VelocityField) -> _Plan:
    def g(lin: torch.nn.Linear, start: int = 0, stop: Optional[int] = None) -> Gemm:
        return _addmm(lin.weight[start:stop], lin.bias[start:stop])

    w = field.dim
    blocks = tuple((g(b.adaLN_modulation[1], 0, 2 * w), g(b.adaLN_modulation[1], 2 * w), g(b.mlp[0]), g(b.mlp[2]))
                   for b in field.res_blocks)
    return _Plan(g(field.cond_embed), g(field.input_proj), blocks, g(field.final_layer.adaLN_modulation[1]),
                 g(field.final_layer.linear), quant_raw=False, quant=False, quant_final=False, smooth=False)


def _plan_fp8(field: VelocityField, raw: str, dtype: torch.dtype) -> _Plan:
    weights = scores_fp8.fp8_weights(field, dtype)
    w = field.dim
    blocks = tuple((_scaled(ada.rows(0, 2 * w)), _scaled(ada.rows(2 * w, 3 * w)), _scaled(m0), _scaled(m2))
                   for ada, m0, m2 in weights.blocks)
    raw16 = raw in ("bf16", "bf16-io")
    if raw16:
        cond, inp = _addmm(*weights.cond16), _addmm(*weights.input16)
    else:
        cond, inp = _scaled(weights.cond), _scaled(weights.input)
    final = _addmm(*weights.final16) if raw == "bf16-io" else _scaled(weights.final)
    return _Plan(cond, inp, blocks, _scaled(weights.final_ada), final,
                 quant_raw=not raw16, quant=True, quant_final=raw != "bf16-io", smooth=raw == "smooth")


def _smooth_gemm(lin: scores_fp8.Fp8Linear, x: torch.Tensor, out: torch.Tensor) -> None:
    """The smoothing variant of a raw-latent GEMM on 16-bit rows `x` (torch ops, per call)."""
    smooth_lin, s = scores_fp8.smoothed(lin, x)
    q, qs = scores_fp8.quantize_rows(x.float() / s)
    smooth_lin(q, qs, out=out)


# --------------------------------------------------------------------------- the route

def _chunk_bounds(n_tok: int, per_token: int) -> list[int]:
    """Token offsets of the fewest equal chunks (sizes within one token) of at most MAX_CHUNK_BYTES."""
    count = triton.cdiv(n_tok, max(1, MAX_CHUNK_BYTES // per_token))
    return [i * n_tok // count for i in range(count + 1)]


@torch.no_grad()
def gemm_route_scores(field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
                      layer: Union[float, torch.Tensor, LayerRows], timesteps: tuple[float, ...],
                      noise: Optional[torch.Tensor], generator: Optional[torch.Generator], *,
                      fp8: bool = False, raw: Optional[str] = None, act_dtype: torch.dtype = torch.bfloat16,
                      triton_rows: Optional[bool] = None) -> torch.Tensor:
    """Scores [N] fp32 of [N, D] rows through library GEMMs and fused row passes (see the module docstring).

    Args:
        field: the velocity field; 16-bit routes compute in its dtype (an fp32 field gives an fp32 GEMM
            route), fp8 in `act_dtype` between fp8 GEMMs whatever the field's dtype.
        fp8: run the GEMMs in fp8 (`flowkern.ops.scores_fp8`).
        raw: with fp8, which GEMMs stay 16-bit (`scores_fp8.RAW_GEMM_MODES`); default `scores_fp8.RAW_GEMMS`.
        act_dtype: with fp8, the dtype of GEMM outputs and of the residual stream: bf16 (the only
            row-wise-scaled output of sm_89); tests on CPU use fp32 or fp16, which the interpreter
            rounds correctly.
        triton_rows: run the row passes as Triton kernels (True) or torch ops (False); default: Triton on
            CUDA and under ``TRITON_INTERPRET=1``. With torch ops and ``noise=None``, ε is drawn like the
            torch reference's; with Triton, from the fused route's Philox stream.
        Other arguments as the `flow_scores` backends receive them (validated, normalised).
    """
    device = target.device
    use_triton = (interpreting() or device.type == "cuda") if triton_rows is None else triton_rows
    with device_guard(device):
        return _route(field, target, cond, layer, timesteps, noise, generator, fp8, raw, act_dtype, use_triton)


def _route(field, target, cond, layer, timesteps, noise, generator, fp8, raw, act_dtype, use_triton) -> torch.Tensor:
    device = target.device
    n_tok, width = target.shape
    n_t = len(timesteps)
    scores_out = torch.zeros(n_tok, dtype=torch.float32, device=device)
    if n_tok == 0:
        return scores_out
    if fp8:
        raw = scores_fp8.RAW_GEMMS if raw is None else raw
        if raw not in scores_fp8.RAW_GEMM_MODES:
            raise ValueError(f"raw must be one of {scores_fp8.RAW_GEMM_MODES}, got {raw!r}")
        if raw == "smooth" and use_triton:
            raise ValueError("raw='smooth' (a measurement variant, smoothed per call with torch ops) runs with "
                             "torch row ops only (triton_rows=False)")
        scores_fp8.check_fp8_device(device, width)
        dtype = act_dtype
        plan = _plan_fp8(field, raw, dtype)
    else:
        dtype = field.input_proj.weight.dtype
        plan = _plan_16bit(field)
    rows_ops = (_TritonRows if use_triton else _TorchRows)(dtype)
    target, cond = scores._unit_stride(target), scores._unit_stride(cond)
    if noise is not None:
        noise = scores._unit_stride(noise)
    elif not use_triton:  # the torch reference's draw
        noise = torch.randn((n_tok, width), generator=generator, device=device, dtype=torch.float32)
    seed = draw_seed(generator, device) if noise is None else scores_out  # scores_out: a never-read placeholder

    consts = small_tensor([*timesteps, *(1.0 - t for t in timesteps),
                           *(t / (1.0 - t) / (n_t * width) for t in timesteps)], device)
    taus, omts, weights = consts.view(3, n_t)
    temb = field.time_embed.embed_values(taus).to(dtype).contiguous()
    layer_mode, lemb, layer_idx = scores._layer_table(field, layer, device)

    itemsize = torch.finfo(dtype).bits // 8
    bounds = _chunk_bounds(n_tok, n_t * (_UNITS * width * itemsize + 20))
    chunk = max(end - start for start, end in zip(bounds, bounds[1:]))
    m_max = n_t * chunk

    def buf(cols: int = width) -> torch.Tensor:
        return torch.empty((m_max, cols), dtype=dtype, device=device)

    a, ss, z, z2 = buf(), buf(2 * width), buf(), buf()
    gates = (buf(), buf())
    sy = _act_buffer(m_max, width, plan.quant, dtype, device)
    h = _act_buffer(m_max, width, plan.quant, dtype, device)
    hid = _act_buffer(m_max, width, True, dtype, device) if plan.quant else Act(z)
    raw_in = _act_buffer(m_max, width, plan.quant_raw and not plan.smooth, dtype, device)
    per_row_scores = torch.empty(m_max, dtype=torch.float32, device=device)
    final = field.final_layer

    for row0, end in zip(bounds, bounds[1:]):
        n = end - row0
        m = n_t * n
        x1, c = target[row0:end], cond[row0:end]
        eps = None if noise is None else noise[..., row0:end, :]
        idx = None if layer_idx is None else layer_idx[row0:end]
        table = field.layer_embed.embed_values(layer[row0:end]) if layer_mode == scores._LAYER_PER_ROW else lemb
        # conditioning: cond_embed(c) once per token, then SiLU(y) per timestep
        c_in = raw_in.rows(n)
        if c_in.scale is None and c.dtype == dtype:
            c_in = Act(c)
        else:
            rows_ops.act(c_in, c, silu=False)
        ce = z[:n]
        if plan.smooth:
            _smooth_gemm(scores_fp8.fp8_weights(field, dtype).cond, c_in.x, ce)
        else:
            plan.cond(c_in, ce)
        rows_ops.cond(sy.rows(m), ce, temb, table.to(dtype).contiguous(), idx, layer_mode)
        # input projection of x_t
        x_t = raw_in.rows(m)
        rows_ops.interp(x_t, x1, eps, taus, omts, row0, seed)
        if plan.smooth:
            _smooth_gemm(scores_fp8.fp8_weights(field, dtype).input, x_t.x, a[:m])
        else:
            plan.input(x_t, a[:m])
        gate, mlp_out = None, None
        for k, block in enumerate(field.res_blocks):
            g_ss, g_gate, g_mlp0, g_mlp2 = plan.blocks[k]
            g_ss(sy.rows(m), ss[:m])
            next_gate = gates[k % 2][:m]
            g_gate(sy.rows(m), next_gate)
            rows_ops.modulate(h.rows(m), a[:m], gate, mlp_out, ss[:m, :width], ss[:m, width:], block.in_ln.weight,
                              block.in_ln.eps)
            g_mlp0(h.rows(m), z[:m])
            rows_ops.act(hid.rows(m), z[:m], silu=True)
            g_mlp2(hid.rows(m), z2[:m])
            gate, mlp_out = next_gate, z2[:m]
        plan.final_ada(sy.rows(m), ss[:m])
        # a 16-bit output GEMM reads its input from the MLP-output buffer, which this pass consumes row by row
        h_final = h.rows(m) if plan.quant_final == plan.quant else Act(z2[:m])
        rows_ops.modulate(h_final, a[:m], gate, mlp_out, ss[:m, :width], ss[:m, width:], final.norm_final.weight,
                          final.norm_final.eps)
        plan.final(h_final, z[:m])
        rows_ops.score(per_row_scores[:m], z[:m], x1, eps, weights, row0, seed)
        scores_out[row0:end] = per_row_scores[:m].view(n_t, n).sum(0)
    return scores_out


def fp8_scores(field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
               layer: Union[float, torch.Tensor, LayerRows], timesteps: tuple[float, ...],
               noise: Optional[torch.Tensor], generator: Optional[torch.Generator], *,
               triton_rows: bool) -> torch.Tensor:
    """``precision="fp8"`` scoring (`flowkern.ops.scores_fp8`) with the `flow_scores` backend signature: the
    GEMM route with fp8 GEMMs, row passes as Triton kernels (``triton`` backend) or torch ops (``torch``)."""
    return gemm_route_scores(field, target, cond, layer, timesteps, noise, generator, fp8=True,
                             triton_rows=triton_rows)


def _flow_scores_triton_routed(field: VelocityField, target: torch.Tensor, cond: torch.Tensor,
                               layer: Union[float, torch.Tensor], timesteps: tuple[float, ...],
                               noise: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> torch.Tensor:
    """The ``triton`` backend of `flow_scores` in 16 bits: the route `score_route` picks for the device."""
    if score_route(target.device) == "gemm":
        return gemm_route_scores(field, target, cond, layer, timesteps, noise, generator)
    return scores._flow_scores_triton(field, target, cond, layer, timesteps, noise, generator)


backend.register("flow_scores", "triton", _flow_scores_triton_routed, why_unavailable)
