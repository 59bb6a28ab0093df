"""Where the time of one selective-scan forward + backward goes: device kernels against host work.

    python benchmarks/profile_scan.py --device cuda --length 16384 --backends triton mamba_ssm
    python benchmarks/profile_scan.py --device cuda --backends "triton[seq64x1024x8]"   # layout and sizes

For each backend (in its own process, the shapes of ``bench_scan.py``), ``repeats`` steps are timed
after a warm-up, then ``repeats`` more run under torch's profiler. Per step it prints the wall time
(median, measured without the profiler), the time the device spent in kernels (sum of kernel durations),
how many kernels were launched, and the kernels by their share of the device time. Wall time well above
the kernel time means the step is bound by host work (Python, launches, allocations), which faster
kernels cannot fix; the reverse means the kernels are the cost. On a CPU it lists torch operators by
self CPU time instead, taken under the profiler and so not comparable with the wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench_scan import configure_triton, scan_step


def profile(backend: str, length: int, device: str, repeats: int, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    dev = torch.device(device)
    name, _, tiles = backend.partition("[")
    if tiles:  # e.g. triton[seq256x4096]: the Triton kernel's layout and sizes, as bench_scan --triton-tiles
        configure_triton(tiles.rstrip("]"))
    step = scan_step(name, length, dev)
    for _ in range(2):           # compilation and autotuning stay out of the profile
        step()
    walls = []
    for _ in range(repeats):     # wall time without the profiler, whose own overhead is host time
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(repeats):
            step()
    on_device = dev.type == "cuda"
    rows = []
    for avg in prof.key_averages():
        seconds = (avg.self_device_time_total if on_device else avg.self_cpu_time_total) / 1e6
        if seconds > 0 and (not on_device or avg.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"name": avg.key, "ms_per_step": 1e3 * seconds / repeats,
                         "calls_per_step": avg.count / repeats})
    rows.sort(key=lambda r: -r["ms_per_step"])
    busy = sum(r["ms_per_step"] for r in rows)
    return {"backend": backend, "length": length, "device": device,
            "wall_ms": 1e3 * statistics.median(walls), "busy_ms": busy,
            "launches": sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--backends", nargs="+", default=["triton", "mamba_ssm"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="kernels (operators on a CPU) listed per backend")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(profile(args.worker, args.length, args.device, args.repeats, args.top)))
        return
    what = "kernel" if args.device.startswith("cuda") else "operator (self CPU)"
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--worker", backend, "--device", args.device, "--length", str(args.length),
               "--repeats", str(args.repeats), "--top", str(args.top)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # one backend failing must not hide the others
            print(f"# {backend}: failed\n{done.stderr[-2000:]}\n", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        # kernel durations are the device's own clock; CPU operator times include the profiler's overhead
        share = (f" ({100 * r['busy_ms'] / r['wall_ms']:.0f} % of the wall time)" if r["device"].startswith("cuda")
                 else " (under the profiler)")
        print(f"## {backend}, length {r['length']}, {r['device']}: wall {r['wall_ms']:.2f} ms per step, "
              f"{r['busy_ms']:.2f} ms in {r['launches']:.0f} {what} calls{share}\n")
        print(f"| {what} | ms per step | calls per step |\n|---|---|---|")
        for row in r["top"]:
            print(f"| `{row['name'][:90]}` | {row['ms_per_step']:.3f} | {row['calls_per_step']:.0f} |")
        print(flush=True)


if __name__ == "__main__":
    main()
