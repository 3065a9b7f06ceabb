#!/usr/bin/env bash
# The test command (README): set up .venv, check the import layers, then run the whole suite.
# lint-imports exits non-zero on a broken contract (pyproject.toml, [tool.importlinter]);
# pytest exits non-zero on any failure, and with 5 when no test ran. Either fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lint-imports
exec python -m pytest -q -ra "$@"
