#!/usr/bin/env bash
# The one prepared check for a machine with a CUDA GPU (issue 7):
#   1. tests/test_losses.py with the compiled Triton kernels (TRITON_INTERPRET unset),
#   2. bench/losses.py --json (byte-loss ms/memory vs eager and torch.compile; chunked vs plain KL memory),
#   3. a few bf16 training steps of each stage script that exists,
#   4. one step of every phase at the paper's per-rank shape (bench/gpu_step.py: peak memory, bytes/s, utilisation).
# Usage, from anywhere:  bash bench/gpu_check.sh [OUT_DIR]
# OUT_DIR defaults to $OUT (set on the lent device machine) or out/gpu_check. It receives gpu_check.log,
# losses.json and gpu_step.json. Every step runs even if an earlier one fails; the exit status is non-zero if any step failed.
# PYTHON=... picks the interpreter; otherwise the first of .venv/bin/python, python3 whose torch sees CUDA.
# GPU_CHECK_ALLOW_CPU=1 runs the same steps on a CPU machine (to check this script's plumbing, nothing more).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-out/gpu_check}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter (conftest only sets it when CUDA is absent)

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then  # the first interpreter whose torch sees a GPU; else the venv's (for the message below)
    for candidate in .venv/bin/python python3; do
        if has_cuda "$candidate"; then PY="$candidate"; break; fi
    done
    [ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
fi
if ! has_cuda "$PY" && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_check: $PY has no CUDA device (torch.cuda.is_available() is False); set PYTHON=... or run on a GPU" >&2
    exit 2
fi

failed=()
step() {  # step NAME COMMAND...: run, log, remember a failure, keep going
    local name="$1"; shift
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    if "$@" 2>&1 | tee -a "$LOG"; then
        echo "=== $name: ok ($((SECONDS - start)) s)" | tee -a "$LOG"
    else
        echo "=== $name: FAILED ($((SECONDS - start)) s)" | tee -a "$LOG"
        failed+=("$name")
    fi
}

step environment "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
step kernel-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_losses.py
step kernel-bench "$PY" bench/losses.py --json="$OUT_DIR/losses.json"

# ==== 3. A few bf16 training steps of each stage (embedded teacher, a handful of steps, output under OUT_DIR) ======
# The shards and the converted teacher are prepared by the stage script itself if missing (needs setup.sh's packages).
step stage1-steps "$PY" stage1_kd.py --dtype=bfloat16 --device=cuda --out_dir="$OUT_DIR/stage1" --batch_size=8 \
    --seq_len=1024 --align_bytes=163840 --distill_bytes=81920 --boundary_bytes=81920 --eval_batches=2 --log_interval=5
step stage2-steps "$PY" stage2_sft.py --dtype=bfloat16 --device=cuda --init="$OUT_DIR/stage1" \
    --out_dir="$OUT_DIR/stage2" --batch_size=8 --seq_len=1024 --warmup_bytes=81920 --e2e_bytes=81920 --eval_batches=2 \
    --log_interval=5

# ==== 4. One step per phase at the paper's per-rank shape (32 x 8192 bytes) on a random OLMo-2-1B-shape student ====
# Peak memory, bytes/s and model FLOP utilisation per phase, with --checkpoint_blocks (bench/gpu_step.py; ~2 min).
step paper-scale-steps "$PY" bench/gpu_step.py --json="$OUT_DIR/gpu_step.json"

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED steps: ${failed[*]} (log: $LOG)" | tee -a "$LOG"
    exit 1
fi
echo "gpu_check: all steps passed (log: $LOG, figures: $OUT_DIR/losses.json)" | tee -a "$LOG"
