"""Registers, spills, occupancy and instruction counts of the Triton scan kernels, compiled for a GPU without one.

    python benchmarks/triton_resources.py                                   # the default sizes, both layouts
    python benchmarks/triton_resources.py --configs 64x4096x16 seq128x2048x16 --arch 90

Triton compiles a kernel down to the GPU's machine code without a device, specialised as a launch would
specialise it; ``cuobjdump`` (shipped with Triton) reads what each kernel uses per thread. A kernel
whose registers allow few warps per multiprocessor hides memory latency badly, and spills go to local
memory: both show here before any GPU time is spent, so a tuning sweep on a lent GPU can start from the
promising sizes. Configurations are ``bench_scan.py --triton-tiles`` strings
("[seq]CHUNKxTILE[xWARPS][rREGISTERS]"; "default": the module's sizes). Shapes default to bench_scan's (batch 2,
dim 64, state 16, 16 384 steps).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

from bench_scan import BATCH, DIM, STATE, configure_triton

#: per multiprocessor of an H100/H200 (sm_90): registers, shared memory (bytes), resident warps and programs
REGISTERS_PER_SM, SHARED_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 228 * 1024, 64, 32
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)


def _kernels(tk, layout: str) -> dict:
    """name -> (kernel, its constexpr flags) of one layout (D, z, delta_bias and softplus on)."""
    if layout == "sequential":
        return {"forward": (tk._sequential_forward_kernel, FLAGS),
                "backward": (tk._sequential_backward_kernel, {**FLAGS, "HAS_INIT": False})}
    no_dz = {k: v for k, v in FLAGS.items() if k not in ("HAS_D", "HAS_Z")}
    return {"forward summary": (tk._forward_chunk_summary_kernel, no_dz),
            "forward output": (tk._forward_output_kernel, FLAGS),
            "backward summary": (tk._backward_chunk_summary_kernel,
                                 {k: v for k, v in FLAGS.items() if k != "HAS_D"}),
            "backward gradient": (tk._backward_gradient_kernel, FLAGS)}


def kernel_resources(kernel, constexprs: dict, ints: dict, warps: int, arch: int,
                     max_registers: int | None = None) -> dict:
    """Compile ``kernel`` for ``sm_<arch>`` the way a launch would: fp32 pointers aligned to 16 bytes, integer
    arguments from ``ints`` (equal to 1: compiled in as a constant; divisible by 16: marked so), the rest
    i32; ``max_registers``: the launch's ``maxnreg`` cap. Returns Triton's own machine code's registers per
    thread, stack bytes per thread (spills), shared memory per program (bytes), the warps a multiprocessor can
    hold and the instruction counts of :func:`instruction_counts`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = {**constexprs, **{n: 1 for n, v in ints.items() if v == 1 and n in names}}
    signature = {n: "constexpr" if n in constexprs else "*fp32" if n.endswith("_ptr") else "i32" for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or (n not in constexprs and ints.get(n, 1) % 16 == 0)]
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps,
                                                                            "maxnreg": max_registers})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        report = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", report.stdout)
    if report.returncode != 0 or usage is None:
        raise RuntimeError(f"cuobjdump could not read {kernel.fn.__name__}: {report.stderr[-500:]}")
    regs, stack, static_shared = (int(v) for v in usage.groups())
    shared = static_shared + compiled.metadata.shared         # Triton's own shared memory is requested at launch
    per_warp = -(-regs * 32 // 256) * 256                     # registers are allocated per warp, 256 at a time
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), SHARED_PER_SM // max(shared, 1), MAX_BLOCKS_PER_SM)
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": shared,
            "warps_per_sm": min(MAX_WARPS_PER_SM, blocks * warps), **instruction_counts(sass),
            "scans": scan_layouts(compiled.asm["ttgir"])}


#: in Triton GPU IR: a blocked layout's definition, and the operand types that close a tt.scan op
BLOCKED_LAYOUT = re.compile(r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], "
                            r"threadsPerWarp = \[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\]", re.M)
SCAN_OPERAND = re.compile(r"^\s*\}\) : \(tensor<[^,>]*, #(\w+)>", re.M)


def scan_layouts(ttgir: str) -> list[str]:
    """How each ``tl.associative_scan``/``tl.cumsum`` of a kernel (its Triton GPU IR) spreads the scanned axis:
    "elements per thread x lanes x warps" ("?" where the operand's layout is not a plain blocked one). Elements
    within a thread are scanned in registers, lanes by warp shuffles (one level per doubling), and warps through
    shared memory behind a barrier: 4x16x1 is cheaper than 1x32x2 for the same 64 steps."""
    layouts = {m.group(1): {k: [int(v) for v in m.group(i).split(",")]
                            for k, i in (("per_thread", 2), ("lanes", 3), ("warps", 4))}
               for m in BLOCKED_LAYOUT.finditer(ttgir)}
    found = []
    for scan in re.finditer(r'"tt\.scan"\(.*?<\{axis = (\d+)', ttgir):
        axis = int(scan.group(1))
        operand = SCAN_OPERAND.search(ttgir, scan.end())
        shape = layouts.get(operand.group(1)) if operand else None
        found.append("?" if shape is None else
                     "x".join(str(shape[k][axis]) for k in ("per_thread", "lanes", "warps")))
    return found


