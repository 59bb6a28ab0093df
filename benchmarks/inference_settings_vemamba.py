"""VEMamba inference settings: tile size, kept slices and flip averaging, measured with the shipped models.

Each run reconstructs one volume with one shipped model and one setting and prints one JSON line: PSNR of
linear interpolation, of the network's raw output, and of that output with the kept slices put back
(``keep_observed``), so the three effects can be told apart:

- ``--data crop``: the central 160^3 of FIB-25 cube 2 (the cube of ``fib25_table.md``), Z degraded;
- ``--data cube1``: the last 15 % of cube 1 along Z (never trained on), X degraded (X becomes the coarse axis);
- ``--data vnc``: 256 x 256 of the VNC ssTEM stack (4.6 nm lateral; another microscope), X degraded.

Usage:

    python benchmarks/inference_settings_vemamba.py --factor 8 --data crop --tile 8 32 32 --overlap 2 8 8
    python benchmarks/inference_settings_vemamba.py --factor 8 --data crop --flip-average   # the model's tiles
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vemamba_iso.data import read_volume
from vemamba_iso.evaluation import evaluate_reconstruction
from vemamba_iso.evaluation.metrics import psnr
from vemamba_iso.training import load_model

WEIGHTS = Path(__file__).resolve().parents[1] / "vemamba_iso" / "weights"


def load_volume(data_dir: Path, which: str, crop: int = 160) -> np.ndarray:
    """The ground-truth volume, its degraded axis first."""
    if which == "crop":
        v = read_volume(data_dir / "fib25_cube2_10nm_iso.tif").data
        s = [(n - crop) // 2 for n in v.shape]
        return np.ascontiguousarray(v[s[0]:s[0] + crop, s[1]:s[1] + crop, s[2]:s[2] + crop])
    if which == "cube1":
        v = read_volume(data_dir / "fib25_cube1_10nm_iso.tif").data
        return np.ascontiguousarray(np.moveaxis(v[int(round(v.shape[0] * 0.85)):], 2, 0))
    if which == "vnc":
        v = read_volume(data_dir / "vnc_stack1_raw_4.6x4.6x50nm.tif").data
        return np.ascontiguousarray(np.moveaxis(v[:, :256, :256], 2, 0))
    raise ValueError(f"unknown --data {which!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, required=True, help="shipped model: 4, 8 or 10")
    parser.add_argument("--data", choices=("crop", "cube1", "vnc"), default="crop")
    parser.add_argument("--data-dir", default="/work/shared/data/em")
    parser.add_argument("--tile", type=int, nargs=3, default=None, help="default: the model's training patch")
    parser.add_argument("--overlap", type=int, nargs=3, default=None, help="default: a quarter tile")
    parser.add_argument("--flip-average", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gt = load_volume(Path(args.data_dir), args.data)
    network, metadata = load_model(WEIGHTS / f"fib25_x{args.factor}")
    network.config.keep_observed = False          # the raw output; the kept slices are put back below
    started = time.time()
    report, volumes = evaluate_reconstruction(network, metadata, gt, tile=args.tile, overlap=args.overlap,
                                              flip_average=args.flip_average, progress=False)
    settings = report["settings"]
    truth = volumes["ground truth"].astype(np.float32)
    kept = volumes["vemamba"].astype(np.float32)
    offset = int(network.config.sample_offset)   # subsample: sample j sits at j * factor + offset
    kept[offset::args.factor] = truth[offset::args.factor]
    print(json.dumps({
        "factor": args.factor, "data": args.data, "shape": settings["shape_zyx"], "tile": settings["tile"],
        "overlap": settings["overlap"], "flip_average": args.flip_average,
        "linear_psnr": report["linear"]["psnr"],
        "gain_raw": report["vemamba"]["psnr_gain_over_linear"],
        "gain_kept_slices": round(psnr(kept, truth, settings["data_range"]) - report["linear"]["psnr"], 4),
        "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
