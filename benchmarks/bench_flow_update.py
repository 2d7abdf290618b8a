"""Online flow update: peak memory and time per update, unchunked against chunked (``max_tokens``).

Usage:
    python benchmarks/bench_flow_update.py --device cpu                  # D=512, K=4, 3 layers, 1,024 tokens, fp32
    python benchmarks/bench_flow_update.py --device cuda --dim 1536      # on a GPU

One update = `flowkern.integrations._common.flow_update`, exactly what the TRL trainer, the verl
hook and the compact trainer run after each RL step: gather the (context, target) pairs of every
masked token at every hooked layer, flow-matching forward and backward (in chunks of at most
``max_tokens`` tokens, gradients accumulated), one Adam step. Latents are random; the flow and its
Adam state exist before the measurement, so the peak is the update's own working memory.
Peak memory: the CPU allocator's events from torch's profiler (`flowkern.testing.peak_cpu_allocated_bytes`)
on CPU, ``torch.cuda.max_memory_allocated`` on GPU. Prints a table and appends it to
benchmarks/results/flow_update.csv (or --csv): peak MiB, bytes per token-layer (and in fp32 vectors
of width D), median ms and the time relative to the unchunked update.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def main(argv: Optional[Sequence[str]] = None) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.common import append_csv, peak_extra_memory_bytes, print_table, time_ms
    from benchmarks.common import bench_parser
    from flowkern import FlowConfig, VelocityField
    from flowkern.integrations._common import flow_update
    from flowkern.testing import peak_cpu_allocated_bytes

    parser = bench_parser(__doc__, "where the flow and the latents live", "flow_update.csv")
    parser.add_argument("--dim", type=int, default=512, help="hidden size D (default 512)")
    parser.add_argument("--depth", type=int, default=4, help="flow depth K (default 4)")
    parser.add_argument("--tokens", type=int, default=1024, help="masked tokens per update (default 1024)")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[512, 256, 128, 64],
                        help="chunk sizes to compare with the unchunked update")
    parser.add_argument("--iters", type=int, default=3, help="timed updates per row (median)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    fracs = [0.25, 0.5, 0.75]
    config = FlowConfig(depth=args.depth)
    rows_per_seq = 129
    B = -(-args.tokens // (rows_per_seq - 1))
    g = torch.Generator(device=device).manual_seed(0)
    latents = [torch.randn(B, rows_per_seq, args.dim, generator=g, device=device) for _ in fracs]
    mask = torch.zeros(B, rows_per_seq, dtype=torch.bool, device=device)
    mask.view(-1)[:args.tokens + B] = True  # token_pre: each row's last masked token has no successor
    mask[:, -1] = False
    n_tokens = int(mask[:, :-1].sum())
    weights = torch.ones(B, device=device)
    field = VelocityField(args.dim, args.depth).to(device)
    opt = torch.optim.Adam(field.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    results = []
    base_ms = None
    for limit in [None, *args.max_tokens]:
        def update():
            return flow_update(field, opt, latents, fracs, mask, weights, config, generator=gen, max_tokens=limit)

        update()  # Adam state and the allocator's caches exist from here on
        peak = peak_extra_memory_bytes(update, device) if device.type == "cuda" else peak_cpu_allocated_bytes(update)
        ms = time_ms(update, device, warmup=1, iters=args.iters)
        base_ms = ms if limit is None else base_ms
        per = peak / (n_tokens * len(fracs))
        results.append({"dim": args.dim, "depth": args.depth, "tokens": n_tokens, "layers": len(fracs),
                        "max_tokens": limit or n_tokens, "peak_mib": peak / 2**20, "bytes_per_token_layer": per,
                        "fp32_vectors_per_token_layer": per / (4 * args.dim), "ms": ms, "time_vs_unchunked": ms / base_ms})
    print_table(results, f"online flow update, D={args.dim}, K={args.depth}, {n_tokens} tokens x {len(fracs)} layers, "
                         f"{device}")
    path = append_csv(args.csv or ROOT / "benchmarks" / "results" / "flow_update.csv", results, device)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
