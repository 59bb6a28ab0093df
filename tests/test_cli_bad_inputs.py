"""Every command against a table of bad inputs and outputs: exit 2, one ``error:`` line, nothing changed on disk.

Most rows call the command's ``main(argv)`` in this process (fast); a few run the installed console scripts,
and two interrupt a real run (SIGINT, SIGTERM) while it writes its output.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from vemamba_iso.cli import degrade, evaluate, interpolate, predict, to_nnunet, train
from vemamba_iso.data import write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMANDS = {"predict": predict, "evaluate": evaluate, "degrade": degrade, "interpolate": interpolate,
            "to_nnunet": to_nnunet, "train": train}
SMALL_TILES = ["--tile", "4", "16", "16", "--overlap", "1", "4", "4", "--threads", "1"]
TINY_TRAINING = ["--dim", "8", "--groups", "1", "--blocks", "1", "--state-size", "4", "--patch", "4", "16",
                 "--moco-steps", "1", "--steps", "1", "--threads", "1"]


def smooth_volume(shape=(16, 24, 24), seed=0, dtype=np.uint8):
    v = np.random.default_rng(seed).random(shape)
    return (v * 200 + 20).astype(dtype)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model):
    """One folder of good and bad inputs, shared by every row (each row checks that it stays unchanged)."""
    d = tmp_path_factory.mktemp("inputs")
    good = smooth_volume()
    write_volume(d / "good.tif", good)
    write_volume(d / "labels.tif", (good > 120).astype(np.uint8))
    write_volume(d / "good.h5", good, key="raw")
    write_volume(d / "small.tif", smooth_volume((6, 12, 12)))
    raw = (d / "good.tif").read_bytes()
    (d / "corrupt.tif").write_bytes(raw[:8] + bytes(np.random.default_rng(1).integers(0, 256, len(raw) - 8,
                                                                                        dtype=np.uint8)))
    (d / "header_only.tif").write_bytes(raw[:8] + bytes(len(raw) - 8))   # the case: IndexError before
    (d / "empty.tif").write_bytes(b"")
    tifffile.imwrite(d / "slice.tif", good[0], photometric="minisblack")
    tifffile.imwrite(d / "stack4d.tif", np.stack([good, good]), photometric="minisblack")
    nan = good.astype(np.float32)
    nan[2, 3, 4] = np.nan
    tifffile.imwrite(d / "nan.tif", nan, photometric="minisblack")
    tifffile.imwrite(d / "constant.tif", np.full((16, 24, 24), 7, np.uint8), photometric="minisblack")
    with h5py.File(d / "empty_axis.h5", "w") as f:
        f.create_dataset("raw", shape=(0, 24, 24), dtype=np.uint8)
    with h5py.File(d / "two.h5", "w") as f:
        f["raw"], f["labels"] = good, good
    with h5py.File(d / "complex.h5", "w") as f:
        f["raw"] = good.astype(np.complex64)
    (d / "volume.xyz").write_bytes(b"not a volume")
    truncated = d / "truncated_model"
    truncated.mkdir()
    blob = (tiny_model / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(blob[: len(blob) // 2])
    return d


def command_argv(name, source, out: Path, inputs: Path, model) -> list[str]:
    """A valid command line of ``name`` reading ``source`` and writing into the folder ``out``."""
    return {
        "predict": ["--input", source, "--output", str(out / "out.tif"), "--model", str(model), *SMALL_TILES],
        "evaluate": ["--gt", source, "--factor", "2", "--model", str(model), "--report", str(out / "report.json"),
                     *SMALL_TILES],
        "degrade": ["--input", source, "--factor", "2", "--output", str(out / "out.tif")],
        "interpolate": ["--input", source, "--factor", "2", "--output", str(out / "out.tif")],
        "to_nnunet": ["--image", source, "--labels", str(inputs / "labels.tif"), "--dataset-id", "7", "--name", "Bad",
                      "--nnunet-raw", str(out / "raw"), "--subvolume", "4", "8", "8"],
        "train": ["--input", source, "--factor", "2", "--output", str(out / "model"), *TINY_TRAINING],
    }[name]


# (row id, input file, extra arguments, expected message)
BAD_INPUTS = [
    ("missing file", "missing.tif", [], "no such volume"),
    ("empty file", "empty.tif", [], "is empty (0 bytes)"),
    ("corrupt tiff", "corrupt.tif", [], "corrupt.tif cannot be read as TIFF"),
    ("tiff header, zeros after", "header_only.tif", [], "header_only.tif holds no image data"),
    ("2D image", "slice.tif", [], "2D"),
    ("4D array", "stack4d.tif", [], "4D"),
    ("NaN voxels", "nan.tif", [], "NaN"),
    ("constant volume", "constant.tif", [], "is constant"),
    ("zero-sized axis", "empty_axis.h5:raw", [], "empty axis"),
    ("two datasets, no key", "two.h5", [], "name one with --key"),
    ("wrong --key", "good.h5", ["--key", "nope"], "'nope' not found"),
    ("non-numeric dtype", "complex.h5:raw", [], "complex64 values"),
    ("unknown extension", "volume.xyz", [], "unknown volume format"),
]


def snapshot(*folders) -> dict:
    """Every path under ``folders`` with its size and modification time."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                stat = os.lstat(path)
                found[path] = (stat.st_size if name in files else None, stat.st_mtime_ns)
    return found


