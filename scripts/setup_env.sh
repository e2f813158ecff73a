#!/usr/bin/env bash
# Create (or reuse) .venv and install the project for CPU use: the torch CPU wheel first, then the package
# with its dev extras under constraints.txt so that nothing can swap torch for the CUDA build.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  # The CPU wheel of 2.13.0 is the only build pip may take; --only-binary keeps it from compiling anything.
  python -m pip install -q --only-binary=:all: "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python - <<'PY'
import torch, megatron.core
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
print(f"environment ready: torch {torch.__version__} | megatron-core {megatron.core.__version__}")
PY
