"""``nnunet_logmamba doctor`` gates scripts: a non-zero exit when a trainer is not found or a scan backend is wrong."""
import os

import pytest
import torch

from nnunet_logmamba import cli
from nnunet_logmamba.ssm import dispatch


@pytest.fixture()
def healthy(monkeypatch):
    """Trainer discovery passes without running nnU-Net's finder (the subprocess test in test_trainers does that)."""
    ours = os.path.join(os.path.dirname(os.path.abspath(cli.__file__)), "training", "ext_trainers")
    monkeypatch.setenv("nnUNet_extTrainer", ours)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(cli, "_nnunet_finds", lambda name: (True, "nnunet_logmamba.training.trainers." + name))


def test_doctor_passes_when_everything_works(healthy, capsys):
    assert cli.doctor() == 0
    out = capsys.readouterr().out
    assert "parity with reference: ok" in out and out.strip().endswith("status: ok")


def cpu_auto_backend() -> str:
    """What ``auto`` runs on CPU here (the compiled kernel where a C compiler exists, else torch)."""
    return dispatch.resolve_backend("auto", torch.zeros(1, 1, 1), torch.zeros(1, 1))


def test_doctor_fails_when_the_backend_a_device_uses_is_wrong(healthy, monkeypatch, capsys):
    backend = cpu_auto_backend()
    correct = dispatch._IMPLEMENTATIONS[backend]

    def slightly_wrong(*args, **kwargs):
        return correct(*args, **kwargs) * 1.01

    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, backend, slightly_wrong)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the CPU path is the one patched
    assert cli.doctor() == 1
    out = capsys.readouterr().out
    assert f"scan backend on cpu: auto -> {backend}" in out and "parity with reference: FAILED" in out
    assert "BIOIMAGE_MAMBA_SCAN_BACKEND" in out and "1 problem(s)" in out


def test_doctor_checks_grouped_b_and_c_too(healthy, monkeypatch, capsys):
    backend = cpu_auto_backend()
    correct = dispatch._IMPLEMENTATIONS[backend]

    def wrong_when_grouped(u, delta, A, B, C, **kwargs):   # every group reads the first group's B
        if B.dim() == 4:
            B = B[:, :1].expand_as(B)
        return correct(u, delta, A, B, C, **kwargs)

    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, backend, wrong_when_grouped)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.doctor() == 1
    assert "parity with reference: FAILED" in capsys.readouterr().out


def test_doctor_fails_when_a_backend_cannot_run(healthy, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel image is not available")

    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, cpu_auto_backend(), broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["doctor"]) == 1
    assert "FAILED (RuntimeError: kernel image is not available)" in capsys.readouterr().out


def test_doctor_fails_when_a_trainer_is_not_discoverable(healthy, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_nnunet_finds", lambda name: (name != "nnUNetTrainerLoGVMamba", "RuntimeError: not found"))
    assert cli.doctor() == 1
    assert "NO  nnUNetTrainerLoGVMamba" in capsys.readouterr().out


def test_doctor_fails_on_a_misspelt_backend_override(healthy, monkeypatch, capsys):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fastest")
    assert cli.doctor() == 1
    assert "scan backend on cpu: NO" in capsys.readouterr().out
