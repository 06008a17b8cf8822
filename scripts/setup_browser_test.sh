#!/usr/bin/env bash
# Install what the end-to-end browser test needs, idempotently (safe to run again; CI runs it every time):
#   * Chromium from the Debian packages (/usr/bin/chromium) -- never a browser download by Playwright;
#   * the Python Playwright package (it ships its own node driver) into the kit's venv.
# Usage: scripts/setup_browser_test.sh            (needs root or sudo for apt, and a pip index)
# Env:   VENV (default: .venv of the kit). Playwright is pyproject.toml's optional extra [browser], at the
#        version constraints.txt pins (the exact tested set).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [[ ! -x "$PY" ]]; then
    echo "No Python venv at $VENV: create it first (make venv), or set VENV=/path/to/venv." >&2
    exit 1
fi

if [[ -x /usr/bin/chromium ]]; then
    echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
else
    if ! command -v apt-get >/dev/null; then
        echo "No /usr/bin/chromium and no apt-get: install Chromium at /usr/bin/chromium by hand (Debian/Ubuntu: apt-get install chromium)." >&2
        exit 1
    fi
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || { echo "apt-get needs root: run this script as root or install sudo." >&2; exit 1; }
        SUDO="sudo"
    fi
    echo "chromium: installing the Debian package"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
    /usr/bin/chromium --version
fi

PLAYWRIGHT_SPEC="$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import sys, tomllib
extra = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["browser"]
print(next(r for r in extra if r.replace(" ", "").lower().startswith("playwright")))
PYEOF
)"
# pip does not contact the index when the pinned version is already installed.
echo "playwright: $PLAYWRIGHT_SPEC (pinned by constraints.txt) into $VENV"
"$PY" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" "$PLAYWRIGHT_SPEC"
# Never `playwright install`: the test launches the Debian Chromium (executable_path=/usr/bin/chromium).
"$PY" -c "import importlib.metadata as m; print('playwright', m.version('playwright'), 'OK')"
