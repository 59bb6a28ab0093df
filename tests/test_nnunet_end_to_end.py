"""End to end with the stock nnU-Net commands in a clean environment (CPU): 2d and 3d_fullres with the
default planner, 3d_lowres with the residual-encoder planner (``nnUNetPlannerResEncM``).

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


def _as_one_optimiser_group(checkpoint: dict) -> dict:
    """The checkpoint's SGD state as releases before the parameter groups wrote it: one group, parameters
    numbered in the network's order."""
    from nnunet_logmamba.training.from_plain import build_trainer_network
    from nnunet_logmamba.training.optimizer_groups import parameter_groups
    from nnunet_logmamba.training.trainers import nnUNetTrainerLoGVMamba
    args = checkpoint["init_args"]
    network = build_trainer_network(checkpoint["trainer_name"], args["plans"], args["configuration"],
                                    args["dataset_json"])
    position = {id(p): i for i, p in enumerate(network.parameters())}
    grouped = [p for g in parameter_groups(network, 3e-5, nnUNetTrainerLoGVMamba.readout_lr_scale) for p in g["params"]]
    saved = checkpoint["optimizer_state"]
    assert len(grouped) == sum(len(g["params"]) for g in saved["param_groups"])
    group = {k: v for k, v in saved["param_groups"][0].items() if k not in ("params", "lr_scale")}
    return {"state": {position[id(grouped[i])]: state for i, state in saved["state"].items()},
            "param_groups": [{**group, "params": list(range(len(grouped)))}]}


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
    if configuration == "3d_fullres":  # --c goes through the trainer's load_checkpoint (optimiser regrouping)
        (fold / "validation" / "summary.json").unlink()
        _run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu", "--c"],
             _env(root, training=True), root)
        assert (fold / "validation" / "summary.json").is_file()
        # a checkpoint of an earlier release (nnU-Net's single optimiser group): --c keeps each parameter's momentum
        before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        torch.save({**before, "optimizer_state": _as_one_optimiser_group(before)}, fold / "checkpoint_final.pth")
        (fold / "validation" / "summary.json").unlink()
        _run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu", "--c"],
             _env(root, training=True), root)
        assert (fold / "validation" / "summary.json").is_file()
        after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["optimizer_state"]
        assert len(after["param_groups"]) == len(before["optimizer_state"]["param_groups"]) == 3
        for regrouped, original in zip(after["param_groups"], before["optimizer_state"]["param_groups"]):
            assert regrouped["params"] == original["params"]
            assert (regrouped["weight_decay"], regrouped.get("lr_scale")) == (original["weight_decay"],
                                                                               original.get("lr_scale"))
        assert after["state"].keys() == before["optimizer_state"]["state"].keys()
        for index, state in before["optimizer_state"]["state"].items():
            assert torch.equal(after["state"][index]["momentum_buffer"], state["momentum_buffer"]), index

    prediction = root / f"pred_{configuration}"
    _run(["nnUNetv2_predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(prediction),
          "-d", str(DATASET_ID), "-c", configuration, "-f", "0", "-tr", TRAINER, "-device", "cpu",
          "--disable_tta", "-npp", "1", "-nps", "1"], _env(root), root)
    seg = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(str(prediction / "blob_900.nii.gz")))
    assert seg.shape == (15, 19, 21)
    assert set(np.unique(seg)) <= {0, 1}


LOWRES_ID = 986
LOWRES_DATASET = f"Dataset{LOWRES_ID}_LoGVMambaLowres"
LOWRES_PLANS = "TinyResEncM"


