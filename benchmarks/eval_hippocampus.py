"""Hippocampus (MSD Task04) on CPU: plain nnU-Net vs LoG-VMamba at the same short budget.

Steps (all with the stock nnU-Net commands, in a work folder outside the repository):
  1. copy the MSD task (read-only source) and add the empty ``imagesTs`` that the converter needs;
  2. ``nnUNetv2_convert_MSD_dataset`` and ``nnUNetv2_plan_and_preprocess -c 3d_fullres 2d``;
  3. ``nnUNetv2_train 4 3d_fullres FOLD -tr T -device cpu`` for each trainer T and fold (same budget),
     ``--parallel`` of them at a time (one torch thread each), runs that already have a summary kept;
  4. read each fold's validation ``summary.json`` and the training logs, and write a Dice-per-class
     table and the learning curves (losses and nnU-Net's pseudo Dice per epoch), also drawn as TABLE_curves.png.

    python benchmarks/eval_hippocampus.py                         # fold 0, table -> benchmarks/results/hippocampus_cpu.md
    python benchmarks/eval_hippocampus.py --folds 0 1 --parallel 2 # two folds, two trainings at a time
    python benchmarks/eval_hippocampus.py --prepare-only          # only steps 1-2 (plans for bench_network.py)
    python benchmarks/eval_hippocampus.py --plot benchmarks/results/hippocampus_gpu.md   # a table's curves as a PNG
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

from logged_steps import run

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = "/work/shared/data/med/Task04_Hippocampus"
DEFAULT_WORK = "/tmp/nnunet_logmamba_hippocampus"
DEFAULT_TRAINERS = ["nnUNetTrainer_12epochs_25iters", "nnUNetTrainerLoGVMamba_12epochs_25iters"]
DATASET = "Dataset004_Hippocampus"


def nnunet_env(work: str, training: bool = False, threads: int = 1, seed: int | None = None,
               da_processes: int = 0) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(work, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(work, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(work, "nnUNet_results"))
    if training:
        # data augmentation in the main process on a 2-core machine (fewer processes); a GPU needs workers
        env["nnUNet_n_proc_DA"] = str(da_processes)
        # the stock trainer compiles on CUDA and ours does not: compare the same eager networks
        env["nnUNet_compile"] = "f"
        # both budget trainers honour OMP_NUM_THREADS (nnU-Net would use every core, which a shared
        # machine oversubscribes); --threads sets it, the same for every trainer
        env["OMP_NUM_THREADS"] = str(threads)
        if seed is not None:  # paired runs: same conv init and batches for every trainer (budget trainers)
            env["BIOIMAGE_MAMBA_SEED"] = str(seed)
    return env




def prepare(source: str, work: str, log) -> None:
    done = os.path.join(work, "nnUNet_preprocessed", DATASET)
    # the plans are written before the data: an interrupted preprocessing has them and no (or no full) data folder
    if os.path.isfile(os.path.join(done, "nnUNetPlans.json")) and any(
            name.startswith("nnUNetPlans_") and os.listdir(os.path.join(done, name))
            for name in (os.listdir(done) if os.path.isdir(done) else [])):
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


def fold_dir(work: str, trainer: str, configuration: str, fold: int) -> str:
    return os.path.join(work, "nnUNet_results", DATASET, f"{trainer}__nnUNetPlans__{configuration}", f"fold_{fold}")


def summary_path(work: str, trainer: str, configuration: str, fold: int = 0) -> str:
    return os.path.join(fold_dir(work, trainer, configuration, fold), "validation", "summary.json")


def learning_curve(work: str, trainer: str, configuration: str, fold: int) -> list[dict]:
    """Per epoch, from nnU-Net's training logs: train/val loss, pseudo Dice per class, epoch time (s)."""
    epochs: dict[int, dict] = {}
    current = None
    for log in sorted(glob.glob(os.path.join(fold_dir(work, trainer, configuration, fold), "training_log_*.txt"))):
        with open(log) as f:
            for line in f:
                m = re.search(r": Epoch (\d+)\s*$", line)
                if m:
                    current = epochs.setdefault(int(m.group(1)), {"epoch": int(m.group(1))})
                    continue
                if current is None:
                    continue
                for key in ("train_loss", "val_loss"):
                    m = re.search(key + r" (-?[0-9.]+(?:e-?\d+)?)", line)
                    if m:
                        current[key] = float(m.group(1))
                m = re.search(r"Pseudo dice \[(.*)\]", line)
                if m:
                    current["pseudo_dice"] = [float(v) for v in re.findall(r"(-?\d+\.\d+(?:e-?\d+)?|\bnan\b)",
                                                                          m.group(1))]
                m = re.search(r"Epoch time: ([0-9.]+) s", line)
                if m:
                    current["seconds"] = float(m.group(1))
    return [epochs[k] for k in sorted(epochs)]


