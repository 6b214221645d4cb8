"""Try to open a run from a second process; print the error class and message, exit 1 on error.

python open_run.py RUN
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import jorb

faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)  # (harness.py: a hang)
try:
    jorb.Run.open(sys.argv[1]).close()
except jorb.JorbError as e:
    print(f"{type(e).__name__}: {e}", flush=True)
    sys.exit(1)
print("opened", flush=True)
