#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole job end to end on local registries and a local release
# server: list -> mirror into a Harbor look-alike -> mirror --dry-run -> no-op rerun -> registries.yaml
# -> verify -> save/inspect/load. Every command is printed as you would type it, before its output.
# No internet needed. Extra arguments go to the demo: --help; --keep keeps its work directory and, on a
# terminal, the local registries until Enter (so the printed commands can be run again).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m rke2_mirror_testkit.demo "$@"
