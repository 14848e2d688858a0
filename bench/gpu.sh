#!/usr/bin/env bash
# The prepared GPU check (bench/gpu.py): `bench/gpu.sh` on a CUDA machine, `bench/gpu.sh --dry-run` anywhere.
# Uses the project's .venv when there is one (make setup), else the machine's python3 (a bare GPU image).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" bench/gpu.py "$@"
