#!/usr/bin/env bash
# The whole pipeline on the embedded default, on a fresh machine: install, prepare the shards (Shakespeare and the
# Python standard library's modules) for the SmolLM2-135M teacher, stage 1 (align -> distill -> boundary; the byte
# head gets the teacher's prior and h the subword embedding, both defaults), stage 2 (decoder warm-up -> end to
# end), the fidelity benchmark on held-out Hamlet, held-out argparse.py and the Python reference topics (the first
# 2,000 bytes of each, in windows of 256 tokens, by the byte marginal over patchings), generation speed, the
# retention table on the first 20 items of each local task (a subset: eval.py --tasks=blm_retention without --limit
# runs them all), chat on 20 held-out prompts (bench/chat.py), samples from the byte model next to the teacher's and
# a question asked in the chat template, a closing table and PNG plots. Stage 1 mixes the teacher's own answers to
# prompts about the corpus (data.py --chat) into a quarter of its batches' rows, and stage 2 inherits that. Budgets
# are cut to fit about 20 minutes on 2 cores (docs/results.md has the measured time); every step prints progress.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
OUT=${OUT:-out}
PROMPT="HAMLET. To be, or not to be, that is the question:"
$PY data.py --teacher=smollm2
$PY data.py --teacher=smollm2 --chat  # the teacher's answers to 360 prompts about the corpus, in its chat template
$PY stage1_kd.py --out_dir=$OUT/stage1 --align_bytes=800000 --distill_bytes=49152 --boundary_bytes=250000 \
    --chat_data=shards/smollm2-chat "$@"
$PY stage2_sft.py --init=$OUT/stage1 --out_dir=$OUT/stage2 --warmup_bytes=150000
$PY bench/fidelity.py --ckpt=$OUT/stage2 --max_bytes=2000 --window=256 --greedy=False --json=$OUT/fidelity.json
$PY bench/generate.py --ckpt=$OUT/stage2 --batch_sizes=1 --new_bytes=128 --json=$OUT/generate.json
$PY eval.py --compare --ckpt=$OUT/stage2 --tasks=blm_retention --limit=20 --batch_size=64 --json=$OUT/eval.json
$PY bench/chat.py --ckpt=$OUT/stage2 --n=20 --json=$OUT/chat.json
echo; echo "== the byte student:"
$PY sample.py --ckpt=$OUT/stage2 --prompt="$PROMPT" --max_bytes=200 --seed=1
echo; echo "== the teacher (tokens):"
$PY sample.py --teacher=smollm2 --prompt="$PROMPT" --max_bytes=200 --seed=1
echo; echo "== a question, in the chat template (the byte student, then the teacher):"
$PY sample.py --ckpt=$OUT/stage2 --chat --prompt="What is the capital of France?" --temperature=0 --dtype=float32
$PY sample.py --teacher=smollm2 --chat --prompt="What is the capital of France?" --temperature=0 --dtype=float32
$PY bench/summary.py --out=$OUT
$PY bench/plot.py --out=$OUT  # training curves and the fidelity decomposition as PNGs; prints their paths
