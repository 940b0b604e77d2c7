# SPDX-License-Identifier: Apache-2.0
#
# Shared by gpu_check.sh and gpu_reproduce.sh (sourced, not run): the CUDA check and a timed part whose output goes
# to the terminal and to OUT_DIR/<SCRIPT>-<part>.log. The sourcing script sets SCRIPT, PY and OUT_DIR, and reads
# `status` (0 until a part fails or runs out of time).

status=0

require_cuda() {  # exits 0 with the reason when torch sees no CUDA device
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "$SCRIPT: skipped: CUDA is not available here (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
        exit 0
    fi
    mkdir -p "$OUT_DIR"
    "$PY" -c "import torch; print('$SCRIPT:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
}

run_part() {  # name, timeout in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$SCRIPT-$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "$SCRIPT: $name passed ($((SECONDS - start)) s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$SCRIPT: $name TIMED OUT after $limit s"
        status=1
    else
        echo "$SCRIPT: $name FAILED (exit $rc)"
        status=1
    fi
    return 0
}
