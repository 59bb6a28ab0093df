"""vemamba_iso_to_nnunet: volumes + labels -> an nnU-Net raw dataset that nnU-Net itself accepts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from vemamba_iso.data import write_volume
from vemamba_iso.downstream import cut_subvolumes, instance_boundaries, labels_to_classes


def test_subvolumes_cover_the_volume_with_equal_sizes():
    tiles = cut_subvolumes((10, 33, 20), (4, 16, 32))
    hits = np.zeros((10, 33, 20), int)
    for t in tiles:
        hits[t] += 1
        assert tuple(s.stop - s.start for s in t) == (4, 16, 20)
    assert (hits >= 1).all() and len(tiles) == 3 * 3


def test_instance_boundaries_mark_both_sides_of_a_label_change():
    ids = np.zeros((1, 4, 6), np.uint32)
    ids[:, :, 3:] = 7
    b = instance_boundaries(ids)
    assert b.dtype == np.uint8
    assert b[0, :, 2:4].all() and b[0, :, :2].sum() == 0 and b[0, :, 4:].sum() == 0


def test_labels_to_classes():
    labels = np.array([0, 255, 3, 5])
    assert labels_to_classes(labels).tolist() == [0, 1, 1, 1]
    assert labels_to_classes(labels, [5, 3]).tolist() == [0, 0, 2, 1]


def run_cli(*args, env_raw=None):
    env = dict(os.environ)
    env.pop("nnUNet_raw", None)
    return subprocess.run([sys.executable, "-m", "vemamba_iso.cli.to_nnunet", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_writes_a_dataset_that_nnunet_verifies(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((12, 40, 40)) * 255).astype(np.uint8)
    mito = np.zeros(image.shape, np.uint8)
    mito[2:9, 5:20, 10:30] = 255
    write_volume(tmp_path / "raw.tif", image, voxel_size=(50.0, 4.6, 4.6))
    write_volume(tmp_path / "mito.tif", mito, voxel_size=(50.0, 4.6, 4.6))
    raw_root = tmp_path / "nnUNet_raw"
    result = run_cli("--image", str(tmp_path / "raw.tif"), "--labels", str(tmp_path / "mito.tif"),
                     "--dataset-id", "503", "--name", "EMMito", "--label-names", "background", "mitochondria",
                     "--subvolume", "8", "32", "32", "--nnunet-raw", str(raw_root))
    assert result.returncode == 0, result.stderr
    folder = raw_root / "Dataset503_EMMito"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "mitochondria": 1}
    assert meta["channel_names"] == {"0": "EM"} and meta["numTraining"] == 2 * 2 * 2
    case = sitk.ReadImage(str(folder / "imagesTr" / "EMMito_0000_0000.nii.gz"))
    assert case.GetSize() == (32, 32, 8) and case.GetSpacing() == pytest.approx((4.6, 4.6, 50.0))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "EMMito_0000.nii.gz")))
    np.testing.assert_array_equal(label, (mito[:8, :32, :32] > 0).astype(np.uint8))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)      # raises on any problem


def test_cli_errors_leave_no_dataset(tmp_path):
    write_volume(tmp_path / "raw.tif", np.arange(4 * 16 * 16).reshape(4, 16, 16).astype(np.uint8))  # not constant
    write_volume(tmp_path / "small.tif", np.zeros((4, 8, 16), np.uint8))
    raw_root = tmp_path / "raw_root"
    result = run_cli("--image", str(tmp_path / "raw.tif"), "--labels", str(tmp_path / "small.tif"),
                     "--dataset-id", "7", "--name", "X", "--nnunet-raw", str(raw_root))
    assert result.returncode == 2 and "one shape" in result.stderr
    assert not raw_root.exists()      # not even the raw folder the failed run would have made
    result = run_cli("--image", str(tmp_path / "raw.tif"), "--labels", str(tmp_path / "raw.tif"),
                     "--dataset-id", "7", "--name", "X")
    assert result.returncode != 0 and "nnUNet_raw" in result.stderr


def test_overwrite_interrupted_while_replacing_keeps_the_old_dataset(tmp_path, monkeypatch):
    from vemamba_iso.downstream import nnunet_dataset

    rng = np.random.default_rng(0)
    image = (rng.random((8, 16, 16)) * 255).astype(np.uint8)
    labels = (image > 128).astype(np.uint8)
    raw = tmp_path / "raw"
    first = nnunet_dataset.write_nnunet_dataset([(image, labels, None)], str(raw), 7, "Old", subvolume=(4, 8, 8),
                                                label_names=["background", "fg"])
    before = sorted(os.listdir(first))
    replace = os.replace

    def interrupted(src, dst):
        if str(src).endswith(".partial"):     # the new dataset about to take its place
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(nnunet_dataset.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nnunet_dataset.write_nnunet_dataset([(image, labels, None)], str(raw), 7, "New", subvolume=(4, 8, 8),
                                            label_names=["background", "fg"], overwrite=True)
    assert sorted(os.listdir(raw)) == ["Dataset007_Old"] and sorted(os.listdir(first)) == before
    monkeypatch.setattr(nnunet_dataset.os, "replace", replace)
    nnunet_dataset.write_nnunet_dataset([(image, labels, None)], str(raw), 7, "New", subvolume=(4, 8, 8),
                                        label_names=["background", "fg"], overwrite=True)
    assert sorted(os.listdir(raw)) == ["Dataset007_New"]