@pytest.fixture(scope="module")
def planned_lowres(tmp_path_factory):
    """Cases large enough for nnU-Net to add a 3d_lowres configuration, planned with ResEnc M.

    A tiny GPU memory target shrinks the planned patch to about 16x32x28, so that 48x80x72 images are
    more than 4x the patch and nnU-Net plans a downsampled 3d_lowres stage (and keeps the run cheap).
    """
    root = tmp_path_factory.mktemp("nnunet_lowres")
    raw = root / "raw" / LOWRES_DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        image, label = _case(rng, shape=(48, 80, 72))
        _write(image, raw / "imagesTr" / f"blob_{i:03d}_0000.nii.gz")
        _write(label, raw / "labelsTr" / f"blob_{i:03d}.nii.gz")
    test_image, _ = _case(rng, shape=(47, 78, 75))
    _write(test_image, raw / "imagesTs" / "blob_900_0000.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": 5,
        "file_ending": ".nii.gz"}))
    # 3d_fullres is preprocessed too: validating a lowres stage also exports for the cascade's next stage
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(LOWRES_ID), "-pl", "nnUNetPlannerResEncM",
          "-gpu_memory_target", "0.05", "-overwrite_plans_name", LOWRES_PLANS, "-c", "3d_fullres", "3d_lowres",
          "-np", "1", "-npfp", "1"], _env(root), root)
    return root


def test_lowres_stage_with_residual_encoder_plans(planned_lowres):
    root = planned_lowres
    plans = json.loads((root / "preprocessed" / LOWRES_DATASET / f"{LOWRES_PLANS}.json").read_text())
    lowres = plans["configurations"]["3d_lowres"]
    assert lowres["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert lowres["spacing"][0] > plans["configurations"]["3d_fullres"]["spacing"][0]
    out = _run(["nnUNetv2_train", str(LOWRES_ID), "3d_lowres", "0", "-tr", TRAINER, "-p", LOWRES_PLANS,
                "-device", "cpu"], _env(root, training=True), root)
    assert "ext_trainers" in out
    fold = root / "results" / LOWRES_DATASET / f"{TRAINER}__{LOWRES_PLANS}__3d_lowres" / "fold_0"
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "LoG-VMamba blocks" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(".mamba." in k for k in checkpoint["network_weights"])
    assert any(k.startswith("encoder.stages") and "blocks" in k for k in checkpoint["network_weights"])

    prediction = root / "pred_lowres"
    _run(["nnUNetv2_predict", "-i", str(root / "raw" / LOWRES_DATASET / "imagesTs"), "-o", str(prediction),
          "-d", str(LOWRES_ID), "-c", "3d_lowres", "-p", LOWRES_PLANS, "-f", "0", "-tr", TRAINER, "-device", "cpu",
          "--disable_tta", "-npp", "1", "-nps", "1"], _env(root), root)
    seg = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(str(prediction / "blob_900.nii.gz")))
    assert seg.shape == (47, 78, 75)
    assert set(np.unique(seg)) <= {0, 1}


def test_a_trained_plain_nnunet_starts_a_log_vmamba_training(planned):
    """from-plain, then the stock ``nnUNetv2_train -pretrained_weights`` (fold 1: the test above uses fold 0)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root = planned
    plans = json.loads((root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((root / "preprocessed" / DATASET / "dataset.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    plain = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                   1, 2, allow_init=True, deep_supervision=True)
    # the fields of a plain nnUNetTrainer checkpoint that rebuilding its network needs
    plain_checkpoint = root / "plain_checkpoint_final.pth"
    torch.save({"network_weights": plain.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 1,
                              "dataset_json": dataset_json, "device": torch.device("cpu")}}, plain_checkpoint)
    start = root / "plain_start.pth"
    convert = [str(BIN / "nnunet_logmamba"), "from-plain", str(plain_checkpoint), str(start), "-tr", TRAINER]
    proc = subprocess.run(convert, env=_env(root), cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"nnUNetv2_train {DATASET} 3d_fullres FOLD -tr {TRAINER} -p nnUNetPlans -pretrained_weights" in proc.stdout
    again = subprocess.run(convert, env=_env(root), cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    ours = subprocess.run([*convert[:2], str(start), str(root / "twice.pth"), "-tr", TRAINER], env=_env(root),
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert ours.returncode == 2 and "already holds LoG-VMamba blocks" in ours.stderr
    assert not (root / "twice.pth").exists()

    out = _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "1", "-tr", TRAINER, "-device", "cpu",
                "-pretrained_weights", str(start)], _env(root, training=True), root)
    assert "Loading pretrained weights" in out
    fold = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_1"
    assert (fold / "checkpoint_final.pth").is_file()
