#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, start the lab, run pytest, stop the lab if we started it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export PATH="$PWD/.venv/bin:/usr/sbin:/sbin:$PATH"
started=0
if ! crashcart lab status >/dev/null 2>&1; then
    started=1
    trap 'crashcart lab down || true' EXIT
    crashcart lab up
fi
export CRASHCART_CONFIG=/var/lib/crashcart-lab/crashcart.toml
export PREFECT_API_URL=http://127.0.0.1:4200/api
pytest -q "$@"
