#!/usr/bin/env bash
# Install what rke2-mirror, its tests and its demo need on a fresh Debian machine (idempotent).
# System packages: docker-registry (CNCF distribution, the tests' real registries), skopeo (cross-checks,
# benchmarks), zstd, bzip2 and lz4 (the tests compress docker archives with the real tools), containerd
# (the tests import node tarballs with a private containerd and ctr; the system service is not used).
# Python: a venv in .venv with the package installed editable, with the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
command -v bzip2 >/dev/null 2>&1 || need_apt+=(bzip2)
command -v lz4 >/dev/null 2>&1 || need_apt+=(lz4)
command -v containerd >/dev/null 2>&1 || need_apt+=(containerd)   # ctr images import of node tarballs (tests)
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_apt+=(python3-venv)   # Debian splits venv/ensurepip out of python3
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "setup: installing ${need_apt[*]} (apt)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: rke2-mirror needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
