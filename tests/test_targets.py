"""benchmarks/targets.py reads the newest GPU run of each CSV and judges it against the issues' targets.

The CSV rows here are fixtures in the benchmarks' own column layout, not measurements.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from helpers import ROOT

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks import targets  # noqa: E402

H200 = {"date": "2026-11-28", "device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0"}
CPU = {**H200, "device": "CPU (x86_64, 2 cores)"}


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _scores(stamp: dict, triton_ms: float, extra_gib: float = 0.4) -> list[dict]:
    chain = 36.0
    rows = []
    for shape in ("1.5B", "7B"):
        for impl, ms in (("torch eager", 81.0), ("torch.compile", 53.0), ("GEMM chain (cuBLAS)", chain),
                         ("triton", triton_ms)):
            rows.append({**stamp, "shape": shape, "dtype": "bfloat16", "impl": impl, "ms": ms,
                         "extra GiB": extra_gib if impl == "triton" else 2.4, "x chain": ms / chain,
                         "rel err": 0.004 if impl == "triton" else "nan"})
    return rows


def _verdicts(text: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 3") or line.startswith("| 4")
            or line.startswith("| 5")]
    return {cells[1]: cells[3].rstrip(" |") for cells in rows}


def test_nothing_recorded_is_not_measured(tmp_path: Path):
    _write(tmp_path / "scores.csv", _scores(CPU, 40.0))  # CPU toy rows never count
    assert targets.main(["--results", str(tmp_path)]) == 0
    verdicts = _verdicts((tmp_path / "targets.md").read_text())
    assert len(verdicts) == 14 and set(verdicts.values()) == {"not measured"}


def test_the_newest_gpu_run_is_judged(tmp_path: Path):
    # an older run that misses every scoring target, then a newer one that meets them
    _write(tmp_path / "scores.csv", _scores(H200, 60.0, extra_gib=0.9) + _scores({**H200, "date": "2026-11-29"}, 40.0))
    _write(tmp_path / "train.csv", [
        {**H200, "shape": s, "backend": b, "ms": ms, "x_eager": 92.8 / ms, "mem_vs_eager": mem}
        for s in ("1.5B", "7B") for b, ms, mem in (("eager", 92.8, 1.0), ("triton", 75.0, 0.5))])
    _write(tmp_path / "shaping.csv", [
        {**H200, "B": 1024, "T": 4096, "impl": impl, "ms": ms, "x torch": 2.0 / ms, "parity": parity}
        for impl, ms, parity in (("torch", 2.0, "ref"), ("cuda", 0.25, "exact"), ("cuda fused", 0.1, "ties"))])
    out = tmp_path / "t.md"
    assert targets.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    verdicts = _verdicts(text)
    assert verdicts["1.5B: triton ≤ 1.15× the GEMM chain"] == "met"  # 40/36 = 1.11
    assert verdicts["1.5B: triton ≥ 1.9× faster than eager"] == "met"  # 81/40 = 2.03
    assert verdicts["1.5B: triton ≥ 1.25× faster than torch.compile"] == "met"  # 53/40 = 1.33
    assert verdicts["7B: triton peak extra memory ≤ 0.5 GiB"] == "met"
    assert verdicts["7B: triton ≥ 1.3× faster than eager (fwd+bwd)"] == "MISSED"  # 92.8/75 = 1.24
    assert verdicts["7B: triton peak memory ≤ 0.7× eager's"] == "met"
    assert verdicts["B=1024, T=4096: CUDA ≥ 10× faster than torch (best CUDA row)"] == "met"  # 20× fused
    assert "| 1.111×" in text and "2026-11-29" in text and "NVIDIA H200" in text


def test_a_disagreeing_cuda_row_is_a_miss(tmp_path: Path):
    _write(tmp_path / "shaping.csv", [
        {**H200, "B": 1024, "T": 4096, "impl": impl, "ms": ms, "x torch": 2.0 / ms, "parity": parity}
        for impl, ms, parity in (("torch", 2.0, "ref"), ("cuda", 0.5, "MISMATCH 3"))])
    targets.main(["--results", str(tmp_path)])
    verdicts = _verdicts((tmp_path / "targets.md").read_text())
    assert verdicts["B=1024, T=4096: CUDA ≥ 10× faster than torch (best CUDA row)"] == "MISSED"  # 4×
    assert verdicts["every CUDA row agrees with the torch reference (rows disagreeing)"] == "MISSED"


def test_fp8_and_route_targets(tmp_path: Path):
    """Issue 13: fp8 time, fp8 vs the faster bf16 route, that route vs the GEMM chain, memory."""
    rows = []
    for shape, fp8_ms in (("1.5B", 20.0), ("7B", 90.0)):
        for impl, ms, extra in (("GEMM chain (cuBLAS)", 36.0, 2.4), ("triton", 50.0, 0.4), ("triton fused", 50.0, 0.4),
                                ("triton gemm-route", 40.0, 0.45), ("fp8", fp8_ms, 0.3),
                                ("fp8 GEMM chain (_scaled_mm)", 17.0, 1.0)):
            rows.append({**H200, "shape": shape, "dtype": "bfloat16", "impl": impl, "ms": ms, "extra GiB": extra,
                         "x chain": ms / 36.0, "rel err": "nan"})
    _write(tmp_path / "scores.csv", rows)
    assert targets.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "targets.md").read_text()
    verdicts = {c[1]: c[3].rstrip(" |") for c in (line.split(" | ") for line in text.splitlines()
                                                   if line.startswith("| 13"))}
    assert verdicts["1.5B: fp8 scoring ≤ 25 ms"] == "met" and verdicts["7B: fp8 scoring ≤ 85 ms"] == "MISSED"
    assert verdicts["1.5B: fp8 ≥ 1.6× faster than the faster bf16 route"] == "met"  # 40 / 20 = 2
    assert verdicts["7B: fp8 ≥ 1.6× faster than the faster bf16 route"] == "MISSED"
    assert verdicts["1.5B: the faster bf16 route ≤ 1.15× the bf16 GEMM chain"] == "met"  # 40 / 36
    assert verdicts["1.5B: fp8 and gemm-route peak extra memory ≤ 0.5 GiB"] == "met"
    assert "| 40/36" not in text and "1.111×" in text
