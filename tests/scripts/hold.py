"""Open a run (taking its lock), say so on stdout, and hold it until stdin closes or a kill.

python hold.py RUN
"""

from __future__ import annotations

import sys

import jorb

run = jorb.Run.open(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()
run.close()
