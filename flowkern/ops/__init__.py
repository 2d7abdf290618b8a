"""Fused implementations, one module per op; importing a module registers it with `flowkern.backend`.

- `flowkern.ops.scores`   — Triton `flow_scores` (fused scoring pass);
- `flowkern.ops.scores_gemm` — the GEMM route of Triton `flow_scores` (library GEMMs + fused row passes),
  in 16 bits or fp8 (`flowkern.ops.scores_fp8`); registers the ``triton`` `flow_scores` that picks a route;
- `flowkern.ops.fm_loss`  — Triton `flow_matching_loss` (forward and backward);
- `flowkern.ops.shaping`  — CUDA `shape_rewards` / `shape_advantages` via `flowkern._C`.

A backend whose dependency is missing records why, so that asking for it
explicitly gives a clear error while ``auto`` falls back to the torch reference.
"""

from .. import backend

try:
    import triton  # noqa: F401
except ImportError as exc:
    backend.record_load_error("triton", ("flow_scores", "flow_matching_loss"), f"triton is not installed ({exc})")
else:
    from . import fm_loss, scores  # noqa: F401
    from . import scores_gemm  # noqa: F401  (after scores: registers the routed triton flow_scores)

try:
    from .. import _C  # noqa: F401
except ImportError as exc:
    backend.record_load_error("cuda", ("shape_rewards", "shape_advantages"), "the CUDA extension flowkern._C is not built (install with "
                                      f"`pip install -e . --no-build-isolation` where torch has CUDA and nvcc): {exc}")
else:
    from . import shaping  # noqa: F401
