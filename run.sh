#!/usr/bin/env bash
# geocap set-up and entry point. On a fresh machine:
#   ./run.sh          installs everything into .venv (first run only) and runs the demo
#   ./run.sh test     installs likewise and runs the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
# reinstall when the dependency list changes
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build here
    "$py" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi

command="${1:-demo}"
[ $# -gt 0 ] && shift
case "$command" in
    demo) exec "$venv/bin/geocap" demo "$@" ;;
    test) exec "$py" -m pytest tests "$@" ;;
    *) echo "usage: ./run.sh [demo|test] [args...]" >&2; exit 2 ;;
esac
