#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The GPU check of issue 18, item 5, as one script that fits a 10-minute budget (about 9 minutes of timeouts):
#
#   1. the CUDA-parametrised tests (tests/conftest.py adds "cuda" to the `device` fixture when CUDA is
#      available; `pytest -k cuda` selects those ids)                                         timeout 120 s
#   2. a quick smoke run of the suite on CUDA (fails fast before the long run)                 timeout  60 s
#   3. the suite, `python -m benchmarks.run --device cuda`: suite_step-cuda.json and
#      suite_scaling-cuda.json in OUT_DIR                                                       timeout 360 s
#
# Without CUDA it prints why and exits 0 (nothing to check). Exit status: 0 if every part passed (or was skipped),
# else 1. Each part's output goes to OUT_DIR/gpu_check-<part>.log as well as to the terminal.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]      (default benchmarks/results; PYTHON=... picks the interpreter)

set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
PY=${PYTHON:-python}
TESTS_TIMEOUT=${GPU_CHECK_TESTS_TIMEOUT:-120}
SMOKE_TIMEOUT=${GPU_CHECK_SMOKE_TIMEOUT:-60}
SUITE_TIMEOUT=${GPU_CHECK_SUITE_TIMEOUT:-360}

SCRIPT=gpu_check
# shellcheck source=benchmarks/gpu_common.sh
. benchmarks/gpu_common.sh
require_cuda

run_part tests "$TESTS_TIMEOUT" env OMP_NUM_THREADS=1 "$PY" -m pytest tests -q -p no:cacheprovider -k cuda
run_part smoke "$SMOKE_TIMEOUT" "$PY" -m benchmarks.run --device cuda --quick \
    --only linear512,deterministic,torch_lrt,pyro_vdrop_lrt --out "$OUT_DIR/gpu_check-quick"
if [ "$status" -eq 0 ]; then
    run_part suite "$SUITE_TIMEOUT" "$PY" -m benchmarks.run --device cuda --out "$OUT_DIR"
else
    echo "gpu_check: suite not run (an earlier part failed)"
fi
exit "$status"
