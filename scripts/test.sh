#!/usr/bin/env bash
# The test command (README): set up .venv, then run the whole suite.
# pytest exits non-zero on any failure, and with 5 when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -ra "$@"
