#!/usr/bin/env bash
# Installs the pinned OHIF viewer build (npm package @ohif/app, dist/ only; no Node build) for OpenPACS.
# Idempotent and quick when already installed. Same as `openpacs install-viewer`.
# Usage: scripts/install_ohif.sh [DEST] [--force] [--prefix /ohif/] [--tarball app.tgz]
#   DEST defaults to $OPENPACS_OHIF_DIR, else ~/.cache/openpacs/ohif/<version> (found by `openpacs serve` from any
#   data directory); <data-dir>/ohif is also looked up by the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m openpacs.web.viewer "$@"
