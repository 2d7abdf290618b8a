"""Compile every Triton kernel of flowkern for a GPU architecture, without a GPU, and report its resources.

Usage:
    python benchmarks/kernel_report.py                          # sm_90, bf16
    python benchmarks/kernel_report.py --arch 80 --dtype float16

The real launchers run on small CPU tensors: `flow_scores` (seeded and with supplied noise) and
`flow_matching_loss` forward and backward (seeded, and with supplied noise and input gradients), all
with the triton backend. Triton's driver is replaced by a compile-only stand-in for the target, so each
launch compiles its kernel (every autotune config) with ptxas and returns without running it; the
tensors' contents are never meaningful. Row kernels get the launch geometry of a 132-SM GPU.

Prints one row per compiled variant: registers per thread, stack bytes (register spills show up here),
shared memory, whether the PTX uses Hopper's wgmma, and compile seconds; appends the rows to
benchmarks/results/kernels.csv (or --csv). Exit status 1 when a kernel fails to compile, when a launch
has no config that fits the architecture's shared memory, or when a kernel of flowkern.ops was never
launched. This catches what the CPU interpreter cannot: code that does not lower for a real GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, before triton (via flowkern) is imported

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Opt-in shared memory per block (bytes), from the CUDA programming guide's compute-capability table.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
SM_COUNT = 132  # H200 / H100 SXM: the row kernels' launch geometry depends on it
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports `target` and never touches a device."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _cuobjdump() -> Optional[str]:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict:
    """Registers, stack and local bytes of a cubin, from ``cuobjdump --dump-resource-usage`` (blank without it)."""
    tool = _cuobjdump()
    if tool is None:
        return {"registers": "", "stack_bytes": ""}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        return {"registers": "", "stack_bytes": ""}
    return {"registers": int(match.group(1)), "stack_bytes": int(match.group(2))}


class _Recorder:
    """Patches Triton's launch path so that every launch compiles for the target instead of running."""

    def __init__(self, arch: int):
        self.arch = arch
        self.rows: list[dict] = []
        self.launched: set[str] = set()
        self.failures: list[str] = []
        self._seen: set[int] = set()

    def __enter__(self) -> "_Recorder":
        # driver._active: the driver in use, None until first asked for (asking creates one, which needs a GPU)
        self._saved = (JITFunction.run, Autotuner.run, driver._active)
        recorder, jit_run = self, JITFunction.run

        def compile_only(fn: JITFunction, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            try:
                kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # report every failing variant, not only the first
                recorder.failures.append(f"{fn.__name__} {kwargs}: {type(exc).__name__}: {exc}")
                return None
            recorder.record(fn, args, kwargs, kernel, time.perf_counter() - start)
            return kernel

        def compile_every_config(tuner: Autotuner, *args, **kwargs):
            kwargs.pop("warmup", None)
            kernels = [k for k in tuner.warmup(*args, **kwargs) if k is not None]
            limit = SHARED_LIMIT.get(recorder.arch)
            if limit is not None and kernels and all(k.metadata.shared > limit for k in kernels):
                recorder.failures.append(f"{tuner.fn.__name__}: no config fits {limit} bytes of shared memory")
            return kernels[0] if kernels else None

        JITFunction.run = compile_only
        Autotuner.run = compile_every_config
        driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", self.arch, 32)))
        return self

    def __exit__(self, *exc) -> None:
        JITFunction.run, Autotuner.run, active = self._saved
        driver.set_active(active)

    def record(self, fn: JITFunction, args: tuple, kwargs: dict, kernel, seconds: float) -> None:
        self.launched.add(fn.__name__)
        if id(kernel) in self._seen:  # a cache hit: the same variant launched again
            return
        self._seen.add(id(kernel))
        bound = dict(zip(fn.arg_names, args), **kwargs)
        constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
        shared = kernel.metadata.shared
        limit = SHARED_LIMIT.get(self.arch)
        self.rows.append({
            "kernel": fn.__name__,
            "constexprs": " ".join(f"{k}={v}" for k, v in constexprs.items()),
            "warps": kernel.metadata.num_warps,
            "stages": kernel.metadata.num_stages,
            **_resources(kernel.asm["cubin"]),
            "shared_bytes": shared,
            "fits": "" if limit is None else ("yes" if shared <= limit else "NO"),
            "wgmma": "wgmma" in kernel.asm["ptx"],
            "compile_s": round(seconds, 2),
        })


def flowkern_kernels() -> set[str]:
    """Names of every Triton kernel defined in flowkern's op modules."""
    from flowkern.ops import fm_loss_kernels, scores, scores_gemm

    names = set()
    for module in (scores, fm_loss_kernels, scores_gemm):
        for value in vars(module).values():
            fn = value.fn if isinstance(value, Autotuner) else value
            if isinstance(fn, JITFunction) and fn.__name__.endswith("_kernel"):
                names.add(fn.__name__)
    return names


def drive_launchers(dtype: torch.dtype, width: int = 192, tokens: int = 256, arch: int = 90) -> None:
    """Call the Triton launchers once per kernel variant family on small CPU tensors (the fp8 row kernels from
    sm_89 on: below, `precision="fp8"` refuses to run)."""
    from flowkern.field import VelocityField
    from flowkern.ops import fm_loss, fm_loss_kernels, scores, scores_gemm

    torch.manual_seed(0)
    field = VelocityField(dim=width, depth=2).to(dtype)
    target = torch.randn(tokens, width, dtype=dtype)
    cond = torch.randn(tokens, width, dtype=dtype)
    layers = torch.tensor([0.25, 0.5, 0.75]).repeat_interleave(tokens // 3 + 1)[:tokens]
    scores._flow_scores_triton(field, target, cond, layers, (0.6, 0.8), None, None)
    scores._flow_scores_triton(field, target, cond, 0.5, (0.8,), torch.randn(tokens, width), None)

    gpu_tiling = fm_loss_kernels.row_tiling
    fm_loss_kernels.row_tiling = lambda rows, w, device: fm_loss_kernels.gpu_row_tiling(rows, w, SM_COUNT)
    try:
        # the GEMM route's row kernels (its GEMMs run as torch ops on the CPU tensors): 16-bit, then fp8
        scores_gemm.gemm_route_scores(field, target, cond, layers, (0.6, 0.8), None, None, triton_rows=True)
        if arch >= 89:
            scores_gemm.gemm_route_scores(field.float(), target, cond, 0.5, (0.8,), torch.randn(tokens, width), None,
                                          fp8=True, raw="fp8", triton_rows=True)
        weights = torch.ones(tokens)
        t = torch.rand(2, tokens)
        loss = fm_loss.flow_matching_loss_triton(field, target, cond, layers, weights, t, None, None)
        loss.backward()
        target_grad = target.clone().requires_grad_()
        loss = fm_loss.flow_matching_loss_triton(field, target_grad, cond, 0.5, weights, t,
                                                 torch.randn(2, tokens, width), None)
        loss.backward()
    finally:
        fm_loss_kernels.row_tiling = gpu_tiling


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as major*10+minor (default 90)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="field dtype (default bfloat16)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="CSV file to append to (default: benchmarks/results/kernels.csv)")
    args = parser.parse_args(argv)
    if args.arch < 80:
        parser.error(f"--arch must be 80 or newer (tensor-core GPUs flowkern targets), got {args.arch}")
    from benchmarks.common import RESULTS_DIR, append_csv, print_table

    start = time.perf_counter()
    with _Recorder(args.arch) as recorder:
        drive_launchers(DTYPES[args.dtype], arch=args.arch)
    missing = sorted(flowkern_kernels() - recorder.launched)
    rows = [{"arch": f"sm_{args.arch}", "dtype": args.dtype, **row} for row in recorder.rows]
    print_table(rows, title=f"flowkern Triton kernels compiled for sm_{args.arch}, {args.dtype} field, "
                            f"triton {triton.__version__} ({time.perf_counter() - start:.0f} s)")
    append_csv(args.csv or RESULTS_DIR / "kernels.csv", rows, torch.device("cpu"))
    problems = recorder.failures + [f"{name}: never launched" for name in missing]
    for problem in problems:
        print(f"kernel_report: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
