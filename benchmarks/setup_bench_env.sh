#!/usr/bin/env bash
# Create the benchmark environment .venv-bench: diffdask plus the peers it is measured against
# (LiberTEM, pyFAI). The peers never enter the main environment.
#
# Usage: bash benchmarks/setup_bench_env.sh [VENV_DIR]   (default: .venv-bench at the repo root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-bench}"
python="${PYTHON:-python3.11}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip
# torch first and pinned: the CPU wheel satisfies diffdask's torch requirement, so pip does
# not pull a CUDA build (gigabytes) when resolving the rest.
"$venv/bin/python" -m pip install "torch==2.13.0"
"$venv/bin/python" -m pip install -e "$root[test]" libertem pyFAI
"$venv/bin/python" -c "import libertem, pyFAI, diffdask; print('bench env ready:', libertem.__version__, pyFAI.version, diffdask.__file__)"
