"""Outputs of the commands: claimed before any work, written under a temporary name, renamed when complete.

Every writing command calls a ``claim_*`` function first (so that an output it may not write fails in a
second, not after the reconstruction) and writes through :func:`write_output_volume` or
:func:`~vemamba_iso.data.atomic.atomic_path` (so that an error or a signal never leaves a partial file
under the output's name, nor a temporary beside it).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.atomic import check_writable
from ..data.io import file_format, split_key, write_volume


def claim_volume_output(path: str, overwrite: bool, key: str | None = None, flag: str = "--output") -> Path:
    """Check a volume output before any work: known format, writable location, not there unless ``overwrite``."""
    file_path, _ = split_key(path, key)
    file_format(file_path)
    return check_writable(file_path, overwrite, flag)


def claim_file_output(path: str | None, overwrite: bool, flag: str) -> Path | None:
    """Check a plain output file (a report, a figure) before any work; None stays None."""
    return None if path is None else check_writable(path, overwrite, flag)


def write_output_volume(path: str, data, voxel_size, key: str | None, overwrite: bool) -> Path:
    """Write a volume output atomically; an output that appeared meanwhile is replaced only with ``overwrite``."""
    return write_volume(path, data, voxel_size, key=key, overwrite=overwrite)


def model_dir_files() -> set[str]:
    """The names a training run writes in its model folder."""
    from ..training.checkpoint import METADATA_FILE, MODEL_FILE, RESUME_FILE
    return {MODEL_FILE, METADATA_FILE, RESUME_FILE}


def claim_model_dir(path: str, overwrite: bool, restart: bool) -> Path:
    """Check a training ``--output`` folder before any work.

    A new folder, or one holding only our files (model, metadata, the checkpoint to resume from), is ours;
    anything else in it needs ``--overwrite`` (which replaces our files and leaves the others alone). A
    finished model with no checkpoint to resume from is replaced only with ``--overwrite`` or ``--restart``.
    Temporaries of a run killed while it saved (SIGKILL gives no chance to delete them) are removed.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output {folder} is a file; training writes a model folder: choose another "
                                 "--output")
    if not folder.exists():
        check_writable(folder, overwrite=False)
        return folder
    from ..training.checkpoint import MODEL_FILE, RESUME_FILE
    ours = model_dir_files()
    stale = [n for n in os.listdir(folder) if any(n.startswith(f".{name}.") for name in ours)]
    others = sorted(n for n in os.listdir(folder) if n not in ours and n not in stale)
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FileExistsError(f"--output {folder} holds files that are not vemamba_iso checkpoints ({shown}); "
                              "choose a new or empty folder, or pass --overwrite to write the model there anyway")
    if (folder / MODEL_FILE).exists() and not (folder / RESUME_FILE).exists() and not (overwrite or restart):
        raise FileExistsError(f"--output {folder} holds a finished model without a checkpoint to resume from; "
                              "pass --overwrite to replace it, or choose another --output")
    check_writable(folder / MODEL_FILE, overwrite=True)
    for name in stale:
        os.remove(folder / name)
    return folder