def instruction_counts(sass: str) -> dict:
    """Static counts of a kernel's machine instructions (``cuobjdump -sass``): all of them, the special-function
    ones (``MUFU``: exp2, reciprocals, ...), the warp shuffles (``SHFL``) and the barriers (``BAR``). A kernel
    without loops (the parallel layout's) runs each instruction once per warp, so its count times warps times
    programs is the work of a launch; a loop's body (the sequential layout's) counts once here. Static counts,
    not timings: a proxy for the work of kernels that differ in their code, not in their memory traffic."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    ops = [op for op in ops if op != "NOP"]
    return {"instructions": len(ops), "mufu": sum(op == "MUFU" for op in ops),
            "shuffles": sum(op == "SHFL" for op in ops), "barriers": sum(op == "BAR" for op in ops)}


def resources(config: str, batch: int, dim: int, groups: int, state: int, length: int, arch: int) -> list[dict]:
    """One row per kernel of ``config`` at the given scan shape."""
    import nnunet_logmamba.ssm.triton_kernel as tk
    if config != "default":
        configure_triton(config)
    s = tk._launch_shape(batch, dim, groups, state, length, tk.LAYOUT)
    sizes = dict(T=s["chunk"], BLOCK_D=s["block_d"], BLOCK_N=s["block_n"], ALIGN=s["align"])
    ints = dict(dim=dim, length=length, groups=groups, heads=s["heads"], state=state, n_chunks=s["n_chunks"],
                n_blocks=s["n_blocks"])
    programs = batch * groups * s["n_blocks"] * (s["n_chunks"] if s["layout"] == "parallel" else 1)
    return [{"config": config, "layout": s["layout"], "kernel": name, "chunk": s["chunk"], "block_d": s["block_d"],
             "warps": s["warps"], "programs": programs, "n_chunks": s["n_chunks"],
             **kernel_resources(kernel, {**flags, **sizes}, ints, s["warps"], arch,
                                s["gradient_registers"] if name == "backward gradient" else None)}
            for name, (kernel, flags) in _kernels(tk, s["layout"]).items()]


def launch_work(row: dict) -> str:
    """Millions of warp-instructions one launch issues: static count x warps x programs for the parallel layout's
    loop-free kernels; for the sequential layout, whose programs run their loop once per chunk, that times the
    chunks ("<", an upper bound: the code outside the loop counts once per chunk too)."""
    work = row["instructions"] * row["warps"] * row["programs"] / 1e6
    if row["layout"] == "parallel":
        return f"{work:.1f}"
    return f"< {work * row['n_chunks']:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["default", "32x1024x8", "seq64x1024x8"])
    parser.add_argument("--shape", type=int, nargs=5, default=[BATCH, DIM, 1, STATE, 16384],
                        metavar=("BATCH", "DIM", "GROUPS", "STATE", "LENGTH"))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        sys.exit(f"triton does not import ({exc}); it comes with torch's CUDA wheels")
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    if args.worker:  # one configuration per process: the module's sizes are globals
        print(json.dumps(resources(args.worker, *args.shape, args.arch)))
        return
    print(f"Shape batch {args.shape[0]}, dim {args.shape[1]}, groups {args.shape[2]}, state {args.shape[3]}, "
          f"length {args.shape[4]}; sm_{args.arch}\n")
    print("| config | layout | kernel | chunk | channels per program | warps | programs | registers | "
          "stack (spill) bytes | shared bytes | warps per SM | instructions (MUFU / SHFL / BAR) | "
          "warp-instructions per launch (M) | scans over steps (per thread x lanes x warps) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        done = subprocess.run([sys.executable, __file__, "--worker", config, "--arch", str(args.arch),
                               "--shape", *map(str, args.shape)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {config} | failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'} |")
            continue
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            print(f"| {r['config']} | {r['layout']} | {r['kernel']} | {r['chunk']} | {r['block_d']} | {r['warps']} | "
                  f"{r['programs']} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | "
                  f"{r['warps_per_sm']} | {r['instructions']} ({r['mufu']} / {r['shuffles']} / {r['barriers']}) | "
                  f"{launch_work(r)} | {', '.join(r['scans']) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
