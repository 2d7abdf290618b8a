#!/usr/bin/env bash
# One GPU session: install (building flowkern._C), run the cuda-marked tests, run every benchmark.
# Usage (on the GPU machine, repo root):  bash benchmarks/gpu_check.sh
# Results are appended under benchmarks/results/ and copied to $OUT when it is set.
set -uo pipefail
export PYTHONUNBUFFERED=1
status=0
FLOWKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation --no-deps -q 2>&1 | tail -5 || status=1
python -c "import flowkern, torch; print('torch', torch.__version__, 'gpu', torch.cuda.get_device_name())"
timeout 150 python -m pytest -q -m cuda tests -p no:cacheprovider || status=1
# per-benchmark limits leave room for Triton autotuning and torch.compile at two shapes each
timeout 240 python benchmarks/bench_scores.py --device cuda || status=1
timeout 240 python benchmarks/bench_train.py --device cuda || status=1
timeout 90 python benchmarks/bench_shaping.py --device cuda || status=1
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.csv benchmarks/results/*.md "$OUT"/ 2>/dev/null; fi
exit $status
