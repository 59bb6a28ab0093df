"""One training step of our networks per selective-scan backend, side by side: time per step and peak memory.

    python benchmarks/bench_training_step.py --device cuda --amp     # the GPU comparison of the scan backends
    python benchmarks/bench_training_step.py --device cpu --backends torch cpu_kernel --batch-size 2

Networks:

* ``vemamba``: the shipped default VEMamba model's architecture (``vemamba_iso.training.load_model()``), a batch of
  its training patches (random intensities; the time of a step does not depend on them), the training loss (L1 +
  SSIM), backward and an Adam step, as ``vemamba_iso_train`` runs it (fp16 autocast with ``--amp``).
* ``logvmamba``: ``nnUNetTrainerLoGVMamba``'s network for nnU-Net plans (``--plans``/``--dataset-json``, by
  default the hippocampus plans of ``python benchmarks/eval_hippocampus.py --prepare-only``; skipped with the
  reason where they are missing) at the planned batch and patch size, forward, deep-supervision loss and backward
  (``bench_network.step``).

Each (network, backend) runs in its own process with ``BIOIMAGE_MAMBA_SCAN_BACKEND`` set, so that the peak memory is
that run's alone and no backend's warm-up helps another; the time is the median of ``--steps`` steps after one
warm-up step. Ratios are to the ``torch`` backend of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

NETWORKS = ("vemamba", "logvmamba")


def vemamba_step(device, batch_size: int, amp: bool):
    """A closure running one VEMamba training step on ``device``; returns whether the loss was finite."""
    import torch
    from vemamba_iso.training import load_model
    from vemamba_iso.training.losses import reconstruction_loss

    network, _ = load_model(device=device)
    network.train()
    axial, lateral = network.config.training_patch
    factor = network.config.factor
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, axial, lateral, lateral, generator=g).to(device)
    target = torch.rand(batch_size, 1, axial * factor, lateral, lateral, generator=g).to(device)
    optimizer = torch.optim.Adam([p for _, p in network.reconstruction_parameters()], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            prediction = network(x)
        loss = reconstruction_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return bool(torch.isfinite(loss))

    return step, {"batch": batch_size, "patch": [axial, lateral, lateral]}


def logvmamba_step(device, plans_path: str, dataset_json_path: str, configuration: str, batch_size, amp: bool):
    """A closure running one LoG-VMamba training step for the plans' ``configuration``, with its description."""
    import torch
    from bench_network import build, step as network_step

    with open(plans_path) as f:
        plans = json.load(f)
    with open(dataset_json_path) as f:
        dataset_json = json.load(f)
    net, planned_batch, patch, channels = build("ours", plans, dataset_json, configuration, "nnUNetTrainerLoGVMamba")
    batch = batch_size or planned_batch
    net = net.to(device).train()
    x = torch.randn(batch, channels, *patch, generator=torch.Generator().manual_seed(0)).to(device)
    return (lambda: network_step(net, x, amp)), {"batch": batch, "patch": list(patch), "configuration": configuration}


def worker(args) -> dict:
    """Time one network with the backend named by BIOIMAGE_MAMBA_SCAN_BACKEND (this process's own)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker == "vemamba":
        step, shape = vemamba_step(device, args.batch_size or (32 if device.type == "cuda" else 2), args.amp)
    else:
        step, shape = logvmamba_step(device, args.plans, args.dataset_json, args.configuration, args.batch_size,
                                     args.amp)

    def timed():
        t0 = time.perf_counter()
        finite = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, finite

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed()                                              # warm-up: kernels compiled, caches filled
    runs = [timed() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    from nnunet_logmamba.ssm import dispatch
    return {"network": args.worker, "backend": os.environ.get(dispatch.BACKEND_ENV, "auto"), **shape,
            "seconds": statistics.median(t for t, _ in runs), "peak_mib": peak,
            "finite": all(f for _, f in runs), "device": args.device, "amp": args.amp}


def measure(network: str, backend: str, args) -> dict | None:
    from nnunet_logmamba.ssm import dispatch
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", network, "--device", args.device,
           "--steps", str(args.steps), "--plans", args.plans, "--dataset-json", args.dataset_json,
           "-c", args.configuration] + (["--amp"] if args.amp else []) + \
          (["--batch-size", str(args.batch_size)] if args.batch_size else []) + \
          (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, dispatch.BACKEND_ENV: backend}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # one backend failing must not hide the others
        print(f"# {network} with {backend} failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    default_pre = "/tmp/nnunet_logmamba_hippocampus/nnUNet_preprocessed/Dataset004_Hippocampus"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--backends", nargs="+", default=None,
                        help="scan backends to compare (default: every one available on the device)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run, after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 32 VEMamba patches on a GPU (2 on a CPU), the planned batch for LoG-VMamba")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast, as both trainings run on a GPU")
    parser.add_argument("--plans", default=os.path.join(default_pre, "nnUNetPlans.json"))
    parser.add_argument("--dataset-json", default=os.path.join(default_pre, "dataset.json"))
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=NETWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_network, in the worker too
    if args.worker:
        print(json.dumps(worker(args)))
        return []

    import torch
    from nnunet_logmamba.ssm import available_backends

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here; use --device cpu")
    available = available_backends(args.device)
    backends = args.backends or [b for b in available if b != "reference"]
    unknown = [b for b in backends if b not in available]
    if unknown:
        sys.exit(f"backends {unknown} are not available on {args.device} (available: {', '.join(available)})")
    networks = list(args.networks)
    if "logvmamba" in networks and not (os.path.isfile(args.plans) and os.path.isfile(args.dataset_json)):
        print(f"# logvmamba skipped: no plans at {args.plans} (run python benchmarks/eval_hippocampus.py "
              "--prepare-only, or pass --plans/--dataset-json)", flush=True)
        networks.remove("logvmamba")
    print(f"training step per scan backend on {args.device} (amp {args.amp}), median of {args.steps} steps")
    print(f"{'network':10} {'backend':11} {'batch':>5} {'patch':>12} {'ms/step':>9} {'peak MiB':>9} "
          f"{'vs torch':>9} {'finite':>6}")
    results = []
    for network in networks:
        rows = {b: measure(network, b, args) for b in backends}
        rows = {b: r for b, r in rows.items() if r is not None}
        base = rows.get("torch")
        for backend, r in rows.items():
            speed = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            patch = "x".join(map(str, r["patch"]))
            print(f"{network:10} {backend:11} {r['batch']:5d} {patch:>12} {r['seconds'] * 1e3:9.1f} {peak:>9} "
                  f"{speed:>9} {str(r['finite']):>6}", flush=True)
            results.append(r)
    if args.json:
        from bench_network import write_json
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
