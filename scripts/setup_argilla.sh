#!/usr/bin/env bash
# Idempotent setup for human review in Argilla (issue 6):
#   - .venv-argilla: argilla-server 2.8.0 in its own venv (it conflicts with the main venv's pins)
#   - redis-server and chromium from Debian when missing (apt-get update once first)
#   - playwright (Python package; its bundled node driver drives Debian's chromium) in .venv
# A stamp file records the hash of this script; re-running is a quick no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# pyproject.toml too: the package (its folder mapping) is installed into .venv-argilla below.
stamp_src=$(cat scripts/setup_argilla.sh pyproject.toml | sha256sum | cut -c1-16)
stamp=.venv-argilla/.stepwise-argilla-setup-$stamp_src

# Installed-package checks read metadata only: importing argilla_server builds the whole app.
have_pkgs() { "$1" - "${@:2}" <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
for name in sys.argv[1:]:
    m.version(name)
PYEOF
}
have_apt_pkgs() { command -v redis-server >/dev/null 2>&1 && [ -x /usr/bin/chromium ]; }

if [ -f "$stamp" ] && have_apt_pkgs && have_pkgs .venv-argilla/bin/python argilla-server pytest orjson stepwise \
  && { [ ! -x .venv/bin/python ] || have_pkgs .venv/bin/python playwright; }; then
  exit 0
fi

if ! have_apt_pkgs; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "[setup-argilla] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's package may start a redis service where an init system runs; we run our own.
fi

if ! have_pkgs .venv-argilla/bin/python argilla-server pytest orjson; then
  echo "[setup-argilla] creating .venv-argilla with $($PY --version)"
  [ -x .venv-argilla/bin/python ] || "$PY" -m venv .venv-argilla
  .venv-argilla/bin/python -m pip install -q --upgrade pip
  .venv-argilla/bin/pip install -q argilla-server==2.8.0 argilla==2.8.0 "click<8.2" "huggingface-hub<1.0" "datasets<4" "orjson>=3.9" \
    pytest 2>&1 | grep -v "^WARNING: Location" || true
fi

# The server imports its plugin modules as `stepwise.argilla_embedded.*`: install the package here
# too, editable and without dependencies (its __init__ and those modules need none of the main
# venv's libraries). Re-run whenever the stamp is stale, as the folder mapping may have changed.
echo "[setup-argilla] installing stepwise (editable, --no-deps) into .venv-argilla"
out=$(.venv-argilla/bin/pip install -q --no-deps -e . 2>&1) || { echo "$out" >&2; exit 1; }
.venv-argilla/bin/python -c "import importlib.util as u; assert u.find_spec('stepwise.argilla_embedded.asgi')" \
  || { echo "[setup-argilla] error: .venv-argilla cannot import stepwise.argilla_embedded" >&2; exit 1; }

# Browser tests drive Debian's chromium with Playwright's Python package (never `playwright install`).
if [ -x .venv/bin/python ] && ! have_pkgs .venv/bin/python playwright; then
  echo "[setup-argilla] installing playwright into .venv (driver only; browser is /usr/bin/chromium)"
  .venv/bin/pip install -q playwright 2>&1 | grep -v "^WARNING: Location" || true
fi

rm -f .venv-argilla/.stepwise-argilla-setup-*
touch "$stamp"
echo "[setup-argilla] ready: .venv-argilla ($(.venv-argilla/bin/python -c 'import importlib.metadata as m; print(m.version("argilla-server"))')), $(redis-server --version | cut -d' ' -f1-3), $(/usr/bin/chromium --version 2>/dev/null | head -1)"
