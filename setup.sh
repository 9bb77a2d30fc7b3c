#!/usr/bin/env bash
# Create .venv with the pinned, CPU-only dependencies. Idempotent; needs Python 3.11 and pip access
# to PyPI (torch==2.13.0 comes from the local CPU wheel where one is provided).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The library itself (neox_mlc), editable so that the rules run this checkout's code.
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import tvm, torch, snakemake; print('ready: tvm', tvm.__version__, '| torch', torch.__version__, '| snakemake', snakemake.__version__)"
