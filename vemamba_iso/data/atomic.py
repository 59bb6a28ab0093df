"""Outputs that appear whole or not at all: written under a temporary name beside the target, then renamed.

The temporary lives in a hidden folder next to the target (same filesystem, so the rename is atomic) and
keeps the target's file name, so writers that pick the format from the extension (tifffile, SimpleITK,
matplotlib) behave as for the target. Any exception, ``KeyboardInterrupt`` included, removes it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

PARTIAL_PREFIX = ".partial-"


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file or a folder tree (a Zarr store); nothing when it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: str | os.PathLike, target: str | os.PathLike, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target``.

    Without ``overwrite`` an existing target (one that appeared while we worked) is a FileExistsError.
    With it, the old target is moved aside first and deleted only once ``tmp`` is in place, so a failure
    in between never loses both (``os.replace`` cannot replace a non-empty folder in one step).
    """
    tmp, target = Path(tmp), Path(target)
    if os.path.lexists(target):
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it, or choose another output name")
        if target.is_file() and not tmp.is_dir():
            os.replace(tmp, target)    # a file over a file: one atomic step
            return
        aside = target.with_name(f"{PARTIAL_PREFIX}old-{os.getpid()}-{target.name}")
        os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(aside, target)
            raise
        remove_path(aside)
        return
    os.replace(tmp, target)


@contextmanager
def atomic_path(target: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary path to write ``target``'s content to; it becomes ``target`` when the block ends.

    The parent folder is created when missing. On any exception the temporary is deleted and the target
    is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{target.name}-", dir=target.parent))
    try:
        tmp = folder / target.name
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"nothing was written for {target}")
        publish(tmp, target, overwrite)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_writable(target: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse, before any work, an output that cannot or must not be written; returns it as a Path.

    An existing ``target`` needs ``overwrite``; its nearest existing ancestor must be a folder we can write
    in (missing folders below it are created when the output is written). Nothing is created here.
    """
    target = Path(target)
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"{flag} {target} exists; pass --overwrite to replace it, or choose another name")
    ancestor = target.absolute().parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{flag} {target}: {ancestor} is a file, not a folder; choose another {flag}")
    before = os.stat(ancestor)
    probe = ancestor / f"{PARTIAL_PREFIX}write-test-{os.getpid()}"
    try:   # a real write, not os.access: root passes access checks on read-only mounts and /proc too
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise PermissionError(f"{flag} {target}: cannot write in {ancestor} ({exc.strerror}; read-only?); "
                              f"choose another {flag}") from exc
    try:   # a refused command must leave even the folder's modification time as it was
        os.utime(ancestor, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:
        pass
    return target
