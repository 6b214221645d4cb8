"""Open a run (taking its lock), say so on stdout, and hold it until stdin closes or a kill.

python hold.py RUN
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import jorb

faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)  # (harness.py: a hang)
run = jorb.Run.open(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()
run.close()
