#!/usr/bin/env bash
# The project's two entry points. Both set up .venv first (Python 3.11+ and pip are all they need).
#   ./dev.sh example   run the main example (examples/migrate.py) into runs/
#   ./dev.sh test      lint, type-check and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "dev.sh: installing jorb and its dev tools into .venv (log: .venv/install.log)" >&2
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -e '.[dev,dask]'; } >.venv/install.log 2>&1; then
        cat .venv/install.log >&2
        echo "dev.sh: installation failed (log above)" >&2
        exit 1
    fi
    touch .venv/.installed
fi
case "${1:-}" in
    example)
        shift
        exec .venv/bin/python examples/migrate.py "$@"
        ;;
    test)
        shift
        .venv/bin/ruff check jorb tests examples bench
        .venv/bin/mypy
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh example | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
