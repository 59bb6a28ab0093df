"""A crash-safe record of finished blocks, so a killed run resumes where it stopped.

One empty marker file per finished block, created by an atomic rename *after* the block's data is
stored: a block whose write was interrupted has no marker and is simply done again. The run's
parameters are stored next to the markers; resuming with different parameters is refused.
"""
from __future__ import annotations

import json
import os
import shutil


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename (never a partial file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BlockJournal:
    """Markers of finished blocks in ``directory`` for a run described by ``params`` (JSON-able)."""

    PARAMS = "params.json"

    def __init__(self, directory: str, params: dict):
        self.directory = directory
        self.params = json.loads(json.dumps(params))
        path = os.path.join(directory, self.PARAMS)
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            if previous != self.params:
                changed = sorted(k for k in set(previous) | set(self.params) if previous.get(k) != self.params.get(k))
                hint = (" (runs before 2026-12-05 ignored --output-key for Zarr: drop it to resume such a run)"
                        if changed == ["array"] and "array" not in previous else "")
                raise ValueError(f"an unfinished run with different parameters ({', '.join(changed)}) is recorded in "
                                 f"{directory}; repeat the same command to resume it, or pass --overwrite to start "
                                 f"over{hint}")
        else:
            os.makedirs(directory, exist_ok=True)
            write_atomic(path, json.dumps(self.params, indent=1, sort_keys=True).encode())

    def done(self) -> set[str]:
        return {n[:-5] for n in os.listdir(self.directory) if n.endswith(".done")}

    def mark(self, name: str) -> None:
        write_atomic(os.path.join(self.directory, f"{name}.done"), b"")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
