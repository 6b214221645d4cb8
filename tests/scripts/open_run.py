"""Try to open a run from a second process; print the error class and message, exit 1 on error.

python open_run.py RUN
"""

from __future__ import annotations

import sys

import jorb

try:
    jorb.Run.open(sys.argv[1]).close()
except jorb.JorbError as e:
    print(f"{type(e).__name__}: {e}", flush=True)
    sys.exit(1)
print("opened", flush=True)
