"""Flow-matching training benchmark: forward + backward of the loss, eager torch vs torch.compile vs Triton.

Usage:
    python benchmarks/bench_train.py --device cuda     # 1.5B and 7B shapes, 16,384 tokens, bf16
    python benchmarks/bench_train.py --device cpu      # a toy shape, fp32, Triton in its CPU interpreter

One timed step = zero the field's gradients, compute the masked-mean flow-matching loss
(t logit-normal and ε drawn inside the step, as in training) and backpropagate to every parameter
of the field. All three implementations are called at the backend level with the same prepared
inputs, so the front end's input validation is excluded from each. Before timing, each
implementation's loss and gradients are compared with eager torch on the same t and ε.

Prints one table per shape and appends its rows to benchmarks/results/train.csv (or --csv):
median ms, achieved TFLOP/s (FLOPs counted from the field's Linear modules) and its share of the
measured bf16 matmul peak, peak memory above the inputs, and speed and memory relative to eager.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


class Shape(NamedTuple):
    name: str
    dim: int
    depth: int
    tokens: int


SHAPES = {
    "cuda": [Shape("1.5B", 1536, 4, 16384), Shape("7B", 3584, 6, 16384)],
    "cpu": [Shape("toy", 48, 2, 64)],
}
LAYER = 0.5


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.common import bench_parser

    parser = bench_parser(
        __doc__, "cuda: the 1.5B and 7B shapes in bf16; cpu: a toy shape in fp32 (Triton interpreted)", "train.csv",
        field_shapes=True)
    parser.add_argument("--tokens", type=int, default=None, help="override the number of tokens per step")
    return parser.parse_args(argv)


def training_flops(field, tokens: int, repeats: int = 1, layer_values: int = 1, input_grad: bool = False) -> int:
    """Matmul FLOPs of one forward + backward, counted from the field's Linear modules.

    Forward, weight gradient and input gradient are 2·in·out FLOPs per row each. Rows: the time
    embedder and every Linear after the embedders see tokens·repeats rows; cond_embed sees each token
    once; the layer embedder sees each distinct layer value once. No input gradient is needed for the
    Linears fed by constants: the sinusoid features, and x_t and c unless `input_grad`.
    """
    import torch

    no_input_grad = {"time_embed.mlp.0", "layer_embed.mlp.0"}
    if not input_grad:
        no_input_grad |= {"input_proj", "cond_embed"}
    total = 0
    for name, module in field.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("layer_embed."):
            rows = layer_values
        elif name == "cond_embed":
            rows = tokens
        else:
            rows = tokens * repeats
        passes = 2 if name in no_input_grad else 3
        total += passes * 2 * module.in_features * module.out_features * rows
    return total


def _random_field(shape: Shape, device, dtype):
    import torch

    from flowkern import VelocityField

    torch.manual_seed(0)
    field = VelocityField(shape.dim, shape.depth)
    with torch.no_grad():  # random weights everywhere (the default init makes v ≡ 0 and most gradients 0)
        for p in field.parameters():
            p.normal_(0.0, shape.dim ** -0.5 if p.dim() > 1 else 0.02)
    return field.to(device=device, dtype=dtype)


def _parity(field, loss_fn: Callable, reference: Callable, target, cond, weights) -> tuple[float, float]:
    """(|loss - reference loss|, max over parameters of ‖grad - reference grad‖ / ‖reference grad‖)."""
    import torch

    n, d = target.shape
    g = torch.Generator(device=target.device).manual_seed(1)
    t = torch.sigmoid(torch.randn((1, n), generator=g, device=target.device))
    noise = torch.randn((1, n, d), generator=g, device=target.device)
    results = []
    for fn in (reference, loss_fn):
        field.zero_grad(set_to_none=True)
        loss = fn(field, target, cond, LAYER, weights, t, noise, None)
        loss.backward()
        results.append((float(loss.detach()), [p.grad.float().clone() for p in field.parameters()]))
    (ref_loss, ref_grads), (loss, grads) = results
    field.zero_grad(set_to_none=True)
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads, ref_grads))
    return abs(loss - ref_loss), rel


def bench_shape(shape: Shape, device, peak_tflops: float, rows_of: str = "all") -> Iterator[dict]:
    """Yield one row per implementation as it is measured: eager and triton (rows_of "main"), then
    torch.compile (rows_of "compile"; it takes longest to build); "all" yields both. Eager is always measured:
    the other rows are compared with it.

    torch.compile is built once per shape: its parity call and its timed calls pass the same kinds of
    arguments (explicit noise), so the ``dynamic=False`` graph is not traced a second time.
    """
    import torch

    from benchmarks.common import peak_extra_memory_bytes, time_ms
    from flowkern.flow import _flow_matching_loss_torch
    from flowkern.ops.fm_loss import flow_matching_loss_triton

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter's bf16 is wrong
    warmup, iters = (3, 10) if on_gpu else (1, 2)
    field = _random_field(shape, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.randn((shape.tokens, shape.dim), generator=g, device=device).to(dtype)
    cond = torch.randn((shape.tokens, shape.dim), generator=g, device=device).to(dtype)
    weights = torch.ones(shape.tokens, dtype=torch.float32, device=device)
    flops = training_flops(field, shape.tokens)

    impls: list[tuple[str, Callable]] = [("eager", _flow_matching_loss_torch)]
    if rows_of in ("main", "all"):
        impls.append(("triton", flow_matching_loss_triton))
    if rows_of in ("compile", "all"):
        # On CPU inductor's C++ build alone takes most of a minute: trace with dynamo, run eagerly.
        impls.append(("torch.compile" if on_gpu else "torch.compile (aot_eager)",
                      torch.compile(_flow_matching_loss_torch, dynamic=False,
                                    backend="inductor" if on_gpu else "aot_eager")))

    eager: Optional[dict] = None
    for name, loss_fn in impls:
        loss_diff, grad_err = _parity(field, loss_fn, _flow_matching_loss_torch, target, cond, weights)

        def step(loss_fn=loss_fn, draw_noise=name != "triton") -> None:
            field.zero_grad(set_to_none=True)
            t = torch.sigmoid(torch.randn((1, shape.tokens), device=device))
            # triton regenerates ε in-kernel (its training path); the torch rows draw it as the reference would,
            # passed explicitly so the compiled graph is the one its parity call built
            noise = torch.randn((1, shape.tokens, shape.dim), device=device) if draw_noise else None
            loss_fn(field, target, cond, LAYER, weights, t, noise, None).backward()

        ms = time_ms(step, device, warmup=warmup, iters=iters)
        extra = peak_extra_memory_bytes(step, device)
        field.zero_grad(set_to_none=True)
        tflops = flops / (ms * 1e-3) / 1e12
        row = {"shape": shape.name, "dim": shape.dim, "depth": shape.depth, "tokens": shape.tokens,
               "dtype": str(dtype).removeprefix("torch."), "backend": name, "ms": ms, "tflops": tflops,
               "pct_peak": 100.0 * tflops / peak_tflops, "peak_mib": extra / 2**20,
               "x_eager": 1.0, "mem_vs_eager": 1.0 if on_gpu else float("nan"), "gflop": flops / 1e9,
               "max_abs_loss_diff": loss_diff, "max_grad_rel_err": grad_err}
        if eager is None:
            eager = row
            if rows_of == "compile":
                continue  # measured for the ratios only: the main pass appended it
        else:
            row["x_eager"] = eager["ms"] / ms
            row["mem_vs_eager"] = row["peak_mib"] / eager["peak_mib"] if on_gpu else float("nan")
        yield row


def _device(name: str):
    """The device to benchmark on. On CPU the Triton interpreter is switched on first: it must be set
    before triton is imported (through flowkern)."""
    if name == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda needs a CUDA GPU")
    return torch.device(name)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the benchmark; returns every row it appended to the CSV."""
    args = parse_args(argv)
    device = _device(args.device)
    from benchmarks.common import RESULTS_DIR, append_csv, matmul_peak_tflops, print_table

    by_name = {s.name: s for s in SHAPES[args.device]}
    shapes = [by_name[name] for name in args.shapes if name in by_name] if args.shapes else list(by_name.values())
    if not shapes:
        raise SystemExit(f"bench_train: no shape named {args.shapes} for --device {args.device}")
    if args.tokens is not None:
        shapes = [s._replace(tokens=args.tokens) for s in shapes]
    csv_path = args.csv or RESULTS_DIR / "train.csv"
    peak = matmul_peak_tflops(device)
    print(f"measured matmul peak: {peak:.4g} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32, CPU'})")
    rows = []
    for shape in shapes:
        print(f"\nflow_matching_loss forward+backward, {shape.name} shape: D={shape.dim}, K={shape.depth}, "
              f"{shape.tokens} tokens")
        shape_rows = []
        rows_of = "compile" if args.compile_only else ("main" if args.no_compile else "all")
        for row in bench_shape(shape, device, peak, rows_of):
            append_csv(csv_path, [row], device)  # row by row: a timeout keeps what was measured
            print(f"  {row['backend']}: {row['ms']:.4g} ms", flush=True)
            shape_rows.append(row)
        print_table(shape_rows)
        rows += shape_rows
    print(f"\nappended to {csv_path}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
