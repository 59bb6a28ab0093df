"""Downstream segmentation: does isotropic reconstruction help nnU-Net segment volume EM?

Two datasets (``--dataset``), one command per step (printed as it runs; logs in WORK/eval.log), all outside
the repository in --work.

fib25 (default): membranes of FIB-25 cube 2 (isotropic 10 nm, labels = boundaries of its neuron ids).
  1. crop the cube and its neuron ids to a multiple of K along Z (plus --crop, for smoke runs);
  2. ``vemamba_iso_degrade --factor K`` with the model's degradation (the shipped model: keep every K-th Z slice);
  3. inputs on the isotropic grid: ``vemamba_iso_predict`` (vemamba), ``vemamba_iso_interpolate --method
     linear`` (linear) and the isotropic cube itself (groundtruth, the upper bound);
vnc: mitochondria of the Drosophila VNC ssTEM stack 1 (20 sections of 50 nm, 4.6 nm pixels, labels on the
  sections only); needs a model trained for it (``--model DIR --factor K``, K about 10).
  1. crop the stack and its labels (--crop, in sections for Z);
  2. no degradation: the stack is anisotropic already;
  3. inputs: ``vemamba_iso_predict`` (vemamba), ``vemamba_iso_interpolate`` (linear), both on a K times
     finer Z grid where only every K-th slice is labelled (``--sparse-labels K``: the others get nnU-Net's
     ignore label, skipped by training and evaluation), and the anisotropic stack itself (anisotropic,
     the baseline without reconstruction; its cases are K times thinner in Z). The grid is the model's: one
     trained on area-averaged degradations (realistic, average_pool) centres section j on slice
     j*K + (K - 1) / 2, so the labels go to slice j*K + (K - 1) // 2 and linear interpolation uses the same grid;
both:
  4. ``vemamba_iso_to_nnunet --test-fraction F`` for each input, same labels and case names, so every
     dataset holds out the same region (the last F of X) as imagesTs/labelsTs;
  5. ``nnUNetv2_plan_and_preprocess -c 3d_fullres``, ``nnUNetv2_train ID 3d_fullres all -tr TRAINER``,
     ``nnUNetv2_predict`` on imagesTs, ``nnUNetv2_evaluate_simple labelsTs pred -l 1 [-il IGNORE]``;
  6. a table (input, PSNR of the input vs the ground truth where there is one, Dice and IoU of class 1 on
     the held-out region) at --out, and the same as JSON next to it.

    python benchmarks/eval_downstream.py                       # fib25, table -> benchmarks/results/downstream_fib25.md
    python benchmarks/eval_downstream.py --inputs vemamba linear --threads 2
    python benchmarks/eval_downstream.py --dataset vnc --model VNC_X10_MODEL --factor 10 --subvolume 40 160 160
    python benchmarks/eval_downstream.py --crop 64 96 96 --subvolume 32 48 48 \\
        --trainer nnUNetTrainerLoGVMamba_1epoch_2iters --work /tmp/downstream_smoke --out /tmp/downstream_smoke.md

A rerun skips every step whose output exists (--no-skip-existing redoes them); the settings that shape
the outputs are recorded in WORK/settings.json and a rerun with other settings is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from logged_steps import run

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = "/work/shared/data/em"
INPUTS = ("vemamba", "linear", "groundtruth", "anisotropic")   # order fixes the dataset ids: base + index
CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class Source:
    """A labelled EM volume; ``isotropic`` ones are degraded first and are their own ground truth."""
    image: str
    labels: str
    isotropic: bool
    voxel_size: tuple           # (z, y, x) nm, used where the files carry none
    label_names: tuple          # background first
    from_instances: bool        # labels are instance ids: class 1 = their boundaries
    dataset_prefix: str
    id_base: int


SOURCES = {
    "fib25": Source(os.path.join(DATA, "fib25_cube2_10nm_iso.tif"), os.path.join(DATA, "fib25_cube2_neuron_ids.tif"),
                    True, (10.0, 10.0, 10.0), ("background", "membrane"), True, "FIB25Membranes", 610),
    "vnc": Source(os.path.join(DATA, "vnc_stack1_raw_4.6x4.6x50nm.tif"), os.path.join(DATA, "vnc_stack1_mito.tif"),
                  False, (50.0, 4.6, 4.6), ("background", "mitochondria"), False, "VNCMito", 620),
}


def nnunet_env(work: str, training: bool = False, threads: int = 1) -> dict:
    env = dict(os.environ)
    # the commands of the environment this script runs in, activated or not
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(nnUNet_raw=os.path.join(work, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(work, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(work, "nnUNet_results"), OMP_NUM_THREADS=str(threads))
    if training:
        env["nnUNet_n_proc_DA"] = "0"  # data augmentation in the main process (crashes planning, so training only)
    return env




def tool(entry_point: str, module: str) -> list[str]:
    """The installed console script, or ``python -m module`` where it is not (yet) declared."""
    found = shutil.which(entry_point, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [found] if found else [sys.executable, "-m", module]


def dataset_name(source: Source, input_name: str) -> str:
    return source.dataset_prefix + input_name.capitalize()


def check_settings(work: str, settings: dict) -> None:
    path = os.path.join(work, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            sys.exit(f"{work} was made with other settings ({before}); now {settings}: use another --work "
                     "or delete it")
    else:
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)


def prepare_volumes(args, source: Source, work: str) -> tuple[str, str, bool]:
    """Crop the image and its labels (``--crop`` from the origin; an isotropic volume also Z to a multiple
    of K) into ``work``, with the source's voxel size where the files carry none."""
    from vemamba_iso.data import read_volume, write_volume
    image_path, labels_path = os.path.join(work, "image.tif"), os.path.join(work, "labels.tif")
    if args.skip_existing and os.path.isfile(image_path) and os.path.isfile(labels_path):
        return image_path, labels_path, False
    image, labels = read_volume(args.image or source.image), read_volume(args.labels or source.labels)
    if image.data.shape != labels.data.shape:
        sys.exit(f"image {image.data.shape} and labels {labels.data.shape} differ in shape")
    crop = [min(c, s) for c, s in zip(args.crop or image.data.shape, image.data.shape)]
    if source.isotropic:
        crop[0] = crop[0] // args.factor * args.factor
    region = tuple(slice(0, c) for c in crop)
    voxel_size = image.voxel_size or labels.voxel_size or source.voxel_size
    print(f"volumes: {image.data.shape} cropped to {tuple(crop)}, voxel size {voxel_size} nm")
    # no voxel size on the labels: ImageJ TIFF (which carries it) has no uint32 for neuron ids, and the
    # datasets take the spacing from the image
    write_volume(labels_path, np.ascontiguousarray(labels.data[region]))
    write_volume(image_path, np.ascontiguousarray(image.data[region]), voxel_size)
    return image_path, labels_path, True


