"""``nnunet_logmamba`` command line: ``doctor`` checks that nnU-Net can find and run our trainers;
``from-plain`` turns a trained plain nnU-Net into a LoG-VMamba starting point.

    nnunet_logmamba doctor
    python -m nnunet_logmamba doctor
    nnunet_logmamba from-plain fold_0/checkpoint_final.pth start.pth [-tr nnUNetTrainerLoGVMamba]

It exits 1 when a trainer is not discoverable or the scan backend a device would use disagrees with the
``reference`` backend on a tiny problem, so that it can gate scripts (``nnunet_logmamba doctor && ...``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys


def _nnunet_finds(name: str) -> tuple[bool, str]:
    """Whether nnU-Net's own trainer search resolves ``name`` to our class (its prints silenced)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cls = recursive_find_trainer_class_by_name(name)
    except Exception as exc:  # RuntimeError when not found, ImportError from a broken module
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    ok = cls.__module__.startswith("nnunet_logmamba.")
    return ok, f"{cls.__module__}.{cls.__qualname__}"


def scan_parity(device: str, atol: float = 1e-4, rtol: float = 1e-3) -> tuple[bool, str]:
    """Run the scan a model on ``device`` would use (``backend="auto"``) on a tiny problem (forward and
    gradients) and compare it with the ``reference`` backend. Returns (ok, what was found)."""
    import functools

    import torch

    from .ssm import selective_scan
    from .ssm.parity import scan_and_reference

    worst, ok = 0.0, True
    try:
        # B and C shared by all channels, then in two channel groups: the kernels index them differently
        for groups in (1, 2):
            pairs = scan_and_reference(functools.partial(selective_scan, backend="auto"), device, groups=groups)
            worst = max(worst, max(float((a - r).abs().max()) for a, r in pairs))
            ok = ok and all(torch.isfinite(a).all() and torch.allclose(a, r, atol=atol, rtol=rtol) for a, r in pairs)
    except Exception as exc:  # a backend that cannot run at all fails the check as much as a wrong one
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return bool(ok), f"largest difference {worst:.1e} on output and gradients (shared and grouped B/C)"


def doctor() -> int:
    """Print versions, trainer discovery, scan backends (with a parity check each), CUDA and mamba-ssm status.

    Returns 0 when everything works, 1 when anything above is marked NO or FAILED.
    """
    import nnunetv2  # noqa: F401
    import torch
    from importlib.metadata import PackageNotFoundError, version

    from .ssm import (auto_backend_reason, available_backends, cpu_kernel_status, mamba_ssm_status, resolve_backend,
                      triton_status)
    from .training import TRAINERS

    def pkg_version(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    problems = 0
    print(f"nnunetv2 {pkg_version('nnunetv2')}, dynamic-network-architectures "
          f"{pkg_version('dynamic-network-architectures')}, torch {torch.__version__}, python {sys.version.split()[0]}")
    ext = os.environ.get("nnUNet_extTrainer", "")
    ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training", "ext_trainers")
    registered = ours in [p for p in ext.split(os.pathsep) if p]
    print(f"nnUNet_extTrainer: {ext or '(unset)'}")
    print(f"  start-up hook registered our trainer folder: {'yes' if registered else 'NO'}")
    if not registered:
        problems += 1
        print("  fix: reinstall the package (pip install bioimage-mamba) so its .pth start-up hook is in "
              f"site-packages, or export nnUNet_extTrainer={ours}")
    print("trainers (found by nnU-Net's own finder, as nnUNetv2_train -tr NAME does):")
    for name in sorted(TRAINERS):
        ok, where = _nnunet_finds(name)
        problems += not ok
        print(f"  {'ok ' if ok else 'NO '} {name:45s} {where}")
    cuda = torch.cuda.is_available()
    mamba_ok, mamba_reason = mamba_ssm_status()
    print(f"CUDA: {'available, ' + torch.cuda.get_device_name(0) if cuda else 'not available'}"
          f" (torch built for CUDA {torch.version.cuda})")
    print(f"mamba-ssm kernel: {'importable' if mamba_ok else 'not importable'} ({mamba_reason})")
    triton_ok, triton_reason = triton_status()
    print(f"triton kernels: {'importable' if triton_ok else 'not importable'} ({triton_reason}; used on CUDA "
          "when mamba-ssm is not)")
    cpu_ok, cpu_reason = cpu_kernel_status()
    print(f"CPU scan kernel: {'available' if cpu_ok else 'not available'} ({cpu_reason}; used on CPU, else the "
          "chunked torch scan)")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for device in devices:
        u = torch.zeros(1, 1, 1, device=device)
        a = torch.zeros(1, 1, device=device)
        try:
            backend = resolve_backend("auto", u, a)
        except ValueError as exc:      # e.g. a misspelt BIOIMAGE_MAMBA_SCAN_BACKEND
            problems += 1
            print(f"scan backend on {device}: NO ({exc})")
            continue
        ok, detail = scan_parity(device)
        problems += not ok
        print(f"scan backend on {device}: auto -> {backend} ({auto_backend_reason(u, a)}; "
              f"available: {', '.join(available_backends(device))}); parity with reference: "
              f"{'ok' if ok else 'FAILED'} ({detail})")
        if not ok:
            print(f"  fix: set BIOIMAGE_MAMBA_SCAN_BACKEND=torch (or reference) to avoid {backend} on {device}, "
                  "and report this")
    print("status: " + ("ok" if problems == 0 else f"{problems} problem(s), see above"))
    return 0 if problems == 0 else 1


def from_plain(args) -> int:
    """Convert a plain nnU-Net checkpoint for ``-pretrained_weights``; 0, or 2 with the reason on stderr."""
    from .training.from_plain import convert_plain_checkpoint

    if not os.path.isfile(args.checkpoint):
        print(f"error: {args.checkpoint}: no such file (a plain training's fold_X/checkpoint_final.pth)",
              file=sys.stderr)
        return 2
    try:
        found = convert_plain_checkpoint(args.checkpoint, args.output, args.trainer, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {found['plain']} tensors of the plain network, {found['new']} of new LoG-VMamba "
          "blocks (each the identity at the start; nnU-Net restarts the 1x1 segmentation layers of any "
          "pretrained weights)\n"
          f"train with: nnUNetv2_train {found['dataset']} {found['configuration']} FOLD -tr {args.trainer} "
          f"-p {found['plans']} -pretrained_weights {args.output}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet_logmamba", description="LoG-VMamba trainers for nnU-Net v2")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check nnU-Net discovery of the trainers, scan backends, CUDA and mamba-ssm")
    convert = sub.add_parser("from-plain", help="turn a trained plain nnU-Net checkpoint into -pretrained_weights "
                                                "for a LoG-VMamba trainer (same plans)")
    convert.add_argument("checkpoint", help="the plain training's fold_X/checkpoint_final.pth (or _best)")
    convert.add_argument("output", help="the file to write, e.g. plain_start.pth")
    convert.add_argument("-tr", "--trainer", default="nnUNetTrainerLoGVMamba",
                         help="the LoG-VMamba trainer that will train from it (default: %(default)s)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor()
    if args.command == "from-plain":
        return from_plain(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
