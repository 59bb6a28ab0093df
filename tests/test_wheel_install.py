"""A plain (non-editable) `pip install` of the wheel makes nnU-Net's own lookup find our trainers."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_registers_trainers_for_nnunet(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True, timeout=600, capture_output=True)
    wheel = next(dist.glob("bioimage_mamba-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # dependencies (torch, nnunetv2, ...) from this environment; a bare path line does not run its .pth files,
    # so this environment's editable install of the project stays invisible there
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "PYTHON"))}
    code = ("import inspect, os\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name\n"
            "cls = recursive_find_trainer_class_by_name('nnUNetTrainerLoGVMamba')\n"
            "print('FOLDER', os.environ['nnUNet_extTrainer'])\n"
            "print('CLASS', cls.__name__, inspect.getfile(cls))\n"
            "from nnunet_logmamba.ssm import cpu_kernel_status\n"
            "print('KERNEL', *cpu_kernel_status())\n")
    result = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("FOLDER", "CLASS", "KERNEL")))
    assert lines["FOLDER"].startswith(str(site)), lines
    name, path = lines["CLASS"].split(" ", 1)
    assert name == "nnUNetTrainerLoGVMamba" and path.startswith(str(site)), lines
    # the C scan's source ships in the wheel, so the CPU kernel builds (or loads) where a compiler exists
    from nnunet_logmamba.ssm.cpu_kernel import find_compiler
    if find_compiler() is not None:
        assert lines["KERNEL"].startswith("True"), lines["KERNEL"]
