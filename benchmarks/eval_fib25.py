"""FIB-25 isotropic reconstruction benchmark: VEMamba vs linear and cubic interpolation.

Models are trained self-supervised on FIB-25 cube 1 (``training_sample1``) with ``vemamba_iso_train``;
this script degrades cube 2 (``training_sample2``, never seen in training) along Z by each factor,
reconstructs it, and writes under ``benchmarks/results/``:

- ``fib25_results.json``: all metrics per factor and method, plus each model's training record;
- ``fib25_table.md``: the table shown in the README;
- ``fib25_views_x{k}.png``: orthogonal views (ground truth, degraded, linear, cubic, VEMamba).

Usage (data from /work/shared/data/em, models from vemamba_iso_train):

    python benchmarks/eval_fib25.py --data /work/shared/data/em --models x4=/tmp/vm/x4 x8=/tmp/vm/x8 x10=/tmp/vm/x10
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vemamba_iso.data import read_volume
from vemamba_iso.evaluation import evaluate_reconstruction, orthogonal_views
from vemamba_iso.evaluation.evaluate import removed_slice_near_centre
from vemamba_iso.inference.tiling import FALLBACK_OVERLAP, FALLBACK_TILE
from vemamba_iso.model import count_parameters
from vemamba_iso.training import load_model, training_stages

RESULTS = Path(__file__).resolve().parent / "results"


def scan_form(network: dict) -> str:
    """'4 paths, restored DWAM' style summary of a model's scan configuration (legacy models: 2 paths, input)."""
    from vemamba_iso.model import NetworkConfig

    config = NetworkConfig.from_dict(network)
    return f"{config.paths_per_chunk} paths, {config.aggregation}" + ("" if config.use_degradation_encoder else ", no prior")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/em")
    parser.add_argument("--gt", default="fib25_cube2_10nm_iso.tif")
    parser.add_argument("--models", nargs="+", required=True, metavar="xK=MODEL_DIR")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", action="append", default=[], help="text lines added under the table")
    parser.add_argument("--flip-average", action="store_true",
                        help="test-time augmentation: average the 8 lateral symmetries (8x the reconstruction time)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the entries of an existing fib25_results.json that this run does not recompute")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    gt = read_volume(Path(args.data) / args.gt).data
    results = {}
    previous = out / "fib25_results.json"
    if args.merge and previous.is_file():
        results = json.loads(previous.read_text())
    for entry in args.models:
        name, _, model_dir = entry.partition("=")
        network, metadata = load_model(model_dir)
        started = time.time()
        report, volumes = evaluate_reconstruction(network, metadata, gt, flip_average=args.flip_average)
        report["settings"]["reconstruction_seconds"] = round(time.time() - started, 1)
        train = metadata["training"]
        report["training"] = {"steps": train["steps_done"], "batch_size": train["batch_size"],
                              "patch_axial_lateral": [train["low_res_length"], train["lateral"]],
                              "seconds": train["seconds"], "device": train["device"],
                              "parameters": count_parameters(network), "network": metadata["network"],
                              "degradation": metadata["degradation"]["preset"],
                              "last_validation": train["history"][-1] if train["history"] else None,
                              "initialised_from": train.get("initialised_from"),
                              "stages": training_stages(metadata)}
        results[name] = report
        orthogonal_views(volumes, out / f"fib25_views_{name}.png",
                         title=f"FIB-25 cube 2, {name} along Z (central 128 x 128 crops; XY: a removed slice)",
                         z_index=removed_slice_near_centre(report["settings"]["shape_zyx"][0],
                                                           report["settings"]["factor"]))
        print(name, json.dumps({m: report[m] for m in ("linear", "cubic", "vemamba")}))
    results = dict(sorted(results.items(), key=lambda item: item[1]["settings"]["factor"]))
    (out / "fib25_results.json").write_text(json.dumps(results, indent=2))
    write_table(results, out, args.note)


def tiling(settings: dict) -> str:
    """'8x32x32 / 2x8x8' for a report's inference tile and overlap (reports before they were recorded used
    the old fixed tiles, today's fallback for models without a training patch)."""
    tile, overlap = settings.get("tile", FALLBACK_TILE), settings.get("overlap", FALLBACK_OVERLAP)
    return "x".join(map(str, tile)) + " / " + "x".join(map(str, overlap))


def device_totals(training: dict) -> dict:
    """{(device, batch): [steps, seconds]} over a report's training runs at its own factor (runs of other
    factors it was initialised from are the starting point, not counted). Reports written before the runs were
    recorded count their one run."""
    stages = training.get("stages") or [{"factor": training["network"]["factor"], "steps": training["steps"],
                                         "batch_size": training["batch_size"], "seconds": training["seconds"],
                                         "device": training.get("device", "cpu")}]
    factor = stages[-1]["factor"]
    totals = {}
    for stage in stages:
        if stage["factor"] == factor:
            device = "GPU" if stage["device"] == "cuda" else stage["device"].upper()
            entry = totals.setdefault((device, stage["batch_size"]), [0, 0.0])
            entry[0] += stage["steps"]
            entry[1] += stage["seconds"]
    return totals


def write_table(results: dict, out: Path, notes: list[str]) -> None:
    """``fib25_table.md`` from the results (also printed)."""
    lines = ["| factor | method | PSNR (dB) | PSNR unobserved slices (dB) | SSIM 3D | SSIM XY | SSIM XZ | SSIM YZ |",
             "|---|---|---|---|---|---|---|---|"]
    for name, report in results.items():
        for method in ("linear", "cubic", "vemamba"):
            m = report[method]
            lines.append(f"| {name} | {method} | {m['psnr']:.2f} | {m['psnr_unobserved_slices']:.2f} | "
                         f"{m['ssim_3d']:.4f} | {m['ssim_xy']:.4f} | {m['ssim_xz']:.4f} | {m['ssim_yz']:.4f} |")
    lines.append("")
    lines.append("| factor | VEMamba gain over linear (dB) | over cubic (dB) | training steps (device, batch) | "
                 "patch (axial, lateral) | training time (min) | training steps/s | parameters | scan form | "
                 "lateral flip average | kept slices returned as measured | inference tile / overlap |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, report in results.items():
        t = report["training"]
        totals = device_totals(t)
        steps = " + ".join(f"{n} ({device}, {batch})" for (device, batch), (n, _) in totals.items())
        minutes = " + ".join(f"{sec / 60:.1f} {device}" for (device, _), (_, sec) in totals.items())
        rates = ", ".join(f"{n / max(sec, 1e-9):.2f} {device}" for (device, _), (n, sec) in totals.items())
        lines.append(f"| {name} | {report['vemamba']['psnr_gain_over_linear']:+.2f} | "
                     f"{report['vemamba']['psnr_gain_over_cubic']:+.2f} | {steps} | "
                     f"{tuple(t['patch_axial_lateral'])} | {minutes} | {rates} | {t['parameters']} | "
                     f"{scan_form(t['network'])} | "
                     f"{'yes' if report['settings'].get('flip_average') else 'no'} | "
                     f"{'yes' if report['settings'].get('keep_observed') else 'no'} | {tiling(report['settings'])} |")
    lines += [""] + notes
    (out / "fib25_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
