"""Hippocampus (MSD Task04) on CPU: plain nnU-Net vs LoG-VMamba at the same short budget.

Steps (all with the stock nnU-Net commands, in a work folder outside the repository):
  1. copy the MSD task (read-only source) and add the empty ``imagesTs`` that the converter needs;
  2. ``nnUNetv2_convert_MSD_dataset`` and ``nnUNetv2_plan_and_preprocess -c 3d_fullres 2d``;
  3. ``nnUNetv2_train 4 3d_fullres 0 -tr T -device cpu`` for each trainer T (same epochs/iterations);
  4. read fold 0's validation ``summary.json`` and write a Dice-per-class table.

    python benchmarks/eval_hippocampus.py                # everything, table -> benchmarks/results/hippocampus_cpu.md
    python benchmarks/eval_hippocampus.py --prepare-only # only steps 1-2 (plans for bench_network.py)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from logged_steps import run

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = "/work/shared/data/med/Task04_Hippocampus"
DEFAULT_WORK = "/tmp/nnunet_logmamba_hippocampus"
DEFAULT_TRAINERS = ["nnUNetTrainer_12epochs_25iters", "nnUNetTrainerLoGVMamba_12epochs_25iters"]
DATASET = "Dataset004_Hippocampus"


def nnunet_env(work: str, training: bool = False, threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(work, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(work, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(work, "nnUNet_results"))
    if training:
        env["nnUNet_n_proc_DA"] = "0"  # data augmentation in the main process: 2-core machine, fewer processes
        # both budget trainers honour OMP_NUM_THREADS (nnU-Net would use every core, which a shared
        # machine oversubscribes); --threads sets it, the same for every trainer
        env["OMP_NUM_THREADS"] = str(threads)
    return env




def prepare(source: str, work: str, log) -> None:
    if os.path.isfile(os.path.join(work, "nnUNet_preprocessed", DATASET, "nnUNetPlans.json")):
        print("already prepared:", work)
        return
    if not os.path.isfile(os.path.join(source, "dataset.json")):
        sys.exit(f"{source} is not an MSD task folder (no dataset.json); pass --source")
    copy = os.path.join(work, "msd", "Task04_Hippocampus")
    os.makedirs(os.path.join(copy, "imagesTs"), exist_ok=True)
    for name in ("imagesTr", "labelsTr"):
        if not os.path.isdir(os.path.join(copy, name)):
            shutil.copytree(os.path.join(source, name), os.path.join(copy, name))
    shutil.copy(os.path.join(source, "dataset.json"), copy)
    env = nnunet_env(work)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    run(["nnUNetv2_convert_MSD_dataset", "-i", copy, "-np", "1"], env, log)
    run(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "2d", "-np", "1",
         "--verify_dataset_integrity"], env, log)


def summary_path(work: str, trainer: str, configuration: str) -> str:
    return os.path.join(work, "nnUNet_results", DATASET, f"{trainer}__nnUNetPlans__{configuration}", "fold_0",
                        "validation", "summary.json")


def training_minutes(work: str, trainer: str, configuration: str) -> float:
    """Sum of the epoch times nnU-Net logged for fold 0 (training and its per-epoch validation), minutes."""
    import glob
    import re

    fold = os.path.dirname(os.path.dirname(summary_path(work, trainer, configuration)))
    seconds = 0.0
    for log in glob.glob(os.path.join(fold, "training_log_*.txt")):
        with open(log) as f:
            seconds += sum(float(m) for m in re.findall(r"Epoch time: ([0-9.]+) s", f.read()))
    return seconds / 60 if seconds else float("nan")


def write_table(rows: list[dict], labels: dict, out: str, command: str, configuration: str) -> None:
    classes = [name for name, value in labels.items() if value != 0]
    lines = [f"# Hippocampus (MSD Task04), {configuration}, fold 0 validation, CPU, short budget", "",
             "Same plans, same budget, same fold; trained and validated with the stock nnU-Net commands "
             "(`nnUNetv2_train 4 " + configuration + " 0 -tr TRAINER -device cpu`, `OMP_NUM_THREADS` torch threads, "
             "data augmentation in the main process).", "",
             "| trainer | " + " | ".join(f"Dice {c}" for c in classes) + " | mean Dice | training wall (min) |",
             "|---|" + "---|" * (len(classes) + 2)]
    for r in rows:
        dice = [r["dice"].get(str(labels[c]), float("nan")) for c in classes]
        lines.append(f"| {r['trainer']} | " + " | ".join(f"{d:.4f}" for d in dice) +
                     f" | {r['mean']:.4f} | {r['minutes']:.1f} |")
    lines += ["", "Budget: the trainers' names say it (epochs x iterations per epoch, batch and patch from the plans); "
              "nnU-Net's default is 1000 x 250, so these numbers compare early training only, not final accuracy. "
              "Training wall time: the sum of the epoch times nnU-Net logged (a shared 2-core machine: compare "
              "`benchmarks/bench_network.py` for clean step-time ratios).",
              "", "Reproduce:", "", "    " + command, ""]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, out)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--work", default=DEFAULT_WORK)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hippocampus_cpu.md"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training (OMP_NUM_THREADS)")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "eval.log"), "a") as log:
        prepare(args.source, args.work, log)
        if args.prepare_only:
            return
        rows = []
        for trainer in args.trainers:
            summary = summary_path(args.work, trainer, args.configuration)
            if not os.path.isfile(summary):
                run(["nnUNetv2_train", "4", args.configuration, "0", "-tr", trainer, "-device", args.device],
                    nnunet_env(args.work, training=True, threads=args.threads), log)
            minutes = training_minutes(args.work, trainer, args.configuration)
            with open(summary) as f:
                s = json.load(f)
            rows.append({"trainer": trainer, "minutes": minutes,
                         "dice": {k: v["Dice"] for k, v in s["mean"].items()},
                         "mean": s["foreground_mean"]["Dice"]})
    with open(os.path.join(args.work, "nnUNet_raw", DATASET, "dataset.json")) as f:
        labels = json.load(f)["labels"]
    command = "python benchmarks/eval_hippocampus.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(rows, labels, args.out, command.strip(), args.configuration)


if __name__ == "__main__":
    main()
