#!/usr/bin/env bash
# fedledger's task script: ./do install | demo | example NAME | test | lint | docs | compile | bench
# Everything goes into ./.venv and devnet/node_modules; nothing is installed system-wide.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

# What the last install installed: skip it while pyproject.toml and devnet's package files
# are unchanged (./do install --force reinstalls anyway).
installed_for() { cat pyproject.toml devnet/package.json devnet/package-lock.json | sha256sum | cut -d' ' -f1; }
STAMP="$VENV/.installed-for"

install() {
  if [ "${1:-}" != "--force" ] && [ -x "$VENV/bin/python" ] && [ -d devnet/node_modules ] \
    && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(installed_for)" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first and pinned: a CPU build; a looser spec would pull GBs of CUDA wheels.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
  # solc-js, OpenZeppelin and anvil, pinned in devnet/package.json (npm install, not npm ci:
  # the lockfile omits anvil's other-platform packages).
  (cd devnet && npm install --no-audit --no-fund --loglevel=error)
  installed_for > "$STAMP"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  install) install "$@" ;;
  demo) install; exec "$VENV/bin/fedledger" demo "$@" ;;
  # A consortium of separate processes on a local devnet: examples/NAME/run.sh.
  example) install; PATH="$PWD/$VENV/bin:$PATH" exec "examples/${1:?usage: ./do example NAME}/run.sh" ;;
  # One worker a core (pytest-xdist): the suite is CPU-bound Python, tests are independent.
  # worksteal: an idle worker takes tests queued for a busy one, so the longest do not end alone.
  test) install; exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@" ;;
  lint)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy" -p fedledger
    ;;
  docs) exec "$VENV/bin/python" -m fedledger.errors "$@" ;;
  compile) exec "$VENV/bin/python" -m fedledger.contracts.compile "$@" ;;
  # The ledger's Foundry fuzz and invariant tests (contracts/test/, foundry.toml); also in ./do test.
  forge) install; exec devnet/node_modules/.bin/forge test "$@" ;;
  bench) exec "$VENV/bin/python" bench/run.py "$@" ;;
  *)
    echo "usage: ./do install | demo [ARGS] | example NAME | test [PYTEST ARGS] | forge [FORGE TEST ARGS] | lint | docs [--check] | compile [--check] | bench [NAME ...] [--quick]" >&2
    exit 2
    ;;
esac
