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
           .venv/bin/python -m pip install -e '.[dev,dask,report,prometheus]'; } >.venv/install.log 2>&1; then
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
        # The report's browser test drives Debian's chromium (never a browser build of its own).
        if ! command -v chromium >/dev/null; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                echo "dev.sh: installing chromium for the report's browser test (apt-get)" >&2
                { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
                    >.venv/apt.log 2>&1 || { cat .venv/apt.log >&2; exit 1; }
            else
                echo "dev.sh: no chromium: the report's browser test is skipped (apt-get install chromium)" >&2
            fi
        fi
        .venv/bin/ruff check jorb tests examples bench
        .venv/bin/mypy
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh example | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
