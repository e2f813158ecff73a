#!/usr/bin/env bash
# Create (or reuse) .venv and install the project for CPU use: the torch CPU wheel first, then the package
# with its dev extras under constraints.txt so that nothing can swap torch for the CUDA build.
# Idempotent: a second run only checks that everything is in place. Any failed install fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate

# pip, quiet, with its output shown only on failure (and then in full), exiting on any error.
pip_install() {
  local log
  log=$(mktemp)
  if ! python -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: 'pip install $*' failed (pip's output above); the environment is NOT ready" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}

pip_install --upgrade pip
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  # The CPU wheel of 2.13.0 is the only build pip may take; --only-binary keeps it from compiling anything.
  pip_install --only-binary=:all: "torch==2.13.0"
fi
pip_install -c constraints.txt -e ".[dev]"
python - <<'PY'
import torch, megatron.core, math_verify  # noqa: F401
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert not torch.version.cuda, f"a CUDA build of torch was installed ({torch.version.cuda}) on a CPU machine"
print(f"environment ready: torch {torch.__version__} | megatron-core {megatron.core.__version__}")
PY
[ "${OFFGRPO_SKIP_VLLM:-0}" = 1 ] || bash scripts/setup_vllm.sh  # vLLM in its own venv (.venv-vllm) for the generation engine; OFFGRPO_SKIP_VLLM=1 skips it (the tiny demo model runs on HF)