def model_grid(model: str | None) -> tuple[str, int]:
    """(degradation preset, image slice of section 0 in the reconstructed grid) of a vemamba_iso model.

    A model trained on area-averaged degradations (average_pool, realistic) reconstructs a section as the
    mean of its K slices, centred at (K - 1) / 2: the interpolation baseline is put on the same grid (the same
    preset) and the sparse labels on slice j*K + (K - 1) // 2."""
    from vemamba_iso.degradation import sample_offset
    from vemamba_iso.training.checkpoint import METADATA_FILE, resolve_model_dir
    with open(resolve_model_dir(model).parent / METADATA_FILE) as f:
        degradation = json.load(f)["degradation"]
    return degradation["preset"], int(sample_offset(degradation["factor"], degradation["downsampling"]))


def make_input(name: str, args, work: str, image_path: str, coarse: str, redo: bool, log) -> tuple[str, bool]:
    """(path, whether it was made now) of the input volume ``name`` from the (degraded or acquired)
    coarse stack; the ground truth and the anisotropic stack are used as they are."""
    path = image_path if name in ("groundtruth", "anisotropic") else os.path.join(work, f"input_{name}.tif")
    if name in ("groundtruth", "anisotropic") or not redo and os.path.isfile(path):
        return path, redo
    env = nnunet_env(work, threads=args.threads)
    if name == "vemamba":
        cmd = tool("vemamba_iso_predict", "vemamba_iso.cli.predict") + [
            "--input", coarse, "--output", path, "--factor", str(args.factor), "--threads", str(args.threads),
            "--overwrite"]
        run(cmd + (["--model", args.model] if args.model else []), env, log)
    elif name == "linear":
        run(tool("vemamba_iso_interpolate", "vemamba_iso.cli.interpolate") + [
            "--input", coarse, "--output", path, "--factor", str(args.factor), "--method", "linear",
            "--degradation", model_grid(args.model)[0], "--overwrite"], env, log)
    return path, True


