#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The paper runs of issue 19 that a CPU session cannot finish, as one script for a GPU machine lent for about
# 10 minutes (each part under `timeout`; every record is written atomically as it comes, so a part cut short still
# leaves what it measured):
#
#   1. [1, Table 1] at width 500, 10 and 100 epochs, M = 1000 and 100, on CUDA        timeout TABLE1_TIMEOUT (300 s)
#   2. [1, Fig. 1a]: the widths × methods grid, GPU_FIG1A_JOBS cells at a time        timeout FIG1A_TIMEOUT (240 s)
#
# Records go to OUT_DIR (default benchmarks/results), run folders to OUT_DIR/runs, each part's output to the
# terminal and OUT_DIR/gpu_reproduce-<part>.log. Without CUDA it says so and exits 0. Exit status: 0 if every part
# finished, 1 if one failed or ran out of time.
#
# Usage: MNIST=path/to/mnist bash benchmarks/gpu_reproduce.sh [OUT_DIR]   (default MNIST: $PYRO_VDROP_MNIST_DIR)

set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
PY=${PYTHON:-python}
MNIST=${MNIST:-${PYRO_VDROP_MNIST_DIR:-}}
TABLE1_TIMEOUT=${TABLE1_TIMEOUT:-300}
FIG1A_TIMEOUT=${FIG1A_TIMEOUT:-240}
FIG1A_EPOCHS=${GPU_FIG1A_EPOCHS:-20}
FIG1A_JOBS=${GPU_FIG1A_JOBS:-10}

if [ -z "$MNIST" ]; then
    echo "gpu_reproduce: set MNIST or PYRO_VDROP_MNIST_DIR to the MNIST folder" >&2
    exit 2
fi
SCRIPT=gpu_reproduce
# shellcheck source=benchmarks/gpu_common.sh
. benchmarks/gpu_common.sh
require_cuda
mkdir -p "$OUT_DIR/runs"

run_part table1 "$TABLE1_TIMEOUT" "$PY" -m benchmarks.table1 --width 500 --epochs 10 100 --device cuda \
    --data-dir "$MNIST" --run-dir "$OUT_DIR/runs/table1-w500" --out "$OUT_DIR/table1-w500-cuda.json"
run_part fig1a "$FIG1A_TIMEOUT" "$PY" -m benchmarks.fig1a --widths 100 500 1000 1250 --epochs "$FIG1A_EPOCHS" \
    --device cuda --jobs "$FIG1A_JOBS" --no-progress --data-dir "$MNIST" --results "$OUT_DIR" \
    --run-root "$OUT_DIR/runs"
exit "$status"
