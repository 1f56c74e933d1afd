#!/bin/sh
# The GPU check (benchmarks/gpu_check.py) from the repository root, with the project's venv if there is one.
cd "$(dirname "$0")/.." && exec "${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}" benchmarks/gpu_check.py "$@"
