"""Trainers: nnU-Net's API contract, discovery by the stock finder, doctor CLI."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_logmamba.networks import StageWithMamba
from nnunet_logmamba.blocks import LoGVSSBlock
from nnunet_logmamba.training import (TRAINERS, disable_autocast_in_forward, nnUNetTrainerGVMamba,
                                      nnUNetTrainerLoGVMamba, nnUNetTrainerLoGVMamba_JoinMiddle,
                                      nnUNetTrainerLoGVMamba_K2, nnUNetTrainerLoGVMambaAllStages, nnUNetTrainerLoGVMambaPaperModes,
                                      nnUNetTrainerLoGVMambaAllStagesLean,
                                      nnUNetTrainerLVMamba)
from nnunet_logmamba.training.trainers import parameter_groups

BIN = Path(sys.executable).parent
REQUIRED = {"nnUNetTrainerLoGVMamba", "nnUNetTrainerLVMamba", "nnUNetTrainerGVMamba", "nnUNetTrainerLoGVMambaNoAMP"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clean_env(tmp_path, **extra):
    return {"PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), **extra}


def test_required_trainers_exist_and_are_nnunet_trainers():
    assert REQUIRED <= set(TRAINERS)
    assert any("Join" in n for n in TRAINERS) and any(n.endswith("_K4") for n in TRAINERS)
    assert all(issubclass(cls, nnUNetTrainer) for cls in TRAINERS.values())


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_init_signature_and_static_builder_match_nnunet(name):
    cls = TRAINERS[name]
    assert inspect.signature(cls.__init__) == inspect.signature(nnUNetTrainer.__init__)
    owner = next(c for c in cls.__mro__ if "build_network_architecture" in c.__dict__)
    assert isinstance(owner.__dict__["build_network_architecture"], staticmethod)
    assert list(inspect.signature(cls.build_network_architecture).parameters) == \
        list(inspect.signature(nnUNetTrainer.build_network_architecture).parameters)


def _configuration(patch=(16, 24, 16), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), batch=2):
    """The attributes of nnU-Net's ConfigurationManager that build_network_architecture reads."""
    n, nd = len(strides), len(patch)
    kwargs = {"n_stages": n, "features_per_stage": [4, 8, 16, 16][:n], "conv_op": f"torch.nn.modules.conv.Conv{nd}d",
              "kernel_sizes": [[3] * nd] * n, "strides": [list(s) for s in strides], "n_conv_per_stage": [1] * n,
              "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
              "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{nd}d", "norm_op_kwargs": {"affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
              "nonlin_kwargs": {"inplace": True}}
    return SimpleNamespace(network_arch_class_name="dynamic_network_architectures.architectures.unet.PlainConvUNet",
                           network_arch_init_kwargs=kwargs,
                           network_arch_init_kwargs_req_import=["conv_op", "norm_op", "dropout_op", "nonlin"],
                           patch_size=list(patch), batch_size=batch)


@pytest.mark.parametrize("cls,check", [
    (nnUNetTrainerLoGVMamba, lambda b: b.mode in ("local", "local_global", "global")),
    (nnUNetTrainerLVMamba, lambda b: b.mode == "local"),
    (nnUNetTrainerGVMamba, lambda b: b.mode == "global"),
    (nnUNetTrainerLoGVMamba_JoinMiddle, lambda b: b.join == "middle"),
    (nnUNetTrainerLoGVMamba_K2, lambda b: b.directions == 2),
    (nnUNetTrainerLoGVMambaAllStages, lambda b: b.mode in ("local", "local_global", "global")),
    (nnUNetTrainerLoGVMambaPaperModes, lambda b: b.mode in ("local", "local_global", "global")),
    (nnUNetTrainerLoGVMambaAllStagesLean, lambda b: b.mode in ("local", "local_global", "global")),
])
def test_trainers_build_their_variant(cls, check):
    net = cls.build_network_architecture(None, _configuration(), 1, 2, True)
    blocks = [m.mamba for m in net.modules() if isinstance(m, StageWithMamba)]
    assert blocks and all(check(b) for b in blocks)
    out = net(torch.randn(1, 1, 16, 24, 16))
    assert isinstance(out, list) and out[0].shape == (1, 2, 16, 24, 16)


def test_all_stages_trainer_puts_a_block_after_every_encoder_stage():
    net = nnUNetTrainerLoGVMambaAllStages.build_network_architecture(None, _configuration(), 1, 2, True)
    assert [(p["stage"], p["mode"]) for p in net.log_vmamba_blocks] == \
        [(0, "local"), (1, "local_global"), (2, "local_global"), (3, "global")]
    # on a planned batch of large maps the default's cost cap skips the first stage; all-stages does not
    big = _configuration(patch=(32, 48, 32), batch=8)
    default = nnUNetTrainerLoGVMamba.build_network_architecture(None, big, 1, 2, True)
    every = nnUNetTrainerLoGVMambaAllStages.build_network_architecture(None, big, 1, 2, True)
    assert 0 not in [p["stage"] for p in default.log_vmamba_blocks]
    assert [p["stage"] for p in every.log_vmamba_blocks] == [0, 1, 2, 3]
    # the paper's modes within the cap: the first stage skipped, the others as in the all-stages layout
    capped = nnUNetTrainerLoGVMambaPaperModes.build_network_architecture(None, big, 1, 2, True)
    assert [(p["stage"], p["mode"]) for p in capped.log_vmamba_blocks] == \
        [(1, "local_global"), (2, "local_global"), (3, "global")]
    # the lean all-stages layout: every stage, the one over the cap with a lean, recomputed block
    lean = nnUNetTrainerLoGVMambaAllStagesLean.build_network_architecture(None, big, 1, 2, True)
    assert [p["stage"] for p in lean.log_vmamba_blocks] == [0, 1, 2, 3]
    first = lean.encoder.stages[0].mamba
    assert (first.state_size, first.recompute_tokens) == (8, 100_000)
    assert all(lean.encoder.stages[i].mamba.recompute_tokens is None for i in (1, 2, 3))


def test_ssm_parameters_are_kept_out_of_weight_decay():
    net = nnUNetTrainerLoGVMamba.build_network_architecture(None, _configuration(), 1, 2, True)
    groups = parameter_groups(net, 3e-5)
    assert [g["weight_decay"] for g in groups] == [3e-5, 0.0]
    blocks = [m for m in net.modules() if isinstance(m, LoGVSSBlock)]
    expected = {id(getattr(b, n)) for b in blocks for n in ("A_log", "D", "dt_bias")}
    assert {id(p) for p in groups[1]["params"]} == expected
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    # the trainer's optimiser uses these groups with nnU-Net's schedule
    from nnunet_logmamba.training import nnUNetTrainerLoGVMamba_UniformLR
    trainer = object.__new__(nnUNetTrainerLoGVMamba_UniformLR)
    trainer.network, trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = net, 1e-2, 3e-5, 10
    optimizer, scheduler = trainer.configure_optimizers()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [3e-5, 0.0]
    assert all(g["momentum"] == 0.99 and g["nesterov"] for g in optimizer.param_groups)
    scheduler.step(5)
    assert len({g["lr"] for g in optimizer.param_groups}) == 1 and optimizer.param_groups[0]["lr"] < 1e-2


def test_long_budgets_checkpoint_every_epoch_so_a_stopped_cpu_run_continues():
    from nnunet_logmamba.training import set_budget

    trainer = SimpleNamespace(save_every=50)
    set_budget(trainer, epochs=4, iterations=25, val_iterations=5)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.save_every) == (4, 25, 50)
    set_budget(trainer, epochs=12, iterations=25, val_iterations=5)
    assert trainer.save_every == 1


