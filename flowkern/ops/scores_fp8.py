"""FP8 scoring: e4m3 weights and activations, row-wise scales, fp32 accumulation.

`flow_scores(..., precision="fp8")` runs the GEMM route of `flowkern.ops.scores_gemm` with every GEMM
of the velocity field (except the tiny time and layer embedders) as ``torch._scaled_mm``:

- **weights** are quantised once to ``float8_e4m3fn`` with one fp32 scale per output channel
  (``amax / 448``) and cached on the field (`fp8_weights`). The cache is keyed by each parameter's
  storage and in-place version counter (``Tensor._version``), host-side integers, so an optimizer step,
  ``load_state_dict`` or ``.to()`` refreshes it on the next call without a device synchronisation;
- **activations** are quantised per row (one fp32 scale per token row, ``amax / 448``) by the row
  kernel that produces them (`flowkern.ops.fm_loss_kernels._store_rows`), so no 16-bit copy of a GEMM
  input is written and re-read for quantisation. On CPU without the Triton interpreter the same
  arithmetic runs as torch ops (`quantize_rows`);
- **GEMMs** accumulate in fp32 (``use_fast_accum=False``), add the bias in their epilogue and write
  bf16 (the only output type of row-wise scaling on sm_89); the final ``(v - u)²`` row reduction and
  every sum are fp32.

Real LLM hidden states carry outlier channels (SmolLM2-135M: ~100 in one channel against a row RMS of
~7-12). `RAW_GEMMS` chooses which GEMMs stay 16-bit (bf16 weights cached beside the fp8 ones):
``"bf16-io"`` (default: cond_embed, input_proj and the output GEMM in bf16), ``"bf16"`` (cond_embed and
input_proj), ``"fp8"`` (every GEMM) or ``"smooth"`` (a measurement variant, torch row ops only: fp8 after
per-channel smoothing of the two raw-latent GEMMs, SmoothQuant with α = ½, ``s_k = sqrt(amax_k(x) / amax_k(W))``
from the chunk being scored, weights requantised per call). None of them meets issue 13's accuracy criterion
on SmolLM2 latents (README, "The GEMM route and fp8 scoring"; `benchmarks/fp8_accuracy.py`, which also
emulates finer recipes); ``"bf16-io"`` is the closest of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..field import VelocityField
from ..flow import _state_tensors, _version_key

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_TINY = 1e-30  # floor of a row's amax: an all-zero row quantises to zeros
# GPU compute capability with fp8 tensor cores (Ada sm_89, Hopper sm_90 and newer).
MIN_CAPABILITY = (8, 9)
RAW_GEMM_MODES = ("bf16", "bf16-io", "fp8", "smooth")
RAW_GEMMS = "bf16-io"


def check_fp8_device(device: torch.device, width: int) -> None:
    """Raise when fp8 scoring cannot run on `device` at width `width`: a GPU below sm_89, or a width
    that is not a multiple of 16 (cuBLASLt's fp8 layout rule). CPU always works."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"precision='fp8' needs fp8 tensor cores (compute capability >= 8.9: Ada, Hopper or "
                           f"newer); {device} ({name}) has compute capability {cap[0]}.{cap[1]}. "
                           "Use precision='bf16'.")
    if width % 16:
        raise ValueError(f"precision='fp8' on CUDA needs the field width to be a multiple of 16, got {width}")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantisation of [M, K] `x`: ``(q [M, K] float8_e4m3fn, scale [M, 1] fp32)`` with
    ``x ≈ q · scale``, ``scale = amax_row / 448``; the arithmetic of the Triton row kernels' `_store_rows`."""
    x = x.float()
    inv = FP8_MAX / x.abs().amax(-1, keepdim=True).clamp_min(FP8_TINY)
    q = (x * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, 1.0 / inv


@dataclass(frozen=True)
class Fp8Linear:
    """One nn.Linear quantised per output channel: ``W ≈ diag(scale) · weight_q``.

    ``weight_t`` is the [K, N] column-major view ``torch._scaled_mm`` wants as its second operand,
    ``scale`` the [1, N] fp32 channel scales, ``bias`` the bias in the GEMM's output dtype, ``weight``
    the original 16-bit-or-wider weight (kept for the smoothing variant, which requantises per call).
    """

    weight_t: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype) -> "Fp8Linear":
        """Quantise `weight` [N, K] per output channel (rows)."""
        q, scale = quantize_rows(weight)
        return cls(q.t(), scale.reshape(1, -1), bias.detach().to(out_dtype), weight.detach())

    def rows(self, start: int, stop: int) -> "Fp8Linear":
        """The output channels start:stop (a slice of an adaLN weight: shift and scale, or gate)."""
        return Fp8Linear(self.weight_t[:, start:stop], self.scale[:, start:stop], self.bias[start:stop],
                         self.weight[start:stop])

    def __call__(self, q: torch.Tensor, q_scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(q · q_scale) @ W^T + b`` with fp32 accumulation, in the bias dtype; `q_scale` is [M, 1] fp32."""
        return torch._scaled_mm(q, self.weight_t, scale_a=q_scale, scale_b=self.scale, bias=self.bias,
                                out_dtype=self.bias.dtype, use_fast_accum=False, out=out)


def smoothed(lin: Fp8Linear, x: torch.Tensor) -> tuple[Fp8Linear, torch.Tensor]:
    """SmoothQuant (α = ½) of the GEMM ``x @ W^T``: ``(linear with W·diag(s) requantised, s [K] fp32)``,
    ``s_k = sqrt(amax_k(x) / amax_k(W))``; the caller quantises ``x / s`` per row."""
    w = lin.weight.float()
    s = (x.float().abs().amax(0).clamp_min(FP8_TINY) / w.abs().amax(0).clamp_min(FP8_TINY)).sqrt()
    return Fp8Linear.build(w * s, lin.bias, lin.bias.dtype), s


@dataclass(frozen=True)
class Fp8Weights:
    """The fp8 GEMM weights of a `VelocityField`, in forward order (see `fp8_weights`), and 16-bit copies
    (weight, bias) of the two GEMMs that read raw latents, for ``RAW_GEMMS="bf16"``."""

    cond: Fp8Linear
    input: Fp8Linear
    cond16: tuple[torch.Tensor, torch.Tensor]
    input16: tuple[torch.Tensor, torch.Tensor]
    final16: tuple[torch.Tensor, torch.Tensor]
    blocks: tuple[tuple[Fp8Linear, Fp8Linear, Fp8Linear], ...]  # (adaLN, mlp.0, mlp.2) per block
    final_ada: Fp8Linear
    final: Fp8Linear


_CACHE_ATTR = "_flowkern_fp8_weights"


def fp8_weights(field: VelocityField, out_dtype: torch.dtype = torch.bfloat16) -> Fp8Weights:
    """The field's fp8 weights with per-output-channel scales, quantised on first use and cached on the field.

    The cache is rebuilt when any parameter was modified in place (an optimizer step, ``copy_``,
    ``load_state_dict``) or replaced since it was built, as told by the parameters' version counters;
    outside that it costs nothing per call.
    """
    key = (out_dtype, *_version_key(_state_tensors(field)))  # host-side: no device access, no sync
    cached = field.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]

    def lin(module: torch.nn.Linear) -> Fp8Linear:
        return Fp8Linear.build(module.weight, module.bias, out_dtype)

    with torch.no_grad():
        weights = Fp8Weights(
            cond=lin(field.cond_embed), input=lin(field.input_proj),
            cond16=(field.cond_embed.weight.to(out_dtype), field.cond_embed.bias.to(out_dtype)),
            input16=(field.input_proj.weight.to(out_dtype), field.input_proj.bias.to(out_dtype)),
            final16=(field.final_layer.linear.weight.to(out_dtype), field.final_layer.linear.bias.to(out_dtype)),
            blocks=tuple((lin(b.adaLN_modulation[1]), lin(b.mlp[0]), lin(b.mlp[2])) for b in field.res_blocks),
            final_ada=lin(field.final_layer.adaLN_modulation[1]), final=lin(field.final_layer.linear))
    field.__dict__[_CACHE_ATTR] = (key, weights)
    return weights
