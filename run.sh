#!/usr/bin/env bash
# One entry point for a fresh machine (Python >= 3.10 and pip only):
#   bash run.sh demo [args]   set up .venv on first use, then run `commit-mllm demo`
#   bash run.sh test [args]   set up .venv on first use, then run the default test suite
#   bash run.sh setup         only set up .venv
# torch is pinned and installed first, and kept pinned by a constraints file, so no
# CUDA wheels are pulled on a CPU machine. Set COMMIT_TORCH to pin another version.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${COMMIT_VENV:-.venv}"
TORCH="${COMMIT_TORCH:-2.13.0}"
PY="${PYTHON:-python3}"

setup() {
  local started=$SECONDS
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: setting up $VENV (first run, 1-2 min: CPU torch $TORCH, then the package)..." >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  local constraints="$VENV/constraints.txt"
  echo "torch==$TORCH" > "$constraints"
  local stamp="$VENV/.installed"
  local want
  want="$(cat pyproject.toml "$constraints" | cksum)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -f "$stamp" ] && echo "run.sh: pyproject.toml changed; updating $VENV (1-2 min)..." >&2
    "$VENV/bin/python" -m pip install -q "torch==$TORCH"
    "$VENV/bin/python" -m pip install -q -c "$constraints" -e ".[dev]"
    echo "$want" > "$stamp"
    echo "run.sh: $VENV ready ($((SECONDS - started)) s)" >&2
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/commit-mllm" demo "$@" ;;
  test) setup; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
