"""What every command shares: its parser, reading its inputs, and one way to fail or be interrupted.

Rules (the same for every command, so that they cannot drift apart):
- a failure the user can fix prints one line ``error: ...`` naming the file and the fix and exits 2;
  ``--debug`` adds the traceback; an unexpected exception is reported the same way, marked as a bug;
- SIGINT (Ctrl-C) and SIGTERM unwind like an exception, so every temporary output is removed, and exit
  128 + the signal number (130, 143), as shells do.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class CommandError(Exception):
    """An error the user can fix; printed without a traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (a KeyboardInterrupt, so that cleanup written for Ctrl-C runs for both)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser with the flags every command has and a one-line error.

    Args:
        writes: the command writes an output: adds ``--overwrite``.
    """

    def __init__(self, *args, writes: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if writes:
            self.add_argument("--overwrite", action="store_true",
                              help="replace an existing output (default: refuse, and write nothing)")
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, for the commands that run the network."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the network runs")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")


def numeric_dtype(text: str) -> np.dtype:
    """argparse type of ``--dtype``: a numpy integer or float dtype name (uint8, uint16, float32, ...)."""
    try:
        dtype = np.dtype(text)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "iuf":
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or float dtype (e.g. uint8, uint16, float32)")
    return dtype


def _int_at_least(minimum: int, requirement: str):
    """An argparse type: an integer of at least ``minimum``; ``requirement`` words the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    return parse


#: argparse type of counts and sizes that must be at least 1 (tiles, batches, steps, threads)
positive_int = _int_at_least(1, "at least 1")
#: argparse type of overlaps, halos and level counts (0 allowed)
non_negative_int = _int_at_least(0, "0 or more")


def setup_torch(args) -> None:
    """Apply ``--threads``; refuse ``--device cuda`` without a GPU."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was requested but no CUDA GPU is available; use --device cpu")


def input_paths(entries: list[str]) -> list[str]:
    """Files as given; a directory (e.g. an nnUNet_raw dataset folder) contributes its volumes
    (from ``imagesTr`` when present); a bare dataset name is looked up under ``$nnUNet_raw``."""
    from ..data.io import SUPPORTED
    paths = []
    for entry in entries:
        p = Path(entry)
        if not p.exists() and os.environ.get("nnUNet_raw") and (Path(os.environ["nnUNet_raw"]) / entry).is_dir():
            p = Path(os.environ["nnUNet_raw"]) / entry
        if p.is_dir() and not str(p).lower().endswith(".zarr"):
            folder = p / "imagesTr" if (p / "imagesTr").is_dir() else p
            found = sorted(str(f) for f in folder.iterdir() if str(f).lower().endswith(SUPPORTED))
            if not found:
                raise CommandError(f"no volumes ({', '.join(SUPPORTED)}) in {folder}")
            paths += found
        else:
            paths.append(entry)
    return paths


def read_input(path: str, key: str | None = None, sample: str = "isotropic", image: bool = True):
    """The volume at ``path`` (``'sample'``: the shipped crop of that kind), checked for what every command needs.

    Args:
        image: an intensity image (not labels): constant volumes are refused too, as they are nearly always
            the wrong file or ``--key`` (a mask, a blank export) and give nothing to reconstruct or learn.
    """
    from ..data.io import read_volume
    if path == "sample":
        from ..data import sample_path
        path = str(sample_path(sample))
    volume = read_volume(path, key)
    data = volume.data
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise CommandError(f"{path} contains NaN or infinite voxels; replace them (e.g. with the background "
                           "value) before reconstruction")
    if image and data.min() == data.max():
        raise CommandError(f"{path} is constant (every voxel is {data.flat[0]}): nothing to reconstruct; "
                           "check that it is the right file (or --key)")
    return volume


def check_factor(requested: int | None, metadata: dict, model_arg) -> None:
    """Refuse a ``--factor`` other than the model's."""
    if requested is not None and int(requested) != int(metadata["factor"]):
        which = model_arg or "the default model"
        raise CommandError(f"--factor {requested} does not match {which}, trained for x{metadata['factor']}; "
                           f"train a x{requested} model with vemamba_iso_train --factor {requested} and pass --model")


@contextmanager
def signals_raise():
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the block runs.

    A second signal while the first unwinds is ignored, so that the cleanup it triggered can finish.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# the failures a user can fix by changing the command or the files
USER_ERRORS = (CommandError, ValueError, KeyError, OSError, MemoryError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes str() adds)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def run_command(parser: argparse.ArgumentParser, command, argv=None) -> int:
    """Parse ``argv``, run ``command(args)`` and return its exit code; every failure is one stderr line.

    ``command`` may set ``args.interrupt_note``: what an interruption leaves behind (e.g. a checkpoint).
    """
    args = parser.parse_args(argv)
    try:
        with signals_raise():
            return int(command(args) or 0)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        note = getattr(args, "interrupt_note", "no output was written")
        print(f"interrupted by {signal.Signals(signum).name}: {note}", file=sys.stderr)
        return 128 + int(signum)
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {one_line(exc)}{_kept_note(args)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line, but say so and how to see more
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__} in {parser.prog}: {one_line(exc)} (a bug: rerun with "
              f"--debug for the traceback and report it){_kept_note(args)}", file=sys.stderr)
        return 2


def _kept_note(args) -> str:
    """What a failed run leaves to resume from (its ``interrupt_note``, set once there is something), as a
    suffix of the one error line."""
    note = getattr(args, "interrupt_note", None)
    return f"; {note}" if note else ""