def call(command, argv, capsys) -> tuple[int, str]:
    """``command.main(argv)`` in this process: (exit code, stderr)."""
    try:
        code = command.main([str(a) for a in argv])
    except SystemExit as exit_:   # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def assert_refused(command, argv, message, capsys, *folders):
    before = snapshot(*folders)
    code, err = call(command, argv, capsys)
    assert code == 2, err
    assert message in err, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err      # one line
    assert "Traceback" not in err and "unexpected" not in err, err            # a handled error, not a bug
    assert snapshot(*folders) == before                                       # nothing written, nothing left


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("row, source, extra, message", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_is_refused_and_nothing_is_written(name, row, source, extra, message, inputs, tiny_model,
                                                     tmp_path, capsys):
    argv = command_argv(name, str(inputs / source), tmp_path, inputs, tiny_model) + extra
    assert_refused(COMMANDS[name], argv, message, capsys, inputs, tmp_path)


@pytest.mark.parametrize("name, argv_edit, message", [
    ("predict", lambda a, d: a + ["--factor", "3"], "does not match"),
    ("evaluate", lambda a, d: [x if x != "2" else "4" for x in a], "trained for x2"),
    ("train", lambda a, d: [x if x != "2" else "11" for x in a], "--factor must be in 2..10"),
    ("degrade", lambda a, d: [x if x != "2" else "1" for x in a], "at least 2"),
    ("interpolate", lambda a, d: [x if x != "2" else "1" for x in a], "at least 2"),
    ("train", lambda a, d: [str(d / "small.tif") if x.endswith("good.tif") else x for x in a], "too small"),
    ("degrade", lambda a, d: [str(d / "small.tif") if x.endswith("good.tif") else x for x in a] + ["--factor", "4"],
     "at least 8 are needed"),
    ("predict", lambda a, d: a + ["--model", str(d / "no_such_model")], "no model at"),
    ("evaluate", lambda a, d: a + ["--model", str(d / "no_such_model")], "no model at"),
    ("predict", lambda a, d: a + ["--model", str(d / "truncated_model")], "truncated or corrupt"),
    ("evaluate", lambda a, d: a + ["--model", str(d / "truncated_model")], "truncated or corrupt"),
    ("predict", lambda a, d: a + ["--dtype", "str"], "not an integer or float dtype"),
    ("to_nnunet", lambda a, d: a + ["--labels", str(d / "labels.tif")], "give one label volume per image"),
    ("predict", lambda a, d: a + ["--no-such-flag"], "unrecognized arguments"),
    ("train", lambda a, d: a + ["--time-limit", "0"], "--time-limit must be a positive number of minutes"),
    ("train", lambda a, d: a + ["--weight-average", "1"], "--weight-average must be a decay in [0, 1)"),
    ("predict", lambda a, d: a + ["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    ("predict", lambda a, d: a + ["--overlap", "-4", "4", "4"], "argument --overlap: must be 0 or more, got -4"),
    ("predict", lambda a, d: a + ["--tile", "0", "16", "16"], "argument --tile: must be at least 1, got 0"),
    ("evaluate", lambda a, d: a + ["--overlap", "1", "-2", "4"], "argument --overlap: must be 0 or more, got -2"),
    ("train", lambda a, d: a + ["--steps-per-epoch", "0"], "argument --steps-per-epoch: must be at least 1"),
    ("train", lambda a, d: a + ["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    ("train", lambda a, d: a + ["--steps", "x"], "argument --steps: 'x' is not an integer"),
    ("evaluate", lambda a, d: [str(d / "small.tif") if x.endswith("good.tif") else x for x in a],
     "too small to measure SSIM"),
], ids=["factor mismatch", "factor mismatch (evaluate)", "factor out of range (train)", "factor too small (degrade)",
        "factor too small (interpolate)", "smaller than the patch (train)", "too short to degrade",
        "missing model folder", "missing model folder (evaluate)", "truncated checkpoint",
        "truncated checkpoint (evaluate)", "bad --dtype", "unpaired labels", "unknown flag",
        "zero time limit (train)", "weight-average decay of 1 (train)", "negative batch (predict)", "negative overlap (predict)", "zero tile (predict)",
        "negative overlap (evaluate)", "zero steps per epoch (train)", "zero batch (train)", "non-integer steps (train)",
        "smaller than the SSIM window (evaluate)"])
def test_bad_arguments_are_refused_and_nothing_is_written(name, argv_edit, message, inputs, tiny_model, tmp_path,
                                                          capsys):
    argv = argv_edit(command_argv(name, str(inputs / "good.tif"), tmp_path, inputs, tiny_model), inputs)
    assert_refused(COMMANDS[name], argv, message, capsys, inputs, tmp_path)


def existing_output(name, tmp_path, output_name) -> list[str]:
    """Make the user's own file/folder ``output_name`` and return the argument edit pointing at it."""
    target = tmp_path / output_name
    if output_name.endswith(".zarr"):
        write_volume(target, smooth_volume((2, 4, 4)))
    elif name == "to_nnunet":
        (target / "imagesTr").mkdir(parents=True)
    elif name == "train":
        target.mkdir()
        (target / "notes.txt").write_text("my notes")
    else:
        target.write_bytes(b"the user's own file")
    return target


@pytest.mark.parametrize("name, flag, output_name, message", [
    ("predict", "--output", "mine.tif", "exists; pass --overwrite"),
    ("predict", "--output", "mine.h5", "exists; pass --overwrite"),
    ("predict", "--output", "mine.nii.gz", "exists; pass --overwrite"),
    ("predict", "--output", "mine.zarr", "exists; pass --overwrite"),
    ("degrade", "--output", "mine.tif", "exists; pass --overwrite"),
    ("interpolate", "--output", "mine.h5", "exists; pass --overwrite"),
    ("evaluate", "--report", "mine.json", "exists; pass --overwrite"),
    ("evaluate", "--figure", "mine.png", "exists; pass --overwrite"),
    ("to_nnunet", None, "raw/Dataset007_Other", "choose another --dataset-id or pass --overwrite"),
    ("train", "--output", "mine", "not vemamba_iso checkpoints (notes.txt)"),
])
def test_existing_output_is_not_replaced_without_overwrite(name, flag, output_name, message, inputs, tiny_model,
                                                           tmp_path, capsys):
    target = existing_output(name, tmp_path, output_name)
    argv = command_argv(name, str(inputs / "good.tif"), tmp_path, inputs, tiny_model)
    if flag:
        argv += [flag, str(target)]
    assert_refused(COMMANDS[name], argv, message, capsys, inputs, tmp_path)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_output_whose_parent_is_a_file_is_refused(name, inputs, tiny_model, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"x")
    argv = command_argv(name, str(inputs / "good.tif"), blocker, inputs, tiny_model)
    assert_refused(COMMANDS[name], argv, "is a file, not a folder", capsys, inputs, tmp_path)


@pytest.mark.parametrize("output_name", ["mine.tif", "mine.nii.gz", "mine.zarr"])
def test_overwrite_replaces_the_output_whole(output_name, inputs, tmp_path, capsys):
    target = existing_output("degrade", tmp_path, output_name)
    argv = command_argv("degrade", str(inputs / "good.tif"), tmp_path, inputs, None) + ["--output", str(target)]
    assert call(degrade, argv + ["--overwrite"], capsys)[0] == 0
    from vemamba_iso.data import read_volume
    assert read_volume(target).data.shape == (8, 24, 24)
    assert sorted(os.listdir(tmp_path)) == [output_name]          # no temporary, no moved-aside old output


def test_train_overwrite_starts_anew_instead_of_resuming(inputs, tiny_model, tmp_path, capsys):
    argv = command_argv("train", str(inputs / "good.tif"), tmp_path, inputs, tiny_model)
    assert train.main(argv) == 0
    again = capsys.readouterr().out
    assert train.main(argv) == 0                       # the same command: its one step is spent
    assert "nothing left to train" in capsys.readouterr().out
    assert train.main(argv + ["--overwrite"]) == 0     # a new model, not the old one kept
    out = capsys.readouterr().out
    assert "model written" in out and "model written" in again


def test_debug_shows_the_traceback(inputs, tmp_path, capsys):
    argv = command_argv("degrade", str(inputs / "corrupt.tif"), tmp_path, inputs, None) + ["--debug"]
    code, err = call(degrade, argv, capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def console_script(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.slow
def test_console_scripts_fail_in_one_line(inputs, tiny_model, tmp_path):
    """The installed commands, as a user runs them: the corrupt TIFF of the issue and an existing output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mine = tmp_path / "existing.tif"
    mine.write_bytes(b"mine")
    before = snapshot(inputs, tmp_path)
    for argv, message in (
            (["vemamba_iso_predict", "--input", str(inputs / "corrupt.tif"), "--output", str(tmp_path / "o.tif"),
              "--model", str(tiny_model)], "corrupt.tif cannot be read as TIFF"),
            (["vemamba_iso_predict", "--input", str(inputs / "good.tif"), "--output", str(mine), "--model",
              str(tiny_model)], "exists; pass --overwrite")):
        result = subprocess.run([console_script(argv[0]), *argv[1:]], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
    assert snapshot(inputs, tmp_path) == before and mine.read_bytes() == b"mine"


# The run stops inside its output writer, once the temporary is on disk, and waits to be signalled.
STALLED_WRITE = """
import os, sys, time, tifffile
from vemamba_iso.cli import degrade
write = tifffile.imwrite
def stalled(path, *args, **kwargs):
    write(path, *args, **kwargs)
    open(os.environ["READY"], "w").close()
    time.sleep(120)
tifffile.imwrite = stalled
sys.exit(degrade.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_writing_leaves_neither_output_nor_temporary(signum, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ready = tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITE, "--input", str(inputs / "good.tif"), "--factor",
                             "2", "--output", str(out / "aniso.tif")], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "the write never started"
    assert [n for n in os.listdir(out) if n.startswith(".partial-")]     # mid-write: the temporary is there
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert os.listdir(out) == []
