"""Cost of LoG-VMamba vs the plain nnU-Net network of the same plans: parameters, step time, memory.

For each configuration, both networks are built from the same nnU-Net plans (plain: nnU-Net's own
``build_network_architecture``; ours: ``nnUNetTrainerLoGVMamba``'s), and one training step
(forward + deep-supervision loss + backward) at the planned batch and patch size is timed, plain and
ours alternating so that load changes hit both alike. Peak memory is measured per network in a fresh
subprocess (CPU: peak RSS growth during one step, Linux only; CUDA: ``torch.cuda.max_memory_allocated``).
Ratios are ours / plain, measured side by side in this one run.

    python benchmarks/bench_network.py --plans PATH/nnUNetPlans.json --dataset-json PATH/dataset.json

``PATH`` is nnU-Net's preprocessed folder of a dataset, e.g. the hippocampus one that
``benchmarks/eval_hippocampus.py --prepare-only`` writes (default locations below).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

DEFAULT_PRE = "/tmp/nnunet_logmamba_hippocampus/nnUNet_preprocessed/Dataset004_Hippocampus"


def build(kind: str, plans: dict, dataset_json: dict, configuration: str, trainer_name: str):
    """(network, batch_size, patch_size, num_input_channels) for ``kind`` in ('plain', 'ours')."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    if kind == "plain":
        trainer = nnUNetTrainer
    else:  # nnU-Net's own lookup, as nnUNetv2_train does it (its search log silenced)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = recursive_find_trainer_class_by_name(trainer_name)
    torch.manual_seed(0)
    net = trainer.build_network_architecture(pm, cm, n_in, n_out, True)
    return net, cm.batch_size, tuple(cm.patch_size), n_in


def step(net, x, amp: bool = False):
    """One forward + deep-supervision loss + backward; returns whether the loss was finite.

    ``amp``: fp16 autocast as nnU-Net trains on CUDA (ignored on CPU).
    """
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp and x.device.type == "cuda"):
        out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    net.zero_grad(set_to_none=True)
    return bool(torch.isfinite(loss))


def _memory_child(kind, plans, dataset_json, configuration, trainer_name, device, batch_size, amp, queue):
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    net, batch, patch, n_in = build(kind, plans, dataset_json, configuration, trainer_name)
    net = net.to(device)
    batch = batch_size or batch
    x = torch.randn(batch, n_in, *patch, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(net, x, amp)
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    else:
        # reset the peak-RSS mark (Linux: "5" > clear_refs) so imports and building do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        step(net, x, amp)
        queue.put((_status_kib("VmHWM") - base) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory on CPU needs Linux)")


def peak_memory_mib(kind, plans, dataset_json, configuration, trainer_name, device, batch_size=None,
                    amp=False) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(kind, plans, dataset_json, configuration, trainer_name, device,
                                                       batch_size, amp, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def bench_configuration(plans, dataset_json, configuration, trainer_name, device, steps, batch_size=None,
                        amp=False):
    nets, sample = {}, None
    for kind in ("plain", "ours"):
        net, batch, patch, n_in = build(kind, plans, dataset_json, configuration, trainer_name)
        nets[kind] = net.to(device).train()
        batch = batch_size or batch
        sample = torch.randn(batch, n_in, *patch, device=device)
    params = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    times = {"plain": [], "ours": []}
    finite = {"plain": True, "ours": True}
    for i in range(steps + 1):
        for kind in ("plain", "ours"):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            finite[kind] &= step(nets[kind], sample, amp)
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first step warms up allocators and kernels
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_memory_mib(k, plans, dataset_json, configuration, trainer_name, device, batch_size, amp)
           for k in nets}
    placed = getattr(nets["ours"], "log_vmamba_blocks", [])
    return {"configuration": configuration, "batch": tuple(sample.shape[:1])[0], "patch": tuple(sample.shape[2:]),
            "blocks": [f"{p['where'][:3]}{p['stage']}:{p['mode']}@{'x'.join(map(str, p['size']))}" for p in placed],
            "params": params, "step_s": med, "peak_mib": mem, "amp": amp, "loss_finite": finite,
            "ratios": {"params": params["ours"] / params["plain"], "step_time": med["ours"] / med["plain"],
                       "peak_memory": mem["ours"] / max(mem["plain"], 1e-9)}}


def write_json(results, path: str) -> None:
    """``results`` as indented JSON at ``path``, written under a temporary name first (no partial file)."""
    from vemamba_iso.data.atomic import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plans", default=os.path.join(DEFAULT_PRE, "nnUNetPlans.json"))
    parser.add_argument("--dataset-json", default=os.path.join(DEFAULT_PRE, "dataset.json"))
    parser.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres", "2d"])
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerLoGVMamba")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per network (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the planned batch size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; use 1 on a loaded shared machine)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast, as nnU-Net trains on CUDA")
    args = parser.parse_args(argv)
    for path in (args.plans, args.dataset_json):
        if not os.path.isfile(path):
            sys.exit(f"{path} not found: plan the dataset first, e.g. python benchmarks/eval_hippocampus.py "
                     "--prepare-only, or pass --plans/--dataset-json")
    with open(args.plans) as f:
        plans = json.load(f)
    with open(args.dataset_json) as f:
        dataset_json = json.load(f)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the memory subprocesses
    results = []
    print(f"device={args.device} threads={torch.get_num_threads()} trainer={args.trainer} amp={args.amp}")
    for configuration in args.configurations:
        r = bench_configuration(plans, dataset_json, configuration, args.trainer, args.device, args.steps,
                                args.batch_size, args.amp)
        results.append(r)
        print(f"\n{configuration}: batch {r['batch']} patch {r['patch']} blocks {', '.join(r['blocks'])}")
        print(f"  params      plain {r['params']['plain'] / 1e6:8.2f} M   ours {r['params']['ours'] / 1e6:8.2f} M"
              f"   ratio {r['ratios']['params']:.3f}")
        print(f"  step time   plain {r['step_s']['plain']:8.3f} s   ours {r['step_s']['ours']:8.3f} s"
              f"   ratio {r['ratios']['step_time']:.3f}  (issue 10: <= 1.3)")
        print(f"  peak memory plain {r['peak_mib']['plain']:8.0f} MiB ours {r['peak_mib']['ours']:8.0f} MiB"
              f" ratio {r['ratios']['peak_memory']:.3f}  (issue 10: <= 1.5)")
        print(f"  loss finite plain {r['loss_finite']['plain']}   ours {r['loss_finite']['ours']}")
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
