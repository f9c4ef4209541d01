#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite against real local registries.
# Extra arguments go to pytest, e.g. scripts/test.sh -k mirror -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
