"""``nnunet_logmamba`` command line: ``doctor`` checks that nnU-Net can find and run our trainers.

    nnunet_logmamba doctor
    python -m nnunet_logmamba doctor
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


def doctor() -> int:
    """Print versions, trainer discovery, scan backends, CUDA and mamba-ssm status. Returns an exit code."""
    import nnunetv2  # noqa: F401
    import torch
    from importlib.metadata import PackageNotFoundError, version

    from .ssm import available_backends, mamba_ssm_status, resolve_backend
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
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for device in devices:
        u = torch.zeros(1, 1, 1, device=device)
        a = torch.zeros(1, 1, device=device)
        print(f"scan backend on {device}: auto -> {resolve_backend('auto', u, a)}"
              f" (available: {', '.join(available_backends(device))})")
    print("status: " + ("ok" if problems == 0 else f"{problems} problem(s), see above"))
    return 0 if problems == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet_logmamba", description="LoG-VMamba trainers for nnU-Net v2")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check nnU-Net discovery of the trainers, scan backends, CUDA and mamba-ssm")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return doctor()
    return 2


if __name__ == "__main__":
    sys.exit(main())