def training_minutes(work: str, trainer: str, configuration: str, fold: int = 0) -> float:
    """Sum of the epoch times nnU-Net logged (training and its per-epoch validation), minutes."""
    seconds = sum(e.get("seconds", 0.0) for e in learning_curve(work, trainer, configuration, fold))
    return seconds / 60 if seconds else float("nan")


def train_all(jobs: list[tuple[str, int]], args, log) -> None:
    """Run ``nnUNetv2_train`` for every (trainer, fold) without a summary, ``args.parallel`` at a time."""
    pending = [(t, f) for t, f in jobs if not os.path.isfile(summary_path(args.work, t, args.configuration, f))]
    env = nnunet_env(args.work, training=True, threads=args.threads, seed=None if args.seed < 0 else args.seed,
                     da_processes=args.da_processes)
    splits = os.path.join(args.work, "nnUNet_preprocessed", DATASET, "splits_final.json")
    running: list[tuple[subprocess.Popen, list[str]]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            trainer, fold = pending.pop(0)
            continue_flag = ["--c"] if glob.glob(os.path.join(fold_dir(args.work, trainer, args.configuration, fold),
                                                              "checkpoint_latest.pth")) else []
            cmd = ["nnUNetv2_train", "4", args.configuration, str(fold), "-tr", trainer, "-device", args.device,
                   *continue_flag]
            print("+", " ".join(cmd), flush=True)
            log.write("+ " + " ".join(cmd) + "\n")
            log.flush()
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), cmd))
            if not os.path.isfile(splits):
                time.sleep(20)  # staggered: the first run writes splits_final.json
        for proc, cmd in list(running):
            if proc.poll() is not None:
                running.remove((proc, cmd))
                if proc.returncode != 0:
                    sys.exit(f"step failed (exit {proc.returncode}): {' '.join(cmd)}; see {log.name}")
        time.sleep(5)


def is_plain(trainer: str) -> bool:
    """nnU-Net's own trainer (or one of our budget variants of it), the baseline of a comparison."""
    return trainer == "nnUNetTrainer" or trainer.startswith("nnUNetTrainer_")


def write_table(rows: list[dict], labels: dict, out: str, command: str, configuration: str,
                device: str = "cpu") -> None:
    classes = [name for name, value in labels.items() if value != 0]
    folds = sorted({r["fold"] for r in rows})
    how = ("`OMP_NUM_THREADS` torch threads, data augmentation in the main process" if device == "cpu" else
           "nnU-Net's mixed precision (AMP) on the GPU, no torch.compile for either, data augmentation workers")
    lines = [f"# Hippocampus (MSD Task04), {configuration}, validation of fold(s) {', '.join(map(str, folds))}, "
             f"{device.upper()}, short budget", "",
             "Same plans, same budget, same folds; trained and validated with the stock nnU-Net commands "
             "(`nnUNetv2_train 4 " + configuration + f" FOLD -tr TRAINER -device {device}`, {how}).", "",
             "| fold | trainer | " + " | ".join(f"Dice {c}" for c in classes) +
             " | mean Dice | vs plain, same fold and seed | training wall (min) |",
             "|---|---|" + "---|" * (len(classes) + 3)]
    plain = {r["fold"]: r["mean"] for r in rows if is_plain(r["trainer"])}
    for r in rows:
        dice = [r["dice"].get(str(labels[c]), float("nan")) for c in classes]
        delta = "" if is_plain(r["trainer"]) or r["fold"] not in plain else f"{r['mean'] - plain[r['fold']]:+.4f}"
        lines.append(f"| {r['fold']} | {r['trainer']} | " + " | ".join(f"{d:.4f}" for d in dice) +
                     f" | {r['mean']:.4f} | {delta} | {r['minutes']:.1f} |")
    lines += ["", "Budget: the trainers' names say it (epochs x iterations per epoch, batch and patch from the plans); "
              "nnU-Net's default is 1000 x 250, so these numbers compare early training only, not final accuracy. "
              "Training wall time: the sum of the epoch times nnU-Net logged " +
              ("(a shared 2-core machine: compare `benchmarks/bench_network.py` for clean step-time ratios)."
               if device == "cpu" else "(all trainings of the table side by side on one GPU and its CPU cores)."),
              "",
              "## Learning curves", "",
              "Per epoch: training / validation loss (nnU-Net's CE + (-soft Dice), lower is better) and nnU-Net's "
              "pseudo Dice per class on its validation batches.", "",
              f"![learning curves]({os.path.basename(figure_path(out))})", ""]
    for r in rows:
        lines += [f"### fold {r['fold']}, {r['trainer']}", "", "| epoch | train loss | val loss | pseudo Dice |",
                  "|---|---|---|---|"]
        for e in r["curve"]:
            dice = " / ".join(f"{d:.2f}" for d in e.get("pseudo_dice", []))
            lines.append(f"| {e['epoch']} | {e.get('train_loss', float('nan')):.3f} | "
                         f"{e.get('val_loss', float('nan')):.3f} | {dice} |")
        lines.append("")
    lines += ["Reproduce:", "", "    " + command, ""]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, out)
    print("\n".join(lines))


