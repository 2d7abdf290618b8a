"""Scoring benchmark: eager torch, torch.compile of it, the bare GEMM chains, and the Triton backend's routes.

Rows: the bf16 GEMM chain; "triton" (the route `auto` takes, `flowkern.ops.scores_gemm.score_route`),
"triton fused" and "triton gemm-route" (both 16-bit routes side by side), "fp8" (`precision="fp8"`) and
"fp8 GEMM chain (_scaled_mm)" (its floor; fp8 rows need compute capability >= 8.9), torch eager, torch.compile.

Usage:
    python benchmarks/bench_scores.py --device cuda     # the 1.5B and 7B shapes of DESIGN.md §4, bf16
    python benchmarks/bench_scores.py --device cpu      # a toy shape, fp32, Triton in its CPU interpreter

Prints one table per shape and appends each row to benchmarks/results/scores.csv (or --csv) as soon as it is
measured, GEMM chain, triton and eager first, torch.compile last (its build is the slowest part; --no-compile
skips it, --compile-only runs only it). Shapes run in the order given by --shapes. Each row: median ms, achieved TFLOP/s and its share of the measured bf16 matmul peak, peak extra
memory, and the time relative to the GEMM chain. FLOPs are counted from the velocity field's modules.
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
    layers: int
    tokens: int  # per layer


SHAPES = {
    "cuda": [Shape("1.5B", 1536, 4, 3, 65536), Shape("7B", 3584, 6, 3, 32768)],
    "cpu": [Shape("toy", 32, 1, 3, 32)],
}
TIMESTEPS = (0.8,)
LAYER_FRACS = (0.25, 0.5, 0.75)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.common import bench_parser

    parser = bench_parser(
        __doc__, "cuda: the DESIGN.md §4 shapes in bf16; cpu: a toy shape in fp32 (Triton interpreted)", "scores.csv",
        field_shapes=True)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (via flowkern) is imported
    import torch

    from benchmarks.common import RESULTS_DIR, append_csv, matmul_peak_tflops, print_table

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_scores: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    by_name = {s.name: s for s in SHAPES[args.device]}
    shapes = [by_name[name] for name in args.shapes if name in by_name] if args.shapes else list(by_name.values())
    if not shapes:
        print(f"bench_scores: no shape named {args.shapes} for --device {args.device}", file=sys.stderr)
        return 2
    csv_path = args.csv or RESULTS_DIR / "scores.csv"
    peak = matmul_peak_tflops(device)
    print(f"measured matmul peak: {peak:.4g} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32, CPU'})")
    rows_of = "compile" if args.compile_only else ("main" if args.no_compile else "all")
    for shape in shapes:
        print(f"\nflow_scores, {shape.name} shape: D={shape.dim}, K={shape.depth}, {shape.layers} layers x "
              f"{shape.tokens} tokens, timesteps {TIMESTEPS}")
        rows = []
        for row in bench_shape(shape, device, peak, rows_of):
            append_csv(csv_path, [row], device)  # row by row: a timeout keeps what was measured
            print(f"  {row['impl']}: {row['ms']:.4g} ms", flush=True)
            rows.append(row)
        print_table(rows)
    print(f"\nappended to {csv_path}")
    return 0


def scoring_flops(field, n_rows: int, n_timesteps: int, n_layer_values: int) -> int:
    """Matmul FLOPs of one scoring call, from the field's Linear modules.

    cond_embed runs once per row; the time and layer embedders once per distinct value; every
    other Linear once per (row, timestep). Elementwise work is not counted.
    """
    import torch

    total = 0
    for name, module in field.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        flops = 2 * module.in_features * module.out_features
        if name.startswith("time_embed."):
            total += flops * n_timesteps
        elif name.startswith("layer_embed."):
            total += flops * n_layer_values
        elif name == "cond_embed":
            total += flops * n_rows
        else:
            total += flops * n_rows * n_timesteps
    return total


def gemm_chain(field, x1, cond, n_timesteps: int) -> Callable[[], None]:
    """The bare GEMMs of one scoring call (cuBLAS on CUDA), without bias or any elementwise op.

    Same operands and output shapes as the fused pass: cond_embed over the rows, then input_proj,
    per block the adaLN, MLP-in and MLP-out GEMMs, the final adaLN and the output GEMM over rows x timesteps.
    """
    import torch

    rows = x1.shape[0] * n_timesteps
    width = field.dim
    dtype = field.input_proj.weight.dtype
    x = x1.to(dtype).repeat(n_timesteps, 1)
    c = cond.to(dtype)
    y = torch.empty(c.shape[0], width, dtype=dtype, device=x.device)
    s = torch.empty(rows, width, dtype=dtype, device=x.device).normal_()
    a = torch.empty(rows, width, dtype=dtype, device=x.device)
    h = torch.empty(rows, width, dtype=dtype, device=x.device)
    mod = torch.empty(rows, 3 * width, dtype=dtype, device=x.device)
    weights = {name: p.detach() for name, p in field.named_parameters() if name.endswith("weight")}

    def run() -> None:
        torch.mm(c, weights["cond_embed.weight"].t(), out=y)
        torch.mm(x, weights["input_proj.weight"].t(), out=a)
        for i in range(field.depth):
            torch.mm(s, weights[f"res_blocks.{i}.adaLN_modulation.1.weight"].t(), out=mod)
            torch.mm(a, weights[f"res_blocks.{i}.mlp.0.weight"].t(), out=h)
            torch.mm(h, weights[f"res_blocks.{i}.mlp.2.weight"].t(), out=a)
        torch.mm(s, weights["final_layer.adaLN_modulation.1.weight"].t(), out=mod[:, :2 * width])
        torch.mm(a, weights["final_layer.linear.weight"].t(), out=h)

    return run


def fp8_gemm_chain(field, x1, cond, n_timesteps: int) -> Callable[[], None]:
    """The fp8 floor: `gemm_chain`'s GEMMs as ``torch._scaled_mm`` on e4m3 operands with row-wise scales (weights
    per output channel, activations per row), fp32 accumulation, bf16 out; no bias, no quantisation pass."""
    import torch

    from flowkern.ops.scores_fp8 import quantize_rows

    rows, width = x1.shape[0] * n_timesteps, field.dim
    act = [quantize_rows(torch.randn(m, width, device=x1.device)) for m in (cond.shape[0], rows)]
    weights = {name: quantize_rows(p.detach()) for name, p in field.named_parameters() if name.endswith("weight")
               and p.dim() == 2 and p.shape[1] == width}
    outs = {n: torch.empty(m, n * width, dtype=torch.bfloat16, device=x1.device)
            for m, n in ((rows, 1), (rows, 3), (rows, 2))}
    y = torch.empty(cond.shape[0], width, dtype=torch.bfloat16, device=x1.device)

    def mm(a, name: str, out) -> None:
        (q, qs), (w, ws) = a, weights[name + ".weight"]
        torch._scaled_mm(q, w.t(), scale_a=qs, scale_b=ws.t(), out_dtype=torch.bfloat16, out=out)

    def run() -> None:
        mm(act[0], "cond_embed", y)
        mm(act[1], "input_proj", outs[1])
        for i in range(field.depth):
            mm(act[1], f"res_blocks.{i}.adaLN_modulation.1", outs[3])
            mm(act[1], f"res_blocks.{i}.mlp.0", outs[1])
            mm(act[1], f"res_blocks.{i}.mlp.2", outs[1])
        mm(act[1], "final_layer.adaLN_modulation.1", outs[2])
        mm(act[1], "final_layer.linear", outs[1])

    return run


def bench_shape(shape: Shape, device, peak_tflops: float, rows_of: str = "all") -> Iterator[dict]:
    """Yield one row per implementation as it is measured: GEMM chain, triton, torch eager (rows_of "main"),
    then torch.compile (rows_of "compile"); "all" yields both. The GEMM chain is always measured: every row's
    "x chain" is relative to it."""
    import torch

    from benchmarks.common import peak_extra_memory_bytes, time_ms
    from flowkern import VelocityField, flow_scores
    from flowkern.backend import resolve
    from flowkern.flow import LayerRows, _flow_scores_torch, score_rows
    from flowkern.ops._triton import draw_seed
    from flowkern.ops import scores, scores_fp8, scores_gemm
    from flowkern.ops.scores import seeded_noise

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter's bf16 is wrong
    warmup, iters = (3, 10) if on_gpu else (1, 2)
    torch.manual_seed(0)
    field = VelocityField(shape.dim, shape.depth)
    with torch.no_grad():  # random weights everywhere (the default init makes v ≡ 0)
        for p in field.parameters():
            p.normal_(0.0, shape.dim ** -0.5 if p.dim() > 1 else 0.02)
    field = field.to(device=device, dtype=dtype).eval()
    n = shape.layers * shape.tokens
    x1 = torch.randn(n, shape.dim, device=device, dtype=dtype)
    cond = torch.randn(n, shape.dim, device=device, dtype=dtype)
    layer = torch.tensor(LAYER_FRACS[:shape.layers], device=device).repeat_interleave(shape.tokens)
    flops = scoring_flops(field, n, len(TIMESTEPS), shape.layers)
    # The triton row times the scoring call flow_reward makes: the layers as a table (each embedded once).
    table = LayerRows(layer[::shape.tokens].contiguous(),
                      torch.arange(shape.layers, device=device).repeat_interleave(shape.tokens))
    triton_fn = resolve("flow_scores", "triton", device)[1]  # the route `auto` takes (scores_gemm.score_route)
    fp8_ok = not on_gpu or torch.cuda.get_device_capability(device) >= scores_fp8.MIN_CAPABILITY

    def fused(generator=None) -> torch.Tensor:
        return score_rows(scores._flow_scores_triton, field, x1, cond, table, TIMESTEPS, None, generator)

    def gemm_route(generator=None, fp8: bool = False) -> torch.Tensor:
        return scores_gemm.gemm_route_scores(field, x1, cond, table, TIMESTEPS, None, generator, fp8=fp8)

    # Parity first (a wrong kernel is not worth timing), in the timed seeded mode: the torch reference gets
    # exactly the ε that the Triton kernels draw in-kernel for this generator seed.
    ref = flow_scores(field, x1, cond, layer, timesteps=TIMESTEPS, backend="torch",
                      noise=seeded_noise(draw_seed(torch.Generator(device=device).manual_seed(1), device), n,
                                         shape.dim, device))
    rel_err = {}
    for name, fn in (("triton", triton_fn), ("triton fused", fused), ("triton gemm-route", gemm_route),
                     ("fp8", lambda g: gemm_route(g, fp8=True))):
        if name == "fp8" and not fp8_ok:
            continue
        got = fn(torch.Generator(device=device).manual_seed(1)) if name != "triton" else score_rows(
            triton_fn, field, x1, cond, table, TIMESTEPS, None, torch.Generator(device=device).manual_seed(1))
        rel_err[name] = float((got - ref).norm() / ref.norm())
    del ref, got

    def scored(backend: str) -> Callable[[], object]:
        return lambda: flow_scores(field, x1, cond, layer, timesteps=TIMESTEPS, backend=backend)

    chain = ("GEMM chain (cuBLAS)" if on_gpu else "GEMM chain (torch.mm)", gemm_chain(field, x1, cond, len(TIMESTEPS)))
    candidates: list[tuple[str, Callable[[], object]]] = [chain]
    if rows_of in ("main", "all"):
        candidates += [("triton", lambda: score_rows(triton_fn, field, x1, cond, table, TIMESTEPS, None, None)),
                       ("triton fused", fused), ("triton gemm-route", gemm_route)]
        if fp8_ok:
            candidates += [("fp8", lambda: gemm_route(fp8=True)),
                           ("fp8 GEMM chain (_scaled_mm)", fp8_gemm_chain(field, x1, cond, len(TIMESTEPS)))]
        else:
            print(f"  fp8 rows skipped: compute capability {torch.cuda.get_device_capability(device)} < 8.9")
        candidates.append(("torch eager", scored("torch")))
    if rows_of in ("compile", "all"):
        # On CPU, inductor's C++ build alone takes most of a minute: trace with dynamo, run eagerly.
        compiled = torch.compile(_flow_scores_torch, backend="inductor" if on_gpu else "aot_eager")

        def run_compiled() -> object:
            with torch.no_grad():
                return compiled(field, x1, cond, layer, TIMESTEPS, None, None)
        candidates.append(("torch.compile" if on_gpu else "torch.compile (aot_eager)", run_compiled))

    chain_ms = None
    for name, fn in candidates:
        with torch.no_grad():
            ms = time_ms(fn, device, warmup=warmup, iters=iters)
            extra = peak_extra_memory_bytes(fn, device)
        chain_ms = chain_ms or ms  # the chain is measured first
        if name == chain[0] and rows_of == "compile":
            continue  # measured for the ratio only: the main pass appended it
        tflops = flops / (ms * 1e-3) / 1e12
        yield {"shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "impl": name,
               "ms": ms, "TFLOP/s": tflops, "% peak": 100.0 * tflops / peak_tflops,
               "extra GiB": extra / 2**30, "x chain": ms / chain_ms,
               "rel err": rel_err.get(name, float("nan")), "GFLOP": flops / 1e9}


if __name__ == "__main__":
    sys.exit(main())
