"""Shared benchmark plumbing: timing, peak memory, device facts, tables and CSV rows."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_extra_memory_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by `fn()` above what was allocated before it (CUDA only; NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n×n×n product, the roofline for GEMM-bound ops."""
    if device.type != "cuda":
        n = 256
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def print_table(rows: list[Mapping[str, object]], title: str = "") -> None:
    """Print `rows` as an aligned text table."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def append_csv(path: Path, rows: Iterable[Mapping[str, object]], device: torch.device) -> Path:
    """Append `rows` to the CSV at `path`, each stamped with the date, device, torch and triton versions."""
    rows = list(rows)
    if not rows:
        return path
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    stamp = {"date": dt.date.today().isoformat(), "device": device_name(device),
             "torch": torch.__version__, "triton": triton_version}
    stamped = [{**stamp, **row} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(stamped[0]))
        if new:
            writer.writeheader()
        writer.writerows(stamped)
    return path


def bench_parser(doc: str, device_help: str, csv_name: str, *, field_shapes: bool = False
                 ) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares: ``--device`` and ``--csv``.

    With `field_shapes`, also the flags of the velocity-field benchmarks: ``--shapes`` (a subset of the
    named shapes) and ``--no-compile`` (skip the torch.compile row).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=device_help)
    parser.add_argument("--csv", type=Path, default=None,
                        help=f"CSV file to append to (default: benchmarks/results/{csv_name})")
    if field_shapes:
        parser.add_argument("--shapes", nargs="*", default=None, help="subset of shape names to run (default: all)")
        parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
        parser.add_argument("--compile-only", action="store_true",
                            help="append only the torch.compile row (the rows it is compared with are re-measured, "
                                 "not appended): benchmarks/gpu_check.sh runs every other row first")
    return parser
