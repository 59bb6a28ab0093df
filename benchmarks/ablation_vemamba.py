"""VEMamba ablation at equal training steps: the paper's scan form against one component removed at a time.

Variants (all trained with ``vemamba_iso_train`` on FIB-25 cube 1 from scratch, same seed, steps and budget):

    paper        4 paths per chunk, DWAM weights from the restored paths, MoCo degradation prior (the default)
    2-path       one lateral order per chunk (``--scan-paths 2``): the ALCSSM ablation
    sum          the paths added with equal weights (``--aggregation sum``): the DWAM ablation
    no-prior     no degradation encoder / VDIM (``--no-degradation-encoder``): the MoCo ablation

Each model reconstructs FIB-25 cube 2 (degraded by keeping every k-th Z slice; a central crop with ``--crop``)
and is compared with linear interpolation. Writes ``benchmarks/results/vemamba_ablation.md`` (+ ``.json``).

    python benchmarks/ablation_vemamba.py --steps 600 --work /tmp/vemamba_ablation
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from logged_steps import run  # noqa: E402

VARIANTS = {
    "paper": [],
    "2-path": ["--scan-paths", "2"],
    "sum": ["--aggregation", "sum"],
    "no-prior": ["--no-degradation-encoder"],
}
PAPER_DELTAS = {"2-path": 0.07, "sum": 0.06, "no-prior": 0.05}   # dB the paper loses without each component


def central_crop(volume, size: int):
    starts = [max(0, (s - size) // 2) for s in volume.shape]
    return volume[tuple(slice(st, st + size) for st in starts)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/em")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--crop", type=int, default=160, help="edge of the central cube-2 crop evaluated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", default="/tmp/vemamba_ablation")
    parser.add_argument("--out", default=str(HERE / "results" / "vemamba_ablation.md"))
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to every vemamba_iso_train (after the variant's own flags)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vemamba_iso.data import read_volume
    from vemamba_iso.evaluation import evaluate_reconstruction
    from vemamba_iso.model import count_parameters
    from vemamba_iso.training import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    gt = central_crop(read_volume(Path(args.data) / "fib25_cube2_10nm_iso.tif").data, args.crop)
    results = {}
    with open(work / "ablation.log", "a") as log:
        for name in args.variants:
            model_dir = work / name
            if not (model_dir / "model.pt").is_file() or json.loads((model_dir / "metadata.json").read_text())[
                    "training"]["steps_done"] < args.steps:
                run(["vemamba_iso_train", "--input", str(Path(args.data) / "fib25_cube1_10nm_iso.tif"),
                     "--factor", str(args.factor), "--output", str(model_dir), "--steps", str(args.steps),
                     "--dim", "24", "--groups", "2", "--blocks", "2", "--moco-steps", "100", "--pair-axes", "all",
                     "--steps-per-epoch", str(max(50, args.steps // 4)), "--threads", str(args.threads),
                     *VARIANTS[name], *args.train_args], env, log)
            network, metadata = load_model(model_dir)
            started = time.time()
            report, _ = evaluate_reconstruction(network, metadata, gt, progress=False)
            train = metadata["training"]
            results[name] = {"psnr": report["vemamba"]["psnr"], "linear": report["linear"]["psnr"],
                             "gain": report["vemamba"]["psnr_gain_over_linear"], "ssim": report["vemamba"]["ssim_3d"],
                             "steps": train["steps_done"], "minutes": round(train["seconds"] / 60, 1),
                             "parameters": count_parameters(network),
                             "reconstruction_seconds": round(time.time() - started, 1)}
            print(name, results[name], flush=True)
    paper = results.get("paper")
    lines = [f"# VEMamba ablation at equal steps (x{args.factor}, {args.steps} steps from scratch, FIB-25)", "",
             f"Trained on cube 1 (every {args.factor}th slice kept, pairs along Y, X and Z), evaluated on the central "
             f"{args.crop}^3 crop of cube 2; PSNR over the whole crop. One run per variant (same seed): differences of a "
             "few hundredths of a dB are within run-to-run noise at this budget.", "",
             "| variant | PSNR (dB) | gain over linear (dB) | vs paper form (dB) | paper's loss without it (dB) | "
             "SSIM 3D | parameters | training (min) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        delta = "" if paper is None or name == "paper" else f"{r['psnr'] - paper['psnr']:+.3f}"
        lines.append(f"| {name} | {r['psnr']:.3f} | {r['gain']:+.3f} | {delta} | "
                     f"{'-' + str(PAPER_DELTAS[name]) if name in PAPER_DELTAS else ''} | {r['ssim']:.4f} | "
                     f"{r['parameters']} | {r['minutes']} |")
    lines += ["", "Reproduce:", "", "    python benchmarks/ablation_vemamba.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), ""]
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
