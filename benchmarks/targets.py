"""Check the recorded GPU benchmark figures against the targets of the scoring, training and shaping issues.

Usage:
    python benchmarks/targets.py                 # reads benchmarks/results/{scores,train,shaping}.csv
    python benchmarks/targets.py --results DIR --out FILE

For each CSV only GPU rows count (CPU toy runs are skipped), and only the newest run: the rows carrying
the stamp (date, device, torch, triton) of the file's last row, the last row per implementation when a
run was repeated. Ratios therefore always compare figures measured side by side in one run. Prints a
markdown table (target, measured value, verdict: met / MISSED / not measured) and writes it to
benchmarks/results/targets.md (or --out), so that no figure is ever copied by hand.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STAMP = ("date", "device", "torch", "triton")


class Check(NamedTuple):
    issue: str
    target: str
    value: Optional[float]  # None: not measured
    passes: Callable[[float], bool]
    unit: str = ""


def latest_gpu_run(path: Path, key: Sequence[str]) -> tuple[dict[tuple, dict], str]:
    """Rows of the newest GPU run in the CSV at `path`, by `key` columns; and that run's stamp as text."""
    if not path.exists():
        return {}, ""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not r.get("device", "CPU").startswith("CPU")]
    if not rows:
        return {}, ""
    stamp = tuple(rows[-1][c] for c in STAMP)
    run = {tuple(r[c] for c in key): r for r in rows if tuple(r[c] for c in STAMP) == stamp}
    return run, f"{stamp[1]}, {stamp[0]}, torch {stamp[2]}, triton {stamp[3]}"


def _num(row: Optional[dict], column: str) -> Optional[float]:
    if row is None or row.get(column, "") == "":
        return None
    value = float(row[column])
    return None if math.isnan(value) else value


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def scoring_checks(results: Path) -> tuple[list[Check], str]:
    run, stamp = latest_gpu_run(results / "scores.csv", ("shape", "impl"))
    checks = []
    for shape in ("1.5B", "7B"):
        triton = run.get((shape, "triton"))
        ms = _num(triton, "ms")
        checks.append(Check("3 scoring", f"{shape}: triton ≤ 1.15× the GEMM chain", _num(triton, "x chain"),
                            lambda v: v <= 1.15, "×"))
        if shape == "1.5B":
            eager = _num(run.get((shape, "torch eager")), "ms")
            compiled = _num(run.get((shape, "torch.compile")), "ms")
            checks.append(Check("3 scoring", f"{shape}: triton ≥ 1.9× faster than eager", _ratio(eager, ms),
                                lambda v: v >= 1.9, "×"))
            checks.append(Check("3 scoring", f"{shape}: triton ≥ 1.25× faster than torch.compile",
                                _ratio(compiled, ms), lambda v: v >= 1.25, "×"))
        checks.append(Check("3 scoring", f"{shape}: triton peak extra memory ≤ 0.5 GiB", _num(triton, "extra GiB"),
                            lambda v: v <= 0.5, " GiB"))
        checks.append(Check("3 scoring", f"{shape}: bf16 scores within 2e-2 relative error of torch",
                            _num(triton, "rel err"), lambda v: v <= 2e-2))
    checks += fp8_checks(run)
    return checks, stamp


# Issue 13 (fp8 scoring, and the GEMM route beside the fused one): fp8 time targets per shape.
FP8_MS = {"1.5B": 25.0, "7B": 85.0}


def fp8_checks(run: dict) -> list[Check]:
    """fp8 under its time target and ≥ 1.6× the faster 16-bit route; that route ≤ 1.15× the GEMM chain; ≤ 0.5 GiB."""
    checks = []
    for shape in ("1.5B", "7B"):
        fp8 = run.get((shape, "fp8"))
        routes = [_num(run.get((shape, impl)), "ms") for impl in ("triton fused", "triton gemm-route")]
        routes = [r for r in routes if r is not None]
        best = min(routes) if routes else None
        chain = _num(run.get((shape, "GEMM chain (cuBLAS)")), "ms")
        ms = _num(fp8, "ms")
        checks += [
            Check("13 fp8", f"{shape}: fp8 scoring ≤ {FP8_MS[shape]:g} ms", ms, lambda v, t=FP8_MS[shape]: v <= t, " ms"),
            Check("13 fp8", f"{shape}: fp8 ≥ 1.6× faster than the faster bf16 route", _ratio(best, ms),
                  lambda v: v >= 1.6, "×"),
            Check("13 fp8", f"{shape}: the faster bf16 route ≤ 1.15× the bf16 GEMM chain", _ratio(best, chain),
                  lambda v: v <= 1.15, "×"),
            Check("13 fp8", f"{shape}: fp8 and gemm-route peak extra memory ≤ 0.5 GiB",
                  max((v for v in (_num(fp8, "extra GiB"), _num(run.get((shape, "triton gemm-route")), "extra GiB"))
                       if v is not None), default=None), lambda v: v <= 0.5, " GiB"),
        ]
    return checks


def training_checks(results: Path) -> tuple[list[Check], str]:
    run, stamp = latest_gpu_run(results / "train.csv", ("shape", "backend"))
    checks = []
    for shape in ("1.5B", "7B"):
        triton = run.get((shape, "triton"))
        checks.append(Check("4 training", f"{shape}: triton ≥ 1.3× faster than eager (fwd+bwd)",
                            _num(triton, "x_eager"), lambda v: v >= 1.3, "×"))
        checks.append(Check("4 training", f"{shape}: triton peak memory ≤ 0.7× eager's",
                            _num(triton, "mem_vs_eager"), lambda v: v <= 0.7, "×"))
    return checks, stamp


def shaping_checks(results: Path) -> tuple[list[Check], str]:
    run, stamp = latest_gpu_run(results / "shaping.csv", ("B", "T", "impl"))
    at_size = {impl: row for (b, t, impl), row in run.items() if (b, t) == ("1024", "4096")}
    speedups = [_num(row, "x torch") for impl, row in at_size.items() if impl.startswith("cuda")]
    speedups = [s for s in speedups if s is not None]
    mismatches = [r for r in run.values() if r.get("parity", "").startswith("MISMATCH")]
    checks = [Check("5 shaping", "B=1024, T=4096: CUDA ≥ 10× faster than torch (best CUDA row)",
                    max(speedups) if speedups else None, lambda v: v >= 10, "×"),
              Check("5 shaping", "every CUDA row agrees with the torch reference (rows disagreeing)",
                    float(len(mismatches)) if run else None, lambda v: v == 0)]
    return checks, stamp


def render(sections: list[tuple[list[Check], str]]) -> str:
    lines = ["| issue | target | measured | verdict |", "|---|---|---:|---|"]
    sources = []
    for checks, stamp in sections:
        sources.append(f"- {checks[0].issue}: {stamp or 'no GPU run recorded'}")
        for c in checks:
            if c.value is None:
                measured, verdict = "—", "not measured"
            else:
                measured, verdict = f"{c.value:.4g}{c.unit}", "met" if c.passes(c.value) else "MISSED"
            lines.append(f"| {c.issue} | {c.target} | {measured} | {verdict} |")
    return "\n".join(["# Benchmark targets", "", "Written by `python benchmarks/targets.py` from the newest GPU run "
                      "in each CSV:", *sources, "", *lines, ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the benchmark CSVs")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: RESULTS/targets.md)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results must be a folder of benchmark CSVs, got {args.results}")
    text = render([scoring_checks(args.results), training_checks(args.results), shaping_checks(args.results)])
    out = args.out or args.results / "targets.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
