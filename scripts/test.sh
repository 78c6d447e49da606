#!/usr/bin/env bash
# Installs what the test suite needs (Debian packages, Python packages, the OHIF viewer) and runs every test.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)  # not `command -v`: pynetdicom ships a storescu too
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v chromium >/dev/null || need_apt+=(chromium)
[ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)  # the scale-out test balances three nodes with it
command -v Orthanc >/dev/null || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[test]"
.venv/bin/openpacs install-viewer

.venv/bin/ruff check src tests
.venv/bin/mypy src
export TCP_NODELAY=1
export OPENPACS_TEST_REQUIRE_ALL=1  # a missing DCMTK/Chromium/OHIF/PostgreSQL fails the tests instead of skipping them
exec .venv/bin/python -m pytest -n 2 -p no:cacheprovider "$@"