def curves_from_markdown(path: str) -> list[dict]:
    """The learning curves of a table written by :func:`write_table`: [{fold, trainer, curve}], curve as in
    :func:`learning_curve` (epoch, train_loss, val_loss, pseudo_dice)."""
    rows, current = [], None
    with open(path) as f:
        for line in f:
            m = re.match(r"### fold (\d+), (\S+)\s*$", line)
            if m:
                current = {"fold": int(m.group(1)), "trainer": m.group(2), "curve": []}
                rows.append(current)
                continue
            m = re.match(r"\| (\d+) \| (\S+) \| (\S+) \| ([^|]*)\|\s*$", line)
            if current is not None and m:
                dice = [float(v) for v in m.group(4).split("/") if v.strip()]
                current["curve"].append({"epoch": int(m.group(1)), "train_loss": float(m.group(2)),
                                         "val_loss": float(m.group(3)), "pseudo_dice": dice})
    if not rows:
        sys.exit(f"{path} has no learning curves (no '### fold F, TRAINER' sections written by this script)")
    return rows


def plot_learning_curves(rows: list[dict], path: str, title: str = "") -> str:
    """A PNG with one column per fold: nnU-Net's pseudo Dice (mean over classes) and the validation loss per
    epoch, one line per trainer (plain nnU-Net dashed). Written to a temporary name, then renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = sorted({r["fold"] for r in rows})
    fig, axes = plt.subplots(2, len(folds), figsize=(5.2 * len(folds), 6.4), squeeze=False, sharex="col")
    for col, fold in enumerate(folds):
        for r in (r for r in rows if r["fold"] == fold):
            epochs = [e["epoch"] for e in r["curve"]]
            dice = [sum(e["pseudo_dice"]) / len(e["pseudo_dice"]) if e.get("pseudo_dice") else float("nan")
                    for e in r["curve"]]
            style = dict(ls="--", color="0.35") if is_plain(r["trainer"]) else dict(lw=1.8)
            axes[0, col].plot(epochs, dice, label=r["trainer"], **style)
            axes[1, col].plot(epochs, [e.get("val_loss", float("nan")) for e in r["curve"]], **style)
        axes[0, col].set_title(f"fold {fold}")
        axes[0, col].set_ylabel("pseudo Dice (mean of classes)")
        axes[1, col].set_ylabel("validation loss")
        axes[1, col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def figure_path(table: str) -> str:
    return os.path.splitext(table)[0] + "_curves.png"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--work", default=None,
                        help=f"work folder (default {DEFAULT_WORK}, with _DEVICE appended off the CPU, so that "
                             "--c never continues a training of another device)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hippocampus_cpu.md"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training (OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0,
                        help="BIOIMAGE_MAMBA_SEED for every training (same conv init and batches for all trainers: "
                             "a paired comparison); -1 leaves nnU-Net unseeded")
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=1, help="trainings run at the same time")
    parser.add_argument("--da-processes", type=int, default=0,
                        help="nnU-Net data augmentation workers per training (0: in the main process, for CPU runs)")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--plot", nargs="+", metavar="TABLE",
                        help="only draw the learning curves of tables this script wrote (TABLE_curves.png)")
    args = parser.parse_args(argv)
    if args.plot:
        for table in args.plot:
            print(plot_learning_curves(curves_from_markdown(table), figure_path(table)))
        return
    if args.work is None:
        args.work = DEFAULT_WORK if args.device == "cpu" else f"{DEFAULT_WORK}_{args.device}"
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "eval.log"), "a") as log:
        prepare(args.source, args.work, log)
        if args.prepare_only:
            return
        train_all([(t, f) for f in args.folds for t in args.trainers], args, log)
        rows = []
        for fold in args.folds:
            for trainer in args.trainers:
                with open(summary_path(args.work, trainer, args.configuration, fold)) as f:
                    s = json.load(f)
                rows.append({"trainer": trainer, "fold": fold,
                             "minutes": training_minutes(args.work, trainer, args.configuration, fold),
                             "curve": learning_curve(args.work, trainer, args.configuration, fold),
                             "dice": {k: v["Dice"] for k, v in s["mean"].items()},
                             "mean": s["foreground_mean"]["Dice"]})
    with open(os.path.join(args.work, "nnUNet_raw", DATASET, "dataset.json")) as f:
        labels = json.load(f)["labels"]
    command = "python benchmarks/eval_hippocampus.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(rows, labels, args.out, command.strip(), args.configuration, args.device)
    print(plot_learning_curves(rows, figure_path(args.out), f"Hippocampus, {args.configuration}, {args.device}"))


if __name__ == "__main__":
    main()
