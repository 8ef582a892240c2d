#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/benchmarks/{rank1,training}.md, in stages:
#   bash docs/benchmarks/run_gpu.sh STAGE [STAGE ...]
#   env    device, driver and package versions
#   new    the tests of tests/test_gpu.py that no GPU has run yet (kernels.rank1_lstm with every
#          step-kernel config and its CUDA graphs, the all-members paths, the LSTM under bf16,
#          CLI training), first
#   check  the rest of tests/test_gpu.py: the rank-1 kernels with every autotune config and
#          autotuned on realistic shapes, against float64 (passed on an H100 with torch 2.11;
#          10 to 28 s per test with a cold Triton cache, mostly compiling)
#   quick  python -m kernels.bench --quick (bf16)
#   train  python -m lm.bench_train on the paper's LSTM and the Transformer (synthetic bytes):
#          the LSTM's parallel schedule fused (with and without CUDA graphs) and folded, the
#          Transformer's with its linear layers fused and folded
#   profile  the Transformer's variants under torch.profiler (top operators by device time)
#   grid1 / grid2  the bf16 rank-1 grid, in two halves of the layers (each under 10 minutes)
#   fp32   the quick grid in float32
# Logs and tables go to $OUT (default ./gpu_out). Each stage has its own time limit, so one
# that hangs does not take the rest with it.
set -uo pipefail
if [ $# -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
    sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'  # the stage list above
    exit 0
fi
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SYNTH="data.corpus=synthetic data.dir=/tmp/bench_synth data.synthetic_bytes=20000000"
RANK1_TESTS="rank1_every_config or rank1_autotuned"  # the check stage's tests; the new stage runs the others
# A per-test limit where pytest-timeout is installed (not a project dependency).
PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 100")

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

for s in "$@"; do
    case $s in
    env)
        stage env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
            python3 -c "import sys, torch, triton, accelerate; print(sys.version.split()[0], \"torch\", torch.__version__,
            \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"accelerate\", accelerate.__version__)"' ;;
    new)
        stage new 590 python3 -m pytest tests/test_gpu.py -q -rs --durations=12 $PER_TEST -k "not ($RANK1_TESTS)" ;;
    check)
        stage check 400 python3 -m pytest tests/test_gpu.py -q -rs --durations=12 $PER_TEST -k "$RANK1_TESTS" ;;
    quick)
        stage quick 300 python3 -m kernels.bench --quick --dtype bf16 --out "$OUT/rank1_quick" ;;
    train)
        stage train 280 python3 -m lm.bench_train --config configs/enwik8_lstm_late_phase.yaml --steps 10 \
            $SYNTH train.batch_size=120
        stage train 240 python3 -m lm.bench_train --config configs/enwik8_transformer_late_phase_parallel.yaml \
            --steps 20 $SYNTH ;;
    profile)
        stage profile 120 python3 -m lm.bench_train --config configs/enwik8_transformer_late_phase_parallel.yaml \
            --steps 3 --repeats 1 --warmup 3 --profile 3 $SYNTH ;;
    grid1)
        stage grid1 580 python3 -m kernels.bench --dtype bf16 --layers lstm-500 lstm-756 tf512-mlp-in \
            --out "$OUT/rank1_bf16_part1" ;;
    grid2)
        stage grid2 580 python3 -m kernels.bench --dtype bf16 --layers tf512-mlp-out tf1024-mlp-in tf1024-mlp-out \
            --out "$OUT/rank1_bf16_part2" ;;
    fp32)
        stage fp32 300 python3 -m kernels.bench --quick --dtype fp32 --out "$OUT/rank1_fp32_quick" ;;
    *)
        echo "unknown stage $s" >&2
        exit 2 ;;
    esac
done
