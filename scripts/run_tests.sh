#!/usr/bin/env bash
# The project's test command (README): set up the environment, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q tests "$@"
