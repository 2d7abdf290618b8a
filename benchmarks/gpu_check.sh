#!/usr/bin/env bash
# One GPU session: install (building flowkern._C), run the cuda-marked tests, run every benchmark.
# Usage (on the GPU machine, repo root):  bash benchmarks/gpu_check.sh
#
# The whole script keeps within FLOWKERN_GPU_BUDGET_S seconds (default 540, inside the device tool's 600 s
# per command): each step gets its own cap or what is left of the budget, whichever is less, and a step
# that no longer fits is skipped and reported. The expected total is under 5 minutes; the last line of the
# log says how long it took. Steps run cheapest-first, so a short budget still yields the tests and the
# shaping figures. Last, whatever the budget, benchmarks/targets.py judges the newest figures against the
# issues' targets (benchmarks/results/targets.md, a few seconds on the CPU). flowkern._C is built for sm_90 only here (FLOWKERN_CUDA_ARCHS; CI builds 8.0 and 9.0).
# Results are appended under benchmarks/results/; when $OUT is set, they and a full log (gpu_check.log,
# the cuda tests' junit XML) are copied there after every step, so a run cut short still returns them.
set -uo pipefail
export PYTHONUNBUFFERED=1
budget=${FLOWKERN_GPU_BUDGET_S:-540}
out=${OUT:-}
log=${out:+$out/gpu_check.log}
status=0

say() { echo "$*" | tee -a "${log:-/dev/null}"; }

collect() {
    [ -n "$out" ] && cp benchmarks/results/*.csv "$out"/ 2>/dev/null
    return 0
}

# step NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, budget left), logging its output and time.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((budget - SECONDS))
    if ((left < 15)); then
        say "=== $name: SKIPPED, ${left}s of the ${budget}s budget left"
        status=1
        return
    fi
    local limit=$((cap < left ? cap : left)) began=$SECONDS rc
    say "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee -a "${log:-/dev/null}"
    rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc after $((SECONDS - began))s$([ "$rc" = 124 ] && echo ' (timed out)')"
    ((rc != 0)) && status=1
    collect
}

step install 150 env FLOWKERN_BUILD_CUDA=1 FLOWKERN_CUDA_ARCHS="${FLOWKERN_CUDA_ARCHS:-9.0}" pip install -e . --no-build-isolation --no-deps -q
step versions 30 python -c "import flowkern, flowkern._C, torch, triton; \
print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
step cuda-tests 150 python -m pytest -q -m cuda tests -p no:cacheprovider ${out:+--junitxml=$out/cuda_tests.xml}
step bench-shaping 60 python benchmarks/bench_shaping.py --device cuda
step bench-scores 180 python benchmarks/bench_scores.py --device cuda
step bench-train 180 python benchmarks/bench_train.py --device cuda
python benchmarks/targets.py 2>&1 | tee -a "${log:-/dev/null}"
[ -n "$out" ] && cp benchmarks/results/targets.md "$out"/ 2>/dev/null
say "=== gpu_check: exit $status after ${SECONDS}s"
exit $status
