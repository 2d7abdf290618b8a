"""Reward shaping + advantages benchmark: the torch reference against the CUDA kernels of flowkern._C.

Usage:
    python benchmarks/bench_shaping.py --device cuda    # B in {256, 1024} x T in {1024, 4096, 16384}
    python benchmarks/bench_shaping.py --device cpu     # the torch path at a toy size

Each size runs `shape_rewards` then `shape_advantages` (DESIGN.md §1 defaults: minmax-bil, η=0.6,
k=15, β=0.01; groups of 8; γ=1) on a rollout-like mask (prompt, response, padding):
    torch        the two torch reference ops (about fifteen launches);
    cuda         the two CUDA ops (two launches);
    cuda fused   `shape_rewards_and_advantages` (one launch; row staged in shared memory);
    cuda fused, global scratch   the same with use_smem=False.
Parity is checked before timing: "exact" (bit-equal rewards), "ties" (a different choice among
equal values at the k-th, allowed) or "MISMATCH n". `adv err` is the max |Δ| of the advantages
against the torch reference on the same rewards.

Bandwidth floor: the fused op must read scores (4 B) + mask (1 B) and write rewards (4 B) +
advantages (4 B) = 13 B per token; `floor us` is that divided by the measured device-copy rate
(read + write of a 1 GiB buffer), and `% floor` is floor / measured time.

Prints one table and appends its rows to benchmarks/results/shaping.csv (or --csv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    "cuda": [(B, T) for B in (256, 1024) for T in (1024, 4096, 16384)],
    "cpu": [(8, 256)],
}
GROUP_SIZE = 8
GAMMA = 1.0
BYTES_PER_TOKEN = 4 + 1 + 4 + 4  # scores, mask in; rewards, advantages out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.common import bench_parser

    parser = bench_parser(
        __doc__, "cuda: the torch reference against the CUDA kernels; cpu: the torch path at a toy size", "shaping.csv")
    parser.add_argument("--sizes", nargs="*", default=None, metavar="BxT",
                        help="subset of sizes, e.g. 1024x4096 (default: all for the device)")
    return parser.parse_args(argv)


def rollout_batch(B: int, T: int, device, seed: int = 0):
    """Scores [B, T] fp32, a prompt/response/padding action mask [B, T] and outcomes [B]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, T, generator=gen).pow(3) * 5.0  # skewed, like flow scores
    prompt = torch.randint(0, max(T // 4, 1), (B, 1), generator=gen)
    length = torch.randint(1, T + 1, (B, 1), generator=gen)
    pos = torch.arange(T)[None]
    mask = (pos >= prompt) & (pos < prompt + length)
    outcome = torch.randint(0, 2, (B,), generator=gen).float()
    return scores.to(device), mask.to(device), outcome.to(device)


def parity(got, ref, scores, mask, config) -> str:
    """'exact', 'ties' (another choice among values equal at the k-th) or 'MISMATCH n'."""
    import torch

    from flowkern.reward import _normalise

    if torch.equal(got, ref):
        return "exact"
    value = -config.coef * _normalise(scores, mask, config.norm)
    own = (got == 0) | (got == value)
    same_multiset = torch.equal(got.sort(-1).values, ref.sort(-1).values)
    if bool(own.all()) and same_multiset:
        return "ties"
    return f"MISMATCH {int((got != ref).sum())}"


def copy_bandwidth(device) -> float:
    """Measured device copy rate in bytes/s (read + write), the bandwidth floor's denominator."""
    import torch

    from benchmarks.common import time_ms

    n = (1 << 30 if device.type == "cuda" else 1 << 24) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * n * 4 / (ms * 1e-3)


def bench_size(B: int, T: int, device, bandwidth: float) -> list[dict]:

    from benchmarks.common import time_ms
    from flowkern import FlowConfig, shape_advantages, shape_rewards

    config = FlowConfig()
    scores, mask, outcome = rollout_batch(B, T, device)
    warmup, iters = (3, 10) if device.type == "cuda" else (1, 3)

    ref_r = shape_rewards(scores, mask, config, backend="torch")
    ref_a = shape_advantages(outcome, ref_r, mask, GROUP_SIZE, GAMMA, backend="torch")
    candidates: list[tuple[str, Callable[[], object], str, float]] = [
        ("torch", lambda: shape_advantages(outcome, shape_rewards(scores, mask, config, backend="torch"), mask,
                                           GROUP_SIZE, GAMMA, backend="torch"), "ref", 0.0)]
    if device.type == "cuda":
        from flowkern.ops.shaping import shape_rewards_and_advantages

        def check(rewards, adv) -> tuple[str, float]:
            adv_ref = shape_advantages(outcome, rewards, mask, GROUP_SIZE, GAMMA, backend="torch")
            return parity(rewards, ref_r, scores, mask, config), float((adv - adv_ref).abs().max())

        r = shape_rewards(scores, mask, config, backend="cuda")
        a = shape_advantages(outcome, r, mask, GROUP_SIZE, GAMMA, backend="cuda")
        candidates.append(("cuda", lambda: shape_advantages(outcome, shape_rewards(scores, mask, config, backend="cuda"),
                                                            mask, GROUP_SIZE, GAMMA, backend="cuda"), *check(r, a)))
        for name, smem in (("cuda fused", True), ("cuda fused, global scratch", False)):
            r, a = shape_rewards_and_advantages(scores, mask, outcome, config, GROUP_SIZE, GAMMA, use_smem=smem)
            candidates.append((name, lambda smem=smem: shape_rewards_and_advantages(
                scores, mask, outcome, config, GROUP_SIZE, GAMMA, use_smem=smem), *check(r, a)))

    floor_ms = B * T * BYTES_PER_TOKEN / bandwidth * 1e3
    rows = []
    for name, fn, par, adv_err in candidates:
        ms = time_ms(fn, device, warmup=warmup, iters=iters)
        rows.append({"B": B, "T": T, "impl": name, "ms": ms, "x torch": 0.0, "floor us": floor_ms * 1e3,
                     "% floor": 100.0 * floor_ms / ms, "parity": par, "adv err": adv_err})
    torch_ms = rows[0]["ms"]
    for row in rows:
        row["x torch"] = torch_ms / row["ms"]
    del ref_a
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.common import RESULTS_DIR, append_csv, print_table
    from flowkern import FlowConfig

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_shaping: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    if device.type == "cuda":
        from flowkern.backend import unavailable_reason

        reason = unavailable_reason("shape_rewards", "cuda", device)
        if reason is not None:
            print(f"bench_shaping: the CUDA kernels are unavailable: {reason}", file=sys.stderr)
            return 2
    sizes = SIZES[args.device]
    if args.sizes:
        wanted = {tuple(int(v) for v in s.lower().split("x")) for s in args.sizes}
        sizes = [s for s in sizes if s in wanted] or sorted(wanted)
    csv_path = args.csv or RESULTS_DIR / "shaping.csv"
    bandwidth = copy_bandwidth(device)
    c = FlowConfig()
    print(f"measured device copy: {bandwidth / 1e9:.4g} GB/s; config norm={c.norm} threshold={c.threshold} "
          f"topk={c.topk} coef={c.coef}; group_size={GROUP_SIZE} gamma={GAMMA}")
    rows = []
    for B, T in sizes:
        rows += bench_size(B, T, device, bandwidth)
    print_table(rows, title=f"shape_rewards + shape_advantages on {device.type} "
                            f"(floor: {BYTES_PER_TOKEN} B/token at the copy rate)")
    append_csv(csv_path, rows, device)
    print(f"\nappended to {csv_path}")
    bad = [r for r in rows if str(r["parity"]).startswith("MISMATCH")]
    if bad:
        print(f"bench_shaping: {len(bad)} rows disagree with the torch reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
