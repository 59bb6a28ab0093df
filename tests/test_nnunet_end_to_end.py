"""End to end with the stock nnU-Net commands in a clean environment (2d and 3d_fullres, CPU).

Only nnUNet_raw / nnUNet_preprocessed / nnUNet_results are set (not nnUNet_extTrainer): the package's
start-up hook is what makes ``-tr nnUNetTrainerLoGVMamba_1epoch_2iters`` resolvable.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SimpleITK = pytest.importorskip("SimpleITK")

pytestmark = pytest.mark.slow
DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID}_LoGVMambaBlobs"
TRAINER = "nnUNetTrainerLoGVMamba_1epoch_2iters"
BIN = Path(sys.executable).parent


def _write(image, path):
    itk = SimpleITK.GetImageFromArray(image)
    itk.SetSpacing((1.0, 1.0, 1.0))
    SimpleITK.WriteImage(itk, str(path))


def _case(rng, shape=(14, 20, 18)):
    """A noisy volume with one bright ellipsoid and its label."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([rng.uniform(4, s - 4) for s in shape])[:, None, None, None]
    radius = np.array([rng.uniform(2.5, 4.0) for _ in shape])[:, None, None, None]
    label = (((grid - centre) / radius) ** 2).sum(0) <= 1
    image = rng.normal(0, 1, shape) + 3.0 * label
    return image.astype(np.float32), label.astype(np.uint8)


def _env(root, training=False):
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(root),
           "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"),
           # one torch thread: the test shares a small machine (our trainers honour OMP_NUM_THREADS)
           "OMP_NUM_THREADS": "1",
           # one export worker instead of nnU-Net's default 8 spawned processes (each re-imports torch)
           "nnUNet_def_n_proc": "1"}
    if training:
        env["nnUNet_n_proc_DA"] = "0"  # crashes planning (set_num_threads(0)), so training only
    return env


def _run(args, env, root):
    proc = subprocess.run([str(BIN / args[0])] + args[1:], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw" / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        image, label = _case(rng)
        _write(image, raw / "imagesTr" / f"blob_{i:03d}_0000.nii.gz")
        _write(label, raw / "labelsTr" / f"blob_{i:03d}.nii.gz")
    test_image, _ = _case(rng, shape=(15, 19, 21))
    _write(test_image, raw / "imagesTs" / "blob_900_0000.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": 6,
        "file_ending": ".nii.gz"}))
    env = _env(root)
    assert "nnUNet_extTrainer" not in env
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1",
          "-npfp", "1", "--verify_dataset_integrity"], env, root)
    return root


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_train_and_predict_with_stock_commands(planned, configuration):
    root = planned
    out = _run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu"],
               _env(root, training=True), root)
    assert "ext_trainers" in out  # found through the folder the start-up hook registered
    fold = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{configuration}" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "LoG-VMamba blocks" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert any(".mamba." in k for k in checkpoint["network_weights"])
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0

    prediction = root / f"pred_{configuration}"
    _run(["nnUNetv2_predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(prediction),
          "-d", str(DATASET_ID), "-c", configuration, "-f", "0", "-tr", TRAINER, "-device", "cpu",
          "--disable_tta", "-npp", "1", "-nps", "1"], _env(root), root)
    seg = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(str(prediction / "blob_900.nii.gz")))
    assert seg.shape == (15, 19, 21)
    assert set(np.unique(seg)) <= {0, 1}
