"""The three commands end to end (subprocesses) and their errors (in-process, exit code 2)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from vemamba_iso.cli import evaluate, predict, train
from vemamba_iso.data import read_volume, write_volume

TINY_FLAGS = ["--dim", "8", "--groups", "1", "--blocks", "1", "--state-size", "4", "--patch", "4", "16",
              "--moco-steps", "2", "--steps-per-epoch", "3", "--threads", "1"]
SMALL_TILES = ["--tile", "4", "16", "16", "--overlap", "1", "4", "4", "--threads", "1"]


def tiny_volume(shape=(40, 40, 40), seed=0):
    from scipy.ndimage import gaussian_filter
    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    return ((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)


def run_command(name, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"vemamba_iso.cli.{name}", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.slow
def test_train_predict_evaluate_end_to_end(tmp_path):
    write_volume(tmp_path / "train.tif", tiny_volume(), voxel_size=(10.0, 10.0, 10.0))
    train = run_command("train", "--input", str(tmp_path / "train.tif"), "--factor", "2",
                        "--output", str(tmp_path / "model"), "--steps", "3", *TINY_FLAGS)
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "model" / "model.pt").exists() and "model written" in train.stdout

    anisotropic = tiny_volume((10, 24, 24), seed=1)
    write_volume(tmp_path / "aniso.h5", anisotropic, voxel_size=(20.0, 10.0, 10.0), key="raw")
    predict = run_command("predict", "--input", str(tmp_path / "aniso.h5"), "--key", "raw",
                          "--output", str(tmp_path / "iso.tif"), "--model", str(tmp_path / "model"), *SMALL_TILES)
    assert predict.returncode == 0, predict.stderr
    out = read_volume(tmp_path / "iso.tif")
    assert out.data.shape == (20, 24, 24) and out.data.dtype == np.uint8  # dtype follows the input
    assert np.allclose(out.voxel_size, (10.0, 10.0, 10.0))

    evaluate = run_command("evaluate", "--gt", str(tmp_path / "train.tif"), "--factor", "2",
                           "--model", str(tmp_path / "model"), "--report", str(tmp_path / "report.json"),
                           *SMALL_TILES)
    assert evaluate.returncode == 0, evaluate.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    for method in ("vemamba", "linear", "cubic"):
        assert {"psnr", "ssim_3d", "ssim_xy", "ssim_xz", "ssim_yz"} <= set(report[method])
        assert 15 < report[method]["psnr"] < 60
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_default_model_and_sample_run_out_of_the_box(tmp_path):
    result = run_command("evaluate", "--gt", "sample", "--factor", "4", "--report",
                         str(tmp_path / "r.json"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["shape_zyx"] == [64, 128, 128]
    # The shipped model was trained on another FIB-25 cube: it must beat linear interpolation here.
    assert report["vemamba"]["psnr"] > report["linear"]["psnr"]
    assert (tmp_path / "r.png").exists()
    predict = run_command("predict", "--input", "sample", "--output", str(tmp_path / "iso.tif"),
                          "--threads", "1")
    assert predict.returncode == 0, predict.stderr
    out = read_volume(tmp_path / "iso.tif")
    assert out.data.shape == (64, 128, 128) and out.data.dtype == np.uint8
    assert np.allclose(out.voxel_size, (10.0, 10.0, 10.0))


def assert_fails(capsys, command, argv, message, output=None):
    assert command(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if output is not None:
        folder = os.path.dirname(output)
        assert not os.path.exists(output)
        assert not [n for n in os.listdir(folder) if "partial" in n]  # no temporary left behind


def test_error_2d_input(tmp_path, capsys, tiny_model):
    tifffile.imwrite(tmp_path / "slice.tif", np.zeros((16, 16), np.uint8))
    out = str(tmp_path / "out.tif")
    assert_fails(capsys, predict.main, ["--input", str(tmp_path / "slice.tif"), "--output", out,
                                        "--model", str(tiny_model)], "2D", out)


def test_error_unknown_format(tmp_path, capsys, tiny_model):
    (tmp_path / "vol.xyz").write_bytes(b"???")
    out = str(tmp_path / "out.tif")
    assert_fails(capsys, predict.main, ["--input", str(tmp_path / "vol.xyz"), "--output", out,
                                        "--model", str(tiny_model)], "unknown volume format", out)
    write_volume(tmp_path / "ok.tif", tiny_volume((4, 16, 16)))
    assert_fails(capsys, predict.main, ["--input", str(tmp_path / "ok.tif"), "--output", str(tmp_path / "o.bmp"),
                                        "--model", str(tiny_model)], "unknown volume format")


def test_error_missing_hdf5_key(tmp_path, capsys, tiny_model):
    write_volume(tmp_path / "v.h5", tiny_volume((4, 16, 16)), key="raw")
    out = str(tmp_path / "out.tif")
    assert_fails(capsys, predict.main, ["--input", str(tmp_path / "v.h5"), "--key", "volume", "--output", out,
                                        "--model", str(tiny_model)], "'volume' not found", out)


def test_error_factor_mismatch(tmp_path, capsys, tiny_model):
    write_volume(tmp_path / "gt.tif", tiny_volume((24, 24, 24)))
    report = str(tmp_path / "report.json")
    assert_fails(capsys, evaluate.main, ["--gt", str(tmp_path / "gt.tif"), "--factor", "4", "--model",
                                         str(tiny_model), "--report", report], "trained for x2", report)
    out = str(tmp_path / "out.tif")
    assert_fails(capsys, predict.main, ["--input", str(tmp_path / "gt.tif"), "--factor", "3", "--output", out,
                                        "--model", str(tiny_model)], "does not match", out)


def test_error_nan_voxels(tmp_path, capsys, tiny_model):
    data = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    data[1, 2, 3] = np.nan
    write_volume(tmp_path / "nan.tif", data)
    out = str(tmp_path / "out.tif")
    assert_fails(capsys, predict.main, ["--input", str(tmp_path / "nan.tif"), "--output", out,
                                        "--model", str(tiny_model)], "NaN", out)
    assert_fails(capsys, train.main, ["--input", str(tmp_path / "nan.tif"), "--factor", "2",
                                      "--output", str(tmp_path / "m")], "NaN")
    assert not (tmp_path / "m").exists()


def test_predict_in_process_keeps_float_dtype_and_axis(tmp_path, capsys, tiny_model):
    data = np.random.default_rng(0).random((16, 5, 16)).astype(np.float32)
    write_volume(tmp_path / "v.tif", data)
    assert predict.main(["--input", str(tmp_path / "v.tif"), "--output", str(tmp_path / "o.zarr"),
                                   "--model", str(tiny_model), "--axis", "1", "--tile", "4", "16", "16"]) == 0
    out = read_volume(tmp_path / "o.zarr", key="data")
    assert out.data.shape == (16, 10, 16) and out.data.dtype == np.float32
    import zarr
    assert list(zarr.open_group(str(tmp_path / "o.zarr"), mode="r").array_keys()) == ["data"]   # the default key


def test_float_input_in_unit_range_is_not_divided_by_255(tmp_path, tiny_model):
    # The model was trained on uint8 / 255. A float volume already in [0, 1] is rescaled (min 0, max 1 here:
    # unchanged), the same values stored as floats in 0..255 are divided by 255: the network sees the same
    # input, and each output is in its input's units.
    unit = np.random.default_rng(0).random((12, 16, 16)).astype(np.float32)
    unit.flat[0], unit.flat[1] = 0.0, 1.0
    outputs = []
    for name, data in (("unit", unit), ("grey", unit * 255)):
        write_volume(tmp_path / f"{name}.tif", data)
        assert predict.main(["--input", str(tmp_path / f"{name}.tif"), "--output", str(tmp_path / f"{name}_out.tif"),
                             "--model", str(tiny_model), *SMALL_TILES]) == 0
        outputs.append(read_volume(tmp_path / f"{name}_out.tif").data)
    np.testing.assert_allclose(outputs[0] * 255, outputs[1], rtol=0, atol=1e-2)
    assert outputs[0].max() <= 1.5          # in the input's units, not 255 times them


def test_factor_without_model_picks_the_shipped_model_or_says_how_to_train_one(tmp_path, capsys):
    from vemamba_iso.training.checkpoint import DEFAULT_MODEL_DIR, default_model_dir, shipped_factors

    assert 4 in shipped_factors() and default_model_dir(4) == DEFAULT_MODEL_DIR == default_model_dir(None)
    from vemamba_iso.training import load_model
    assert {4, 8, 10} <= set(shipped_factors())
    for factor in shipped_factors():  # each shipped model loads and is the model of its factor
        network, metadata = load_model(default_model_dir(factor))
        assert metadata["factor"] == factor == network.config.factor
    out = tmp_path / "out.tif"
    for command, argv in ((predict, ["--input", "sample", "--output", str(out)]),
                          (evaluate, ["--gt", "sample", "--report", str(tmp_path / "r.json")])):
        assert command.main(argv + ["--factor", "7"]) == 2
        err = capsys.readouterr().err
        assert "no model is shipped for x7" in err and "vemamba_iso_train" in err and "--factor 7" in err
    assert list(tmp_path.iterdir()) == []