def test_compile_is_off_unless_requested(monkeypatch):
    trainer = object.__new__(nnUNetTrainerLoGVMamba)  # only the attributes _do_i_compile reads
    trainer.device = torch.device("cuda")
    trainer.print_to_log_file = lambda *args, **kwargs: None
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert nnUNetTrainer._do_i_compile(trainer) is True  # nnU-Net's default on Linux + CUDA
    assert trainer._do_i_compile() is False
    monkeypatch.setenv("nnUNet_compile", "true")
    assert trainer._do_i_compile() is True
    trainer.device = torch.device("cpu")
    assert trainer._do_i_compile() is False


def test_fp32_forward_ignores_an_outer_autocast():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
    disable_autocast_in_forward(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")  # restored after the forward
    assert list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    # a forward that raises still leaves autocast as it found it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            net(torch.randn(4, 3))
        assert torch.is_autocast_enabled("cpu") and net._autocast_off_contexts == []


def test_no_amp_network_is_fp32_as_nnunet_predict_rebuilds_it():
    from nnunet_logmamba.training import nnUNetTrainerLoGVMambaNoAMP

    # the predictor calls the trainer class's builder and nothing of initialize()
    net = nnUNetTrainerLoGVMambaNoAMP.build_network_architecture(None, _configuration(batch=2), 1, 2, False)
    default = nnUNetTrainerLoGVMamba.build_network_architecture(None, _configuration(batch=2), 1, 2, False)
    assert list(net.state_dict()) == list(default.state_dict())      # checkpoints load into either
    x = torch.randn(1, 1, 16, 24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.float32 and default(x).dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_training_step_is_finite():
    net = nnUNetTrainerLoGVMamba.build_network_architecture(None, _configuration(batch=2), 1, 2, True).cuda()
    scaler = torch.amp.GradScaler("cuda")
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    x = torch.randn(2, 1, 16, 24, 16, device="cuda") * 100  # large activations stress fp16
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(o.float().square().mean() for o in net(x))
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_stock_finder_resolves_every_trainer_in_a_clean_interpreter(tmp_path):
    user_folder = tmp_path / "user_trainers"
    user_folder.mkdir()
    script = (
        "import json, os, contextlib, io\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "from nnunet_logmamba.training import TRAINERS\n"
        "found = {}\n"
        "for name in TRAINERS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        found[name] = find(name).__module__\n"
        "print(json.dumps({'ext': os.environ['nnUNet_extTrainer'], 'found': found}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_clean_env(tmp_path, nnUNet_extTrainer=str(user_folder)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    folders = result["ext"].split(os.pathsep)
    assert folders[0] == str(user_folder)  # the user's entry is kept, ours appended
    assert folders[-1].endswith(os.path.join("nnunet_logmamba", "training", "ext_trainers"))
    assert result["found"] == {name: "nnunet_logmamba.training.trainers" for name in TRAINERS}


@pytest.mark.parametrize("command", [["nnunet_logmamba", "doctor"], ["python", "-m", "nnunet_logmamba", "doctor"]])
def test_doctor_reports_discovery_and_backends(tmp_path, command):
    exe = [str(BIN / command[0])] + command[1:] if command[0] != "python" else [sys.executable] + command[1:]
    proc = subprocess.run(exe, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "nnunetv2 2." in out and "start-up hook registered our trainer folder: yes" in out
    for name in TRAINERS:
        assert f"ok  {name}" in out
    assert "scan backend on cpu: auto -> " in out and "mamba-ssm kernel:" in out and "CUDA:" in out
    assert out.strip().endswith("status: ok")


def test_cpu_threads_follow_omp_num_threads(monkeypatch):
    from nnunet_logmamba.training import respect_omp_num_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        respect_omp_num_threads(torch.device("cuda"))  # GPU runs are left alone
        assert torch.get_num_threads() == 2
        respect_omp_num_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored
        torch.set_num_threads(2)
        respect_omp_num_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_seeded_budget_trainers_share_conv_init_and_data_stream(monkeypatch):
    """BIOIMAGE_MAMBA_SEED: a plain and a LoG-VMamba budget run start from the same conv weights and draw the same
    batches, although building the LoG-VMamba network draws more random numbers (its blocks)."""
    import random

    import numpy as np

    from nnunet_logmamba.training.trainers import SEED_ENV, budget_variant

    class FakePlain:
        was_initialized = False

        def initialize(self):  # stands for nnU-Net building the planned network
            self.conv = torch.randn(4)
            self.was_initialized = True

        def print_to_log_file(self, *args):
            pass

    class FakeLoG(FakePlain):
        def initialize(self):
            super().initialize()
            self.blocks = torch.randn(7)    # the blocks' own initialisation, after the convs

    def run(base):
        trainer_class = budget_variant(base, 12, 25, 5, "test budget")
        trainer = object.__new__(trainer_class)
        trainer_class.initialize(trainer)
        return trainer.conv, (torch.rand(3), np.random.rand(3), random.random())   # the first "batches"

    monkeypatch.setenv(SEED_ENV, "7")
    conv_plain, stream_plain = run(FakePlain)
    conv_log, stream_log = run(FakeLoG)
    assert torch.equal(conv_plain, conv_log)
    assert torch.equal(stream_plain[0], stream_log[0]) and np.array_equal(stream_plain[1], stream_log[1])
    assert stream_plain[2] == stream_log[2]
    monkeypatch.setenv(SEED_ENV, "8")
    assert not torch.equal(run(FakePlain)[0], conv_plain)
    monkeypatch.setenv(SEED_ENV, "seven")
    with pytest.raises(ValueError, match="not an integer seed"):
        run(FakePlain)


@pytest.mark.parametrize("name", ["nnUNetTrainerLoGVMamba", "nnUNetTrainerLoGVMamba_FastReadout",
                                  "nnUNetTrainerLoGVMambaAllStages"])
def test_fast_readout_trains_the_output_projections_at_a_scaled_learning_rate(name):
    from nnunet_logmamba.training import TRAINERS

    net = nnUNetTrainerLoGVMamba.build_network_architecture(None, _configuration(), 1, 2, True)
    trainer = object.__new__(TRAINERS[name])
    trainer.network, trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = net, 1e-2, 3e-5, 10
    optimizer, scheduler = trainer.configure_optimizers()
    blocks = [m for m in net.modules() if isinstance(m, LoGVSSBlock)]
    readout = {id(b.out_proj.weight) for b in blocks}
    assert {id(p) for p in optimizer.param_groups[2]["params"]} == readout
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    for epoch in (0, 5):
        scheduler.step(epoch)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs[0] == lrs[1] and lrs[2] == pytest.approx(10 * lrs[0]) and lrs[0] < 1e-2 + 1e-12
    # every block still starts as the identity
    assert all(float(b.out_proj.weight.detach().abs().max()) == 0 for b in blocks)


def _sgd_state(net, groups):
    """An SGD optimiser over ``groups`` after two steps on ``net`` (so every parameter has a momentum buffer)."""
    optimizer = torch.optim.SGD(groups, 1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(2, 1, 16, 24, 16)
    for _ in range(2):
        optimizer.zero_grad()
        sum(o.float().pow(2).mean() for o in net(x)).backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("old_scale", [None, 1.0])
def test_continuing_a_checkpoint_of_fewer_optimiser_groups_keeps_each_parameters_momentum(old_scale):
    from nnunet_logmamba.training.trainers import regroup_optimizer_state

    torch.manual_seed(0)
    net = nnUNetTrainerLoGVMamba.build_network_architecture(None, _configuration(), 1, 2, True)
    # an earlier release: one group (nnU-Net's) or two (SSM parameters without weight decay)
    old_groups = [{"params": list(net.parameters())}] if old_scale is None else parameter_groups(net, 3e-5, old_scale)
    old = _sgd_state(net, old_groups)
    momentum = {id(p): old.state[p]["momentum_buffer"].clone() for p in net.parameters()}
    saved = old.state_dict()

    trainer = object.__new__(nnUNetTrainerLoGVMamba)
    trainer.network, trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = net, 1e-2, 3e-5, 10
    optimizer, _ = trainer.configure_optimizers()
    assert len(optimizer.param_groups) == 3 != len(saved["param_groups"])
    with pytest.raises(ValueError):  # torch refuses the old groups as they are
        optimizer.load_state_dict(saved)
    optimizer.load_state_dict(regroup_optimizer_state(saved, optimizer, net, 3e-5))
    assert [g["lr_scale"] for g in optimizer.param_groups if "lr_scale" in g] == [10.0]
    for p in net.parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum[id(p)])
    # a state of the current grouping passes unchanged; one of another network is refused clearly
    current = optimizer.state_dict()
    assert regroup_optimizer_state(current, optimizer, net, 3e-5) is current
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 1e-2).state_dict()
    with pytest.raises(ValueError, match="another network"):
        regroup_optimizer_state(other, optimizer, net, 3e-5)
