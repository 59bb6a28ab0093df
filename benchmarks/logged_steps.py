"""One step of an evaluation driver: a command, echoed, its output appended to the driver's log."""
from __future__ import annotations

import subprocess
import sys
import time


def run(cmd: list[str], env: dict, log) -> float:
    """Run ``cmd`` with ``env``, stdout and stderr to the open file ``log``; its wall time in seconds.
    A failing step ends the driver with the command and the log to read."""
    print("+", " ".join(cmd), flush=True)
    log.write("+ " + " ".join(cmd) + "\n")
    log.flush()
    t0 = time.time()
    result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"step failed (exit {result.returncode}): {' '.join(cmd)}; see {log.name}")
    return time.time() - t0
