#!/usr/bin/env bash
# The whole pipeline on the embedded default, on a fresh machine: install, prepare the Shakespeare shards for the
# SmolLM2-135M teacher, stage 1 (align -> distill -> boundary; the byte head gets the teacher's prior, the default),
# stage 2 (decoder warm-up -> end to end), the fidelity benchmark on held-out Hamlet and the Python reference
# topics (first 10,000 bytes of each), generation speed, samples from the byte model next to the teacher's, a closing
# table and PNG plots. Measured from a fresh clone on a quiet 2-core AVX2 machine: 49 minutes (stage 1 13, stage 2
# 12, the fidelity step's byte-by-byte scoring about 18); over the 30 it should take. Every step prints progress lines.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
OUT=${OUT:-out}
PROMPT="HAMLET. To be, or not to be, that is the question:"
$PY data.py --teacher=smollm2
$PY stage1_kd.py --out_dir=$OUT/stage1 "$@"
$PY stage2_sft.py --init=$OUT/stage1 --out_dir=$OUT/stage2 --warmup_bytes=300000
$PY bench/fidelity.py --ckpt=$OUT/stage2 --max_bytes=10000 --json=$OUT/fidelity.json
$PY bench/generate.py --ckpt=$OUT/stage2 --batch_sizes=1 --new_bytes=128 --json=$OUT/generate.json
echo; echo "== the byte student:"
$PY sample.py --ckpt=$OUT/stage2 --prompt="$PROMPT" --max_bytes=200 --seed=1
echo; echo "== the teacher (tokens):"
$PY sample.py --teacher=smollm2 --prompt="$PROMPT" --max_bytes=200 --seed=1
$PY bench/summary.py --out=$OUT
$PY bench/plot.py --out=$OUT  # training curves and the fidelity decomposition as PNGs; prints their paths
