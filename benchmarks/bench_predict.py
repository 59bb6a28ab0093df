"""Block-wise reconstruction throughput: voxels per second and peak memory as volumes grow, 1 vs 2 Dask workers.

    python benchmarks/bench_predict.py                      # shipped default model, CPU
    python benchmarks/bench_predict.py --method linear      # the engine alone (linear interpolation)

Output sizes 64^3, 128^3, 256^3 (inputs are x4 anisotropic: 16x64x64, 32x128x128, 64x256x256, uint8,
smoothed noise in a Zarr store). Each measurement runs in its own process so its peak RSS is its own.
Cost per output voxel should stay flat as the volume grows, and peak memory should stay bounded by the
block size, not the volume. Ratios are to the first row / the 1-worker run, measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_input(path: str, shape) -> None:
    import zarr
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    volume = gaussian_filter(rng.random(shape, dtype=np.float32), sigma=(0.5, 2, 2))
    volume = ((volume - volume.min()) / (volume.max() - volume.min()) * 255).astype(np.uint8)
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.create_array("raw", data=volume, chunks=(16, 64, 64))


def worker(args) -> dict:
    from vemamba_iso.blockwise import LinearInterpolation, VolumeSource, reconstruct_blockwise

    source = VolumeSource(args.input)
    if args.method == "linear":
        processor = LinearInterpolation(4)
    else:
        from vemamba_iso.blockwise.model_processor import ModelProcessor, volume_intensity_record

        processor = ModelProcessor(None, intensity=volume_intensity_record(source, "RGBTo01Normalization"))
    cluster = client = None
    startup = 0.0
    if args.workers:
        # the cluster is started and its workers warmed up (torch imported, weights loaded) before the clock
        # starts, so that 1 vs 2 workers compares throughput, not process start-up (reported apart)
        from distributed import Client, LocalCluster

        from vemamba_iso.blockwise.engine import local_worker_threads

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        client.run(_warm_up, processor, local_worker_threads(args.workers))
        startup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        out = reconstruct_blockwise(source, args.output, processor, block=tuple(args.block), halo=(2, 8, 8),
                                    scheduler=cluster.scheduler_address if cluster else None, progress=False)
        seconds = time.perf_counter() - t0
        worker_mb = max(client.run(_peak_mb).values()) if client else None
    finally:
        if client is not None:
            client.close()
            cluster.close()
    voxels = int(np.prod(VolumeSource(out).shape))
    return {"seconds": seconds, "voxels": voxels, "peak_mb": _peak_mb(), "worker_peak_mb": worker_mb,
            "startup_s": startup}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up(processor, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if hasattr(processor, "network"):
        processor.network()


def run(cmd_args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *cmd_args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["model", "linear"], default="model")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="output edge lengths")
    p.add_argument("--block", type=int, nargs=3, default=[16, 64, 64], help="block core, input voxels")
    p.add_argument("--dask-size", type=int, default=128, help="output edge for the 1 vs 2 workers comparison")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    tmp = tempfile.mkdtemp(prefix="bench_predict_")
    try:
        print(f"block-wise reconstruction, method {args.method}, x4 along Z, block {args.block} (input voxels), "
              f"{os.cpu_count()} cores")
        print(f"{'output':>10} {'workers':>7} {'seconds':>9} {'voxels/s':>12} {'peak MB':>8} {'s/voxel ratio':>14}")
        base = None
        inputs = {}
        for size in sorted(set(args.sizes) | {args.dask_size}):
            inputs[size] = os.path.join(tmp, f"in{size}.zarr")
            make_input(inputs[size], (size // 4, size, size))
        common = ["--method", args.method, "--block", *map(str, args.block)]
        for size in args.sizes:
            r = run(common + ["--input", inputs[size], "--output", os.path.join(tmp, f"out{size}_1.zarr")])
            per_voxel = r["seconds"] / r["voxels"]
            base = base or per_voxel
            print(f"{size:>9}^3 {'-':>7} {r['seconds']:9.1f} {r['voxels'] / r['seconds']:12.0f} {r['peak_mb']:8.0f} "
                  f"{per_voxel / base:14.2f}", flush=True)
        rows = {}
        for workers in (1, 2):
            rows[workers] = run(common + ["--input", inputs[args.dask_size], "--workers", str(workers),
                                          "--output", os.path.join(tmp, f"dask{workers}.zarr")])
            r = rows[workers]
            print(f"{args.dask_size:>9}^3 {workers:>7} {r['seconds']:9.1f} {r['voxels'] / r['seconds']:12.0f} "
                  f"{r['worker_peak_mb']:8.0f} {'':>14}  (cluster start-up {r['startup_s']:.1f} s, not counted)",
                  flush=True)
        print(f"speed-up of 2 Dask workers over 1: {rows[1]['seconds'] / rows[2]['seconds']:.2f}x "
              "(peak MB of a Dask row: the largest worker's)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
