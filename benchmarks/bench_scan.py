"""Selective-scan backends side by side: forward+backward time and peak memory, as ratios to `reference`.

    python benchmarks/bench_scan.py                 # CPU (and CUDA when present)
    python benchmarks/bench_scan.py --device cuda   # GPU only

Shapes of real 3D stages: batch 2, dim 64, state 16, lengths 4096 and 32768 (all backends), and
65536 for the fast backends (memory target: within 4 GB). Every (backend, shape) runs in its own
subprocess so that peak memory is that run's alone (CPU: peak RSS above the RSS before the call;
CUDA: torch.cuda.max_memory_allocated). Times are medians over repeats after one warm-up, with
delta_softplus, z, D and delta_bias all on (the configuration the networks use).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

BATCH, DIM, STATE = 2, 64, 16


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scan_step(backend: str, length: int, dev):
    """A closure running one forward + backward of ``selective_scan`` (batch BATCH, dim DIM, state STATE,
    ``length`` steps, every option on) on ``dev`` and waiting for the device; fixed random inputs."""
    import torch
    from nnunet_logmamba.ssm import selective_scan

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev).requires_grad_()

    u, delta, z = rnd(BATCH, DIM, length), rnd(BATCH, DIM, length, scale=0.5), rnd(BATCH, DIM, length)
    B, C = rnd(BATCH, STATE, length), rnd(BATCH, STATE, length)
    A = (-torch.arange(1, STATE + 1, dtype=torch.float32).repeat(DIM, 1)).to(dev).requires_grad_()
    D, bias = rnd(DIM), rnd(DIM, scale=0.1)

    def step():
        y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend=backend)
        y.sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step


def configure_triton(tiles: str) -> None:
    """Set the Triton kernel's layout and sizes from "[seq]CHUNKxTILE[xWARPS][rREGISTERS]": chunk length, register
    tile, warps, the register cap of the parallel backward gradient kernel; the "seq" prefix selects the
    sequential layout (one program walks its chunks in order)."""
    import nnunet_logmamba.ssm.triton_kernel as tk
    form = re.fullmatch(r"(seq)?(\d+)x(\d+)(?:x(\d+))?(?:r(\d+))?", tiles)
    if form is None or (form.group(1) and form.group(5)) or not 24 <= int(form.group(5) or 24) <= 255:
        raise ValueError(f"triton sizes {tiles!r}: expected [seq]CHUNKxTILE[xWARPS][rREGISTERS] (the register cap "
                         "24 to 255, only for the parallel layout), e.g. 64x4096, 64x4096r128 or seq128x2048x16")
    sequential, registers = form.group(1), form.group(5)
    chunk, tile, warps = int(form.group(2)), int(form.group(3)), form.group(4) and int(form.group(4))
    # Triton tiles (tl.arange) and warps per program come in powers of two; say so here rather than in a
    # compile error deep in the first launch
    wrong = [f"{name} {value}" for name, value, low, high in (("CHUNK", chunk, 2, None), ("TILE", tile, 2, None),
                                                              ("WARPS", warps, 1, 32))
             if value is not None and (value & (value - 1) or value < low or high and value > high)]
    if chunk > tile:
        wrong.append(f"CHUNK {chunk} > TILE {tile}")
    if wrong:
        raise ValueError(f"triton sizes {tiles!r}: CHUNK and TILE must be powers of two from 2, CHUNK at most TILE, "
                         f"WARPS a power of two from 1 to 32 (got {', '.join(wrong)}), e.g. 64x4096 or 32x2048x8")
    tk.LAYOUT = "sequential" if sequential else "parallel"
    if sequential:
        tk.SEQUENTIAL_CHUNK = chunk
    else:
        tk.CHUNK = chunk
    tk.TILE = tile
    tk.WARPS = warps
    tk.GRADIENT_REGISTERS = int(registers) if registers else None


def worker(backend: str, length: int, device: str, repeats: int, tiles: str | None = None) -> dict:
    import torch

    if tiles:
        configure_triton(tiles)

    dev = torch.device(device)
    step = scan_step(backend, length, dev)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        if i:                       # the first run is the warm-up
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times.sort()
    return {"backend": backend + (f"[{tiles}]" if tiles else ""), "length": length, "device": device,
            "seconds": times[len(times) // 2],
            "peak_mb": peak, "threads": torch.get_num_threads()}


def measure(backend: str, length: int, device: str, repeats: int, tiles: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--length", str(length), "--device", device,
           "--repeats", str(repeats)] + (["--tiles", tiles] if tiles else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:  # one backend failing (e.g. a kernel that does not build) must not hide the others
        print(f"# {backend} {tiles or ''} at length {length} failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768],
                        help="on CUDA the issue's comparison is --lengths 4096 16384 32768 (+ --long 65536)")
    parser.add_argument("--long", type=int, default=65536, help="length measured for the fast backends only (0: none)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="only these backends (default: every one available on the device)")
    parser.add_argument("--triton-tiles", nargs="+", default=[],
                        help="also time the triton backend with these [seq]CHUNKxTILE[xWARPS][rREGISTERS] sizes "
                             "(tuning; 'seq': the sequential layout, e.g. seq256x4096; 'r': the backward gradient "
                             "kernel's register cap, e.g. 64x4096r128)")
    parser.add_argument("--tiles", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.length, args.device, args.repeats, args.tiles)))
        return

    import torch
    from nnunet_logmamba.ssm import available_backends

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"selective scan, forward+backward, batch {BATCH}, dim {DIM}, state {STATE}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':6} {'length':>7} {'backend':24} {'time (ms)':>10} {'peak (MB)':>10} "
          f"{'speed-up vs ref':>16} {'speed-up vs torch':>18} {'time / mamba_ssm':>17}")
    for device in devices:
        backends = [b for b in available_backends(device) if args.backends is None or b in args.backends]
        for length in args.lengths + ([args.long] if args.long else []):
            rows = {}
            for backend in backends:
                if backend == "reference" and length == args.long:
                    continue
                slow = backend == "reference" and length > 8192
                rows[backend] = measure(backend, length, device, 1 if slow else args.repeats)
                if backend == "triton":
                    for tiles in args.triton_tiles:
                        rows[f"triton[{tiles}]"] = measure(backend, length, device, args.repeats, tiles)
            rows = {k: v for k, v in rows.items() if v is not None}
            ref, chunked, kernel = rows.get("reference"), rows.get("torch"), rows.get("mamba_ssm")
            for backend, r in rows.items():
                speedup = f"{ref['seconds'] / r['seconds']:.1f}x" if ref else "-"
                vs_torch = f"{chunked['seconds'] / r['seconds']:.2f}x" if chunked else "-"
                vs_kernel = f"{r['seconds'] / kernel['seconds']:.2f}x" if kernel else "-"
                print(f"{device:6} {length:7d} {backend:24} {r['seconds'] * 1e3:10.1f} {r['peak_mb']:10.0f} "
                      f"{speedup:>16} {vs_torch:>18} {vs_kernel:>17}", flush=True)


if __name__ == "__main__":
    main()
