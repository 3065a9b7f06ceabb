#!/usr/bin/env bash
# Create .venv with vnpd, its test dependencies and Ray on a CPU machine.
# torch is pinned to the local CPU build: an unpinned torch would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$candidate; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c 'import torch' >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==${VNPD_TORCH_VERSION:-2.13.0}"
fi
# ray: the Ray backend's tests (tests/workers/test_ray_pool.py) run in CI too.
python -m pip install -q -e '.[test,ray]'
# The unit tests of systemd/vnpd.service need systemd-analyze (Debian's systemd package).
# Best effort: without root or apt those tests skip and say why.
if ! command -v systemd-analyze >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; } \
    >/dev/null 2>&1 || echo "setup: could not install systemd; the unit tests will skip" >&2
fi
