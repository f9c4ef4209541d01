#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole job end to end on local registries and a local release
# server: list -> mirror into a Harbor look-alike -> no-op rerun -> registries.yaml -> verify -> save/load.
# No internet needed. Extra arguments go to the demo (--keep keeps its work directory).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m rke2_mirror_testkit.demo "$@"