def segment(name: str, source: Source, image: str, labels: str, args, work: str, redo: bool, log) -> dict:
    """Dataset -> plan -> train -> predict -> evaluate for one input; returns its scores and timings.

    A step runs when its output is missing or ``redo`` is set; once one runs, all later ones do (their
    outputs would be stale)."""
    env = nnunet_env(work, threads=args.threads)
    dataset_id = source.id_base + INPUTS.index(name)
    folder = os.path.join(work, "nnUNet_raw", f"Dataset{dataset_id:03d}_{dataset_name(source, name)}")
    did = str(dataset_id)
    # reconstructed anisotropic stacks: labels on every K-th slice only, the rest is the ignore label
    sparse = not source.isotropic and name != "anisotropic"
    subvolume = list(args.subvolume)
    if name == "anisotropic":
        subvolume[0] = -(-subvolume[0] // args.factor)   # the same region in the coarse stack
    timings = {}
    if redo or not os.path.isfile(os.path.join(folder, "dataset.json")):
        redo = True
        run(tool("vemamba_iso_to_nnunet", "vemamba_iso.cli.to_nnunet") + [
            "--image", image, "--labels", labels, *(["--from-instances"] if source.from_instances else []),
            *(["--sparse-labels", str(args.factor), "--section-offset", str(model_grid(args.model)[1])]
              if sparse else []), "--dataset-id", did,
            "--name", dataset_name(source, name), "--label-names", *source.label_names,
            "--subvolume", *map(str, subvolume), "--test-fraction", str(args.test_fraction),
            "--case-prefix", args.dataset, "--nnunet-raw", env["nnUNet_raw"], "--overwrite"], env, log)
    preprocessed = os.path.join(work, "nnUNet_preprocessed", os.path.basename(folder))
    if redo or not os.path.isdir(os.path.join(preprocessed, "nnUNetPlans_" + CONFIGURATION)):
        redo = True
        timings["plan_s"] = run(["nnUNetv2_plan_and_preprocess", "-d", did, "-c", CONFIGURATION,
                                 "--verify_dataset_integrity", "-np", "1"], env, log)
    with open(os.path.join(preprocessed, "nnUNetPlans.json")) as f:
        plan = json.load(f)["configurations"][CONFIGURATION]
    trained = os.path.join(work, "nnUNet_results", os.path.basename(folder),
                           f"{args.trainer}__nnUNetPlans__{CONFIGURATION}", "fold_all", "checkpoint_final.pth")
    if redo or not os.path.isfile(trained):
        redo = True
        timings["train_s"] = run(["nnUNetv2_train", did, CONFIGURATION, "all", "-tr", args.trainer,
                                  "-device", args.device], nnunet_env(work, training=True, threads=args.threads), log)
    prediction = os.path.join(work, "predictions", args.trainer, name)
    test_images = os.path.join(folder, "imagesTs")
    expected = len(os.listdir(os.path.join(folder, "labelsTs")))
    done = os.path.isdir(prediction) and len([p for p in os.listdir(prediction) if p.endswith(".nii.gz")]) == expected
    if redo or not done:
        redo = True
        timings["predict_s"] = run(["nnUNetv2_predict", "-i", test_images, "-o", prediction, "-d", did,
                                    "-c", CONFIGURATION, "-f", "all", "-tr", args.trainer, "-device", args.device,
                                    "--disable_tta", "-npp", "1", "-nps", "1"], env, log)
    summary = os.path.join(prediction, "summary.json")
    if redo or not os.path.isfile(summary):
        ignore = ["-il", str(len(source.label_names))] if sparse else []
        run(["nnUNetv2_evaluate_simple", os.path.join(folder, "labelsTs"), prediction, "-l", "1", *ignore,
             "-np", "1", "-o", summary], env, log)
    with open(summary) as f:
        scores = json.load(f)["mean"]["1"]
    return {"input": name, "dataset_id": dataset_id, "sparse_labels": sparse, "subvolume": subvolume,
            "dice": scores["Dice"], "iou": scores["IoU"],
            "patch_size": plan["patch_size"], "batch_size": plan["batch_size"],
            "training_cases": len(os.listdir(os.path.join(folder, "labelsTr"))), "test_cases": expected, **timings}


def input_psnr(path: str, gt_path: str | None) -> float | None:
    """PSNR (dB) of an input against the ground truth over the whole volume; None without one."""
    if gt_path is None or os.path.samefile(path, gt_path):
        return None
    from vemamba_iso.data import read_volume
    from vemamba_iso.evaluation.evaluate import data_range_of
    from vemamba_iso.evaluation.metrics import psnr
    estimate, gt = read_volume(path).data, read_volume(gt_path).data
    if estimate.shape != gt.shape:
        sys.exit(f"{path} has shape {estimate.shape}, the ground truth {gt.shape}: the input is not on its grid")
    return psnr(estimate.astype(np.float32), gt.astype(np.float32), data_range_of(gt))


TITLES = {"fib25": "membrane segmentation on FIB-25 cube 2 (degraded x{factor} along Z)",
          "vnc": "mitochondria segmentation on the Drosophila VNC stack 1 (reconstructed x{factor} along Z)"}


def write_outputs(rows: list[dict], settings: dict, source: Source, out: str, command: str) -> None:
    cls = source.label_names[1]
    lines = [f"# Downstream {TITLES[settings['dataset']].format(factor=settings['factor'])}", "",
             f"nnU-Net `{CONFIGURATION}`, trainer `{settings['trainer']}`, fold `all`, trained on the first "
             f"{1 - settings['test_fraction']:.0%} of X and tested on the last {settings['test_fraction']:.0%} "
             "(the same region and labels for every input).", "",
             f"| input | PSNR vs ground truth (dB) | {cls} Dice | {cls} IoU | training / test cases | planned patch (batch) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        quality = "(reference)" if r["input"] == "groundtruth" else "n/a" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        lines.append(f"| {r['input']} | {quality} | {r['dice']:.4f} | {r['iou']:.4f} | {r['training_cases']} / "
                     f"{r['test_cases']} | {r['patch_size']} ({r['batch_size']}) |")
    notes = {"fib25": f"Inputs: the isotropic cube degraded x{settings['factor']} (every {settings['factor']}th Z slice "
                      "kept) brought back to the isotropic grid by the model and by linear interpolation, and the "
                      "cube itself (upper bound). Labels: boundaries of the neuron ids.",
             "vnc": "Inputs: the anisotropic stack reconstructed by the model and by linear interpolation (labels on "
                    "the original sections only, the slices in between ignored in training and evaluation), and the "
                    "stack itself. PSNR needs an isotropic ground truth, which this stack lacks."}
    lines += ["", notes[settings["dataset"]], f"Case size {rows[0]['subvolume']} voxels (Z, Y, X). Short budgets "
              "compare early training only, not final accuracy.", "", "Reproduce:", "", "    " + command, ""]
    for path, text in ((out, "\n".join(lines)),
                       (os.path.splitext(out)[0] + ".json", json.dumps({"settings": settings, "rows": rows}, indent=2))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="fib25", choices=sorted(SOURCES))
    parser.add_argument("--image", default=None, help="EM volume (default: the dataset's)")
    parser.add_argument("--labels", default=None, help="its labels (default: the dataset's)")
    parser.add_argument("--work", default=None, help="working folder (default /tmp/vemamba_iso_downstream_DATASET)")
    parser.add_argument("--inputs", nargs="+", default=None, choices=INPUTS,
                        help="default: vemamba linear groundtruth (fib25), vemamba linear anisotropic (vnc)")
    parser.add_argument("--factor", type=int, default=4, help="reconstruction factor along Z (the model's)")
    parser.add_argument("--model", default=None, help="vemamba_iso model directory (default: the shipped x4 model)")
    parser.add_argument("--trainer", default="nnUNetTrainerLoGVMamba_4epochs_25iters")
    parser.add_argument("--subvolume", type=int, nargs=3, default=[64, 96, 96], metavar=("Z", "Y", "X"),
                        help="nnU-Net case size in voxels of the isotropic grid")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out last fraction of X")
    parser.add_argument("--crop", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="use only this corner of the volume (smoke runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) of every step")
    parser.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True,
                        help="skip steps whose outputs exist, so a rerun continues")
    parser.add_argument("--out", default=None, help="table (default benchmarks/results/downstream_DATASET.md)")
    args = parser.parse_args(argv)
    source = SOURCES[args.dataset]
    inputs = args.inputs or ["vemamba", "linear", "groundtruth" if source.isotropic else "anisotropic"]
    wrong = {"groundtruth"} if not source.isotropic else {"anisotropic"}
    if wrong & set(inputs):
        parser.error(f"--inputs {' '.join(wrong)} does not apply to --dataset {args.dataset}")
    if args.dataset == "vnc" and "vemamba" in inputs and not args.model:
        parser.error("--dataset vnc needs --model: a model trained on the VNC stack for --factor (the shipped one "
                     "is FIB-25 x4)")
    work = os.path.abspath(args.work or f"/tmp/vemamba_iso_downstream_{args.dataset}")
    out = args.out or os.path.join(HERE, "results", f"downstream_{args.dataset}.md")
    os.makedirs(work, exist_ok=True)
    settings = {"dataset": args.dataset, "image": args.image or source.image, "labels": args.labels or source.labels,
                "factor": args.factor, "crop": args.crop, "model": args.model, "subvolume": args.subvolume,
                "test_fraction": args.test_fraction}
    check_settings(work, settings)
    settings["trainer"] = args.trainer      # trainers share the datasets of one work folder
    t0 = time.time()
    with open(os.path.join(work, "eval.log"), "a") as log:
        image_path, labels_path, redo = prepare_volumes(args, source, work)
        coarse = image_path
        if source.isotropic:
            coarse = os.path.join(work, f"degraded_x{args.factor}.tif")
            if {"vemamba", "linear"} & set(inputs) and (redo or not os.path.isfile(coarse)):
                redo = True
                run(tool("vemamba_iso_degrade", "vemamba_iso.cli.degrade") + [
                    "--input", image_path, "--factor", str(args.factor), "--degradation", model_grid(args.model)[0],
                    "--output", coarse, "--overwrite"], nnunet_env(work, threads=args.threads), log)
        rows = []
        for name in inputs:
            image, made = make_input(name, args, work, image_path, coarse, redo, log)
            row = segment(name, source, image, labels_path, args, work, made, log)
            row["psnr_db"] = input_psnr(image, image_path if source.isotropic else None)
            rows.append(row)
    print(f"pipeline wall time {time.time() - t0:.0f} s")
    command = "python benchmarks/eval_downstream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_outputs(rows, settings, source, out, command.strip())


if __name__ == "__main__":
    main()
