"""The downstream pipeline's commands, end to end in subprocesses: degrade, interpolate (aligned with
predict), and nnU-Net datasets with a spatially separate held-out region."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from vemamba_iso.data import read_volume, write_volume
from vemamba_iso.cli.to_nnunet import main as to_nnunet_main
from vemamba_iso.downstream.nnunet_dataset import split_cases


def run_module(module, *args, env=None):
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture()
def iso_volume(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((18, 20, 24)) * 255).astype(np.uint8)
    path = tmp_path / "iso.tif"
    write_volume(path, data, voxel_size=(10.0, 10.0, 10.0))
    return path, data


def test_degrade_crops_to_a_multiple_and_keeps_dtype_and_voxel_size(tmp_path, iso_volume):
    path, data = iso_volume
    out = tmp_path / "aniso.tif"
    result = run_module("vemamba_iso.cli.degrade", "--input", path, "--factor", 4, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "from 18 to 16" in result.stdout and "first 16" in result.stdout
    degraded = read_volume(out)
    assert degraded.data.dtype == np.uint8 and degraded.data.shape == (4, 20, 24)
    assert degraded.voxel_size == pytest.approx((40.0, 10.0, 10.0))
    np.testing.assert_array_equal(degraded.data, data[:16:4])        # subsample keeps every 4th slice exactly

    # another axis and the averaging preset: the mean of each slab of 3 along X, rounded back to uint8
    out = tmp_path / "aniso_x.tif"
    result = run_module("vemamba_iso.cli.degrade", "--input", path, "--factor", 3, "--output", out,
                        "--axis", 2, "--degradation", "average_pool")
    assert result.returncode == 0, result.stderr
    assert "cropped" not in result.stdout
    degraded = read_volume(out)
    expected = data.astype(np.float64).reshape(18, 20, 8, 3).mean(axis=3)
    assert degraded.data.shape == (18, 20, 8) and degraded.voxel_size == pytest.approx((10.0, 10.0, 30.0))
    assert np.abs(degraded.data.astype(np.float64) - expected).max() <= 0.5 + 1e-3


def test_degrade_rejects_bad_input_without_writing(tmp_path, iso_volume):
    path, _ = iso_volume
    out = tmp_path / "out.tif"
    result = run_module("vemamba_iso.cli.degrade", "--input", path, "--factor", 1, "--output", out)
    assert result.returncode == 2 and "at least 2" in result.stderr
    write_volume(tmp_path / "short.tif", np.arange(5 * 8 * 8).reshape(5, 8, 8).astype(np.uint8))  # not constant
    result = run_module("vemamba_iso.cli.degrade", "--input", tmp_path / "short.tif", "--factor", 4,
                        "--output", out)
    assert result.returncode == 2 and "at least 8" in result.stderr
    import tifffile
    tifffile.imwrite(tmp_path / "image2d.tif", np.zeros((16, 16), np.uint8))
    result = run_module("vemamba_iso.cli.degrade", "--input", tmp_path / "image2d.tif", "--factor", 2,
                        "--output", out)
    assert result.returncode == 2 and "3D" in result.stderr
    assert not out.exists()


def test_interpolate_matches_predict_grid_and_keeps_observed_slices(tmp_path, tiny_model):
    rng = np.random.default_rng(1)
    aniso = (rng.random((5, 16, 12)) * 255).astype(np.uint8)
    write_volume(tmp_path / "aniso.tif", aniso, voxel_size=(20.0, 10.0, 10.0))
    interpolated = tmp_path / "linear.tif"
    result = run_module("vemamba_iso.cli.interpolate", "--input", tmp_path / "aniso.tif", "--factor", 2,
                        "--output", interpolated)
    assert result.returncode == 0, result.stderr
    predicted = tmp_path / "model.tif"
    result = subprocess.run([sys.executable, "-m", "vemamba_iso.cli.predict", "--input", str(tmp_path / "aniso.tif"), "--output",
                             str(predicted), "--model", str(tiny_model), "--threads", "1"], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr
    linear, model = read_volume(interpolated), read_volume(predicted)
    assert linear.data.shape == model.data.shape == (10, 16, 12)
    assert linear.data.dtype == model.data.dtype == np.uint8
    assert linear.voxel_size == pytest.approx(model.voxel_size) and linear.voxel_size == pytest.approx((10, 10, 10))
    np.testing.assert_array_equal(linear.data[::2], aniso)         # subsample: slice j sits at 2j
    midpoint = (aniso[:-1].astype(np.float64) + aniso[1:]) / 2
    assert np.abs(linear.data[1:-1:2] - midpoint).max() <= 0.5 + 1e-3

    # averaged acquisitions sit at the slab centres: no output slice equals an input slice any more
    result = run_module("vemamba_iso.cli.interpolate", "--input", tmp_path / "aniso.tif", "--factor", 2,
                        "--output", tmp_path / "centred.tif", "--degradation", "average_pool", "--method", "cubic")
    assert result.returncode == 0, result.stderr
    centred = read_volume(tmp_path / "centred.tif").data
    assert centred.shape == (10, 16, 12) and not np.array_equal(centred[::2], aniso)


def test_split_cases_hold_out_the_end_of_the_last_axis():
    train, test = split_cases((8, 20, 40), (4, 16, 16), test_fraction=0.25)
    assert all(t[-1].stop <= 30 for t in train) and all(t[-1].start >= 30 for t in test)
    cover = np.zeros((8, 20, 40), int)
    for t in train + test:
        cover[t] += 1
    assert (cover >= 1).all()
    assert {t[-1].stop - t[-1].start for t in test} == {10} and len(test) == 2 * 2
    assert split_cases((8, 20, 40), (4, 16, 16))[1] == []


def test_to_nnunet_test_fraction_writes_a_verified_dataset_with_a_shared_split(tmp_path):
    rng = np.random.default_rng(2)
    shape = (8, 24, 40)
    ids = np.repeat(np.arange(4, dtype=np.uint32), 10)[None, None, :] * np.ones(shape, np.uint32)
    for name, image in (("a", (rng.random(shape) * 255).astype(np.uint8)),
                        ("b", (rng.random(shape) * 255).astype(np.uint8))):
        write_volume(tmp_path / f"{name}.tif", image, voxel_size=(10.0, 10.0, 10.0))
    write_volume(tmp_path / "ids.tif", ids)
    raw = tmp_path / "nnUNet_raw"
    folders = []
    for dataset_id, name in ((11, "a"), (12, "b")):
        result = run_module("vemamba_iso.cli.to_nnunet", "--image", tmp_path / f"{name}.tif", "--labels",
                            tmp_path / "ids.tif", "--from-instances", "--dataset-id", dataset_id, "--name",
                            f"Set{name.upper()}", "--subvolume", 8, 16, 16, "--test-fraction", 0.25,
                            "--case-prefix", "stack", "--nnunet-raw", raw)
        assert result.returncode == 0, result.stderr
        assert "4 training cases, 2 test cases" in result.stdout
        folders.append(raw / f"Dataset{dataset_id:03d}_Set{name.upper()}")
    for folder in folders:
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["numTraining"] == 4
        train_names = sorted(os.listdir(folder / "labelsTr"))
        test_names = sorted(os.listdir(folder / "labelsTs"))
        assert len(train_names) == 4 and len(test_names) == 2 and not set(train_names) & set(test_names)
        assert sorted(os.listdir(folder / "imagesTs")) == [n.replace(".nii.gz", "_0000.nii.gz") for n in test_names]
        for n in test_names:       # the held-out cases are the last 10 of 40 X voxels, labels included
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / n)))
            assert label.shape[-1] == 10
        for n in train_names:
            assert sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / n))).shape[-1] == 16
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folders[0]), num_processes=1)      # raises on any problem
    for part in ("labelsTr", "labelsTs"):
        assert os.listdir(folders[0] / part) and sorted(os.listdir(folders[0] / part)) == sorted(os.listdir(folders[1] / part))
    held_out = sitk.GetArrayFromImage(sitk.ReadImage(str(folders[0] / "imagesTs" / sorted(os.listdir(folders[0] / "imagesTs"))[0])))
    original = read_volume(tmp_path / "a.tif").data
    np.testing.assert_array_equal(held_out, original[:8, :16, 30:])


def test_to_nnunet_rejects_a_test_fraction_of_one_without_writing(tmp_path, capsys):
    write_volume(tmp_path / "a.tif", np.zeros((4, 8, 8), np.uint8))
    raw = tmp_path / "nnUNet_raw"
    code = to_nnunet_main(["--image", str(tmp_path / "a.tif"), "--labels", str(tmp_path / "a.tif"), "--dataset-id",
                           "13", "--name", "Bad", "--test-fraction", "1.0", "--nnunet-raw", str(raw)])
    assert code == 2 and "test fraction" in capsys.readouterr().err
    assert not raw.exists() or os.listdir(raw) == []


def test_sparse_section_labels_become_nnunet_ignore_label_between_sections(tmp_path, capsys):
    rng = np.random.default_rng(3)
    sections = (rng.random((5, 16, 16)) > 0.7).astype(np.uint8) * 255        # labels of a 5-section stack
    write_volume(tmp_path / "recon.tif", (rng.random((10, 16, 16)) * 255).astype(np.uint8))   # its x2 reconstruction
    write_volume(tmp_path / "mito.tif", sections)
    raw = tmp_path / "nnUNet_raw"
    result = run_module("vemamba_iso.cli.to_nnunet", "--image", tmp_path / "recon.tif", "--labels",
                        tmp_path / "mito.tif", "--sparse-labels", 2, "--dataset-id", 21, "--name", "Mito",
                        "--label-names", "background", "mitochondria", "--subvolume", 10, 16, 16, "--nnunet-raw", raw)
    assert result.returncode == 0, result.stderr
    folder = raw / "Dataset021_Mito"
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "mitochondria": 1,
                                                                          "ignore": 2}
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "Mito_0000.nii.gz")))
    np.testing.assert_array_equal(label[::2], sections // 255)
    assert (label[1::2] == 2).all()
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)

    code = to_nnunet_main(["--image", str(tmp_path / "recon.tif"), "--labels", str(tmp_path / "mito.tif"),
                           "--sparse-labels", "4", "--dataset-id", "22", "--name", "Wrong", "--nnunet-raw", str(raw)])
    assert code == 2 and "5 labelled sections" in capsys.readouterr().err
    assert not any(p.startswith("Dataset022") for p in os.listdir(raw))

    # a model trained on area-averaged sections centres section j on slice j*K + (K - 1) / 2
    write_volume(tmp_path / "recon3.tif", (rng.random((15, 16, 16)) * 255).astype(np.uint8))   # x3
    code = to_nnunet_main(["--image", str(tmp_path / "recon3.tif"), "--labels", str(tmp_path / "mito.tif"),
                           "--sparse-labels", "3", "--section-offset", "1", "--dataset-id", "23", "--name", "Centred",
                           "--label-names", "background", "mitochondria", "--subvolume", "15", "16", "16",
                           "--nnunet-raw", str(raw)])
    assert code == 0
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Dataset023_Centred" / "labelsTr" / "Centred_0000.nii.gz")))
    np.testing.assert_array_equal(label[1::3], sections // 255)
    assert (label[0::3] == 2).all() and (label[2::3] == 2).all()
