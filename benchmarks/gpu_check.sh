#!/usr/bin/env bash
# One GPU window: install (building flowkern._C), versions, the cuda-marked tests, then every benchmark row.
# Usage (GPU machine, repo root):  bash benchmarks/gpu_check.sh [--with-compile] [--dry-run]
#
#   --with-compile  also run the torch.compile rows (by default they run only while time remains);
#   --dry-run       every step on CPU at toy size, without compile: checks the step order and the budget logic
#                   (tests/test_gpu_check.py runs it in CI); results go to a temporary folder; no install.
#
# Order: install, versions, cuda tests, then per benchmark the triton / eager / GEMM-chain rows (7B before
# 1.5B), shaping, and the torch.compile rows last. Every benchmark appends each CSV row as soon as it is
# measured. The whole script keeps within FLOWKERN_GPU_BUDGET_S (default 420 s, so a failed first call leaves
# room for a second inside the 15-minute window): each step runs under min(its cap, what is left) and a step
# that no longer fits is skipped and reported. The planned caps (printed first) sum to <= 420 s. Last,
# benchmarks/targets.py judges the newest figures (results/targets.md). When $OUT is set, the CSVs, targets.md,
# a full log and the cuda tests' junit XML are copied there after every step.
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
dry=0
with_compile=0
for arg in "$@"; do
    case $arg in
        --dry-run) dry=1 ;;
        --with-compile) with_compile=1 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run, --with-compile)" >&2; exit 2 ;;
    esac
done
budget=${FLOWKERN_GPU_BUDGET_S:-420}
out=${OUT:-}
log=${out:+$out/gpu_check.log}
status=0
if ((dry)); then
    device=cpu
    results=$(mktemp -d)
    export TRITON_INTERPRET=1
else
    device=cuda
    results=benchmarks/results
fi
shape() { ((dry)) && echo toy || echo "$1"; }  # the CPU benchmarks have one toy shape

say() { echo "$*" | tee -a "${log:-/dev/null}"; }

collect() {
    [ -n "$out" ] && cp "$results"/*.csv "$results"/targets.md "$out"/ 2>/dev/null
    return 0
}

# The plan: NAME CAP_S OPTIONAL(1: torch.compile, runs only with --with-compile or time left) COMMAND...
plan=()
add() { plan+=("$1|$2|$3"); }
add install 100 0
add versions 15 0
add cuda-tests 110 0
add scores-7B 50 0
add scores-1.5B 40 0
add train-7B 30 0
add train-1.5B 25 0
add shaping 25 0
add compile-scores 60 1
add compile-train 60 1
add targets 10 0
reserve=10  # kept for targets when deciding whether an optional step still fits

set_cmd() {  # the command of step $1, into the array `cmd`
    local b=benchmarks
    case $1 in
        install)
            if ((dry)); then cmd=("$PY" -m pip --version)  # the dry run installs nothing
            else cmd=(env FLOWKERN_BUILD_CUDA=1 "FLOWKERN_CUDA_ARCHS=${FLOWKERN_CUDA_ARCHS:-9.0}"
                      "$PY" -m pip install -e . --no-deps --no-build-isolation -q); fi ;;
        versions) cmd=("$PY" -c "import torch, triton, flowkern; print('torch', torch.__version__, 'triton', \
triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
$( ((dry)) || echo 'import flowkern._C')") ;;
        cuda-tests) cmd=("$PY" -m pytest -q -m cuda tests -p no:cacheprovider ${out:+--junitxml=$out/cuda_tests.xml}) ;;
        scores-*) cmd=("$PY" $b/bench_scores.py --device $device --no-compile --shapes "$(shape "${1#*-}")"
                       --csv "$results/scores.csv") ;;
        train-*) cmd=("$PY" $b/bench_train.py --device $device --no-compile --shapes "$(shape "${1#*-}")"
                      --csv "$results/train.csv") ;;
        shaping) cmd=("$PY" $b/bench_shaping.py --device $device --csv "$results/shaping.csv") ;;
        targets) cmd=("$PY" $b/targets.py --results "$results") ;;
        compile-scores) cmd=("$PY" $b/bench_scores.py --device $device --compile-only --shapes 7B 1.5B
                             --csv "$results/scores.csv") ;;
        compile-train) cmd=("$PY" $b/bench_train.py --device $device --compile-only --shapes 7B 1.5B
                            --csv "$results/train.csv") ;;
    esac
}

total=0
say "=== gpu_check plan (budget ${budget}s, device $device$( ((dry)) && echo ', dry run'))"
for entry in "${plan[@]}"; do
    IFS='|' read -r name cap optional <<<"$entry"
    if ((optional)); then
        say "    $name  cap ${cap}s (torch.compile: $( ((with_compile)) && echo 'requested' || echo 'only if time is left'))"
    else
        total=$((total + cap))
        say "    $name  cap ${cap}s"
    fi
done
say "    planned caps: ${total}s of ${budget}s"
if ((total > 420)); then
    say "=== gpu_check: the planned caps exceed 420 s"
    exit 3
fi

for entry in "${plan[@]}"; do
    IFS='|' read -r name cap optional <<<"$entry"
    left=$((budget - SECONDS))
    if ((optional && dry)); then
        say "=== $name: SKIPPED (dry run: no compile)"
        continue
    fi
    if ((optional && !with_compile && left < cap + reserve)); then
        say "=== $name: SKIPPED (${left}s left, its cap is ${cap}s; --with-compile forces it)"
        continue
    fi
    if ((left < 10)); then
        say "=== $name: SKIPPED, ${left}s of the ${budget}s budget left"
        status=1
        continue
    fi
    limit=$((cap < left ? cap : left))
    began=$SECONDS
    say "=== $name (limit ${limit}s)"
    set_cmd "$name"
    timeout "$limit" "${cmd[@]}" 2>&1 | tee -a "${log:-/dev/null}"
    rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc after $((SECONDS - began))s$([ "$rc" = 124 ] && echo ' (timed out)')"
    ((rc != 0)) && status=1
    collect
done
say "=== gpu_check: exit $status after ${SECONDS}s"
exit $status
