"""nnU-Net v2 trainers that train the planned U-Net with LoG-VMamba blocks.

Use them with the stock commands (the package's start-up hook makes nnU-Net find them):

    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerLoGVMamba
    nnUNetv2_predict -i IN -o OUT -d DATASET -c 3d_fullres -f 0 -tr nnUNetTrainerLoGVMamba

Every trainer keeps nnU-Net's ``__init__`` signature (nnU-Net rebuilds trainers from it) and builds
its network in the static ``build_network_architecture`` (nnU-Net's predictor calls it on the class).
Class names are stored in checkpoints: renaming one breaks prediction from old checkpoints.
"""

import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..networks import LoGVMambaConfig, build_log_vmamba_network
from .optimizer_groups import ScaledPolyLRScheduler, parameter_groups, regroup_optimizer_state

_TRUE = ("true", "1", "t")


def respect_omp_num_threads(device: torch.device) -> None:
    """On CPU, use ``OMP_NUM_THREADS`` torch threads when the user set it.

    ``nnUNetv2_train -device cpu`` sets as many threads as the machine has cores. On a shared machine
    that oversubscribes the cores, and the scan's many small operations then wait on descheduled
    threads (measured here: 10x slower per operation with 2 threads on 2 busy cores than with 1).
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    if torch.device(device).type == "cpu" and value.isdigit() and int(value) > 0:
        torch.set_num_threads(int(value))


def network_builder(config: LoGVMambaConfig, fp32_forward: bool = False) -> staticmethod:
    """A ``build_network_architecture`` staticmethod that inserts blocks configured by ``config``.

    ``fp32_forward``: the network's forward runs with autocast off, whatever the caller opened. In the
    builder, not in ``initialize``: ``nnUNetv2_predict`` opens autocast on CUDA too and rebuilds the
    network through this method only.
    """

    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        network = build_log_vmamba_network(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels, num_output_channels, configuration_manager.patch_size,
            configuration_manager.batch_size, enable_deep_supervision, config)
        if fp32_forward:
            disable_autocast_in_forward(network)
        return network

    build_network_architecture.__doc__ = f"The planned U-Net with LoG-VMamba blocks ({config})."
    return staticmethod(build_network_architecture)


class nnUNetTrainerLoGVMamba(nnUNetTrainer):
    """LoG-VMamba: LTX on large maps, LTX + GTX on middle maps, GTX on the smallest (by spatial size)."""

    log_vmamba_config = LoGVMambaConfig()
    build_network_architecture = network_builder(log_vmamba_config)
    #: learning-rate factor of the blocks' output projections (see ``parameter_groups``): they start at zero
    #: (each block the identity) and at nnU-Net's own rate barely grow in a short training (blocks change the
    #: features by 0.2-2.2 % after 300 steps on hippocampus; 1.6-19 % at 10x, Dice not lower)
    readout_lr_scale = 10.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        respect_omp_num_threads(device)

    def _do_i_compile(self) -> bool:
        # Mamba blocks and torch.compile do not mix reliably; compile only when the user asks for it.
        if os.environ.get("nnUNet_compile", "").lower() not in _TRUE:
            return False
        return super()._do_i_compile()

    def configure_optimizers(self):
        # nnU-Net's SGD schedule (same lr, momentum, nesterov, poly decay), without decaying the SSM's
        # A_log / D / dt_bias. The poly scheduler sets the lr of every group.
        optimizer = torch.optim.SGD(parameter_groups(self.network, self.weight_decay, self.readout_lr_scale),
                                    self.initial_lr, momentum=0.99, nesterov=True)
        return optimizer, ScaledPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def bare_network(self) -> torch.nn.Module:
        """The network itself, without the torch.compile and DDP wrappers nnU-Net may have put around it."""
        network = self.network._orig_mod if hasattr(self.network, "_orig_mod") else self.network
        return network.module if hasattr(network, "module") else network

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # --c on a checkpoint of an earlier release (fewer optimiser groups): keep each parameter's momentum.
        # nnU-Net's load_checkpoint reads the file itself (it cannot take a dict), so the regrouping goes
        # into the optimiser's load_state_dict for the duration of the call.
        if not self.was_initialized:
            self.initialize()
        network = self.bare_network()
        optimizer, load_state_dict = self.optimizer, self.optimizer.load_state_dict
        optimizer.load_state_dict = lambda state: load_state_dict(
            regroup_optimizer_state(state, optimizer, network, self.weight_decay))
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            del optimizer.load_state_dict

    def initialize(self):
        super().initialize()
        network = self.bare_network()
        placed = getattr(network, "log_vmamba_blocks", [])
        self.print_to_log_file(f"LoG-VMamba blocks ({type(self).__name__}): "
                               + "; ".join(f"{p['where']} stage {p['stage']} {p['size']} {p['mode']}" for p in placed))


class nnUNetTrainerLoGVMambaCapped(nnUNetTrainerLoGVMamba):
    """The default's layout under a name of its own (blocks only on the stages whose maps fit the size rule's
    cost cap), so that runs of it stay identifiable if the default ever changes."""

    log_vmamba_config = LoGVMambaConfig()
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMambaAllStages(nnUNetTrainerLoGVMamba):
    """The official LoG-VMamba 3D layout: a block after every encoder stage, the largest map included.

    LTX only on the first stage, LTX + GTX on the middle ones (GTX to an 8-per-axis grid), GTX only
    on the last (4 per axis). No cost cap: on nnU-Net's large first maps this is the expensive layout
    (see ``benchmarks/results/bench_network_cpu.md``).
    """

    log_vmamba_config = LoGVMambaConfig(placement="all_stages", global_max_edge=8, last_global_max_edge=4)
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMambaAllStagesLean(nnUNetTrainerLoGVMamba):
    """The all-stages layout with a lean block on the maps over the cost cap (the full-size one in 3D).

    That block has half the inner width and state size 8 (on nnU-Net's 32-channel first stage its
    LTX squeezes 16 channels to one: 27 token channels in 3D) and recomputes its activations during
    backward, in chunks of whole samples within the cost cap (one sample at a time on nnU-Net's 3D
    plans), so that the full-size map gets its long-range scan at a fraction of the all-stages
    layout's cost.
    """

    log_vmamba_config = LoGVMambaConfig(placement="all_stages", global_max_edge=8, last_global_max_edge=4,
                                        large_map_expand=0.5, large_map_state_size=8, large_map_recompute=True)
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMambaPaperModes(nnUNetTrainerLoGVMamba):
    """The official model's token modes and GTX grids, on the stages within the default's cost cap.

    As ``nnUNetTrainerLoGVMambaAllStages`` (LTX + GTX on the middle stages with GTX to an 8-per-axis
    grid, GTX only to 4 per axis on the last), but a stage whose maps hold more than the size rule's
    ``max_batch_tokens`` positions per batch gets no block: on 3D plans, the full-size first stage.
    """

    log_vmamba_config = LoGVMambaConfig(placement="all_stages_capped", global_max_edge=8, last_global_max_edge=4)
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMamba_FastReadout(nnUNetTrainerLoGVMamba):
    """The blocks' output projections learn at 10x nnU-Net's learning rate, as in the default (name kept for its checkpoints)."""

    readout_lr_scale = 10.0


class nnUNetTrainerLoGVMamba_UniformLR(nnUNetTrainerLoGVMamba):
    """Ablation: every parameter at nnU-Net's learning rate (the output projections too)."""

    readout_lr_scale = 1.0


class nnUNetTrainerLVMamba(nnUNetTrainerLoGVMamba):
    """L-VMamba ablation: LTX only, wherever a block is placed."""

    log_vmamba_config = LoGVMambaConfig().with_(variant="local")
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerGVMamba(nnUNetTrainerLoGVMamba):
    """G-VMamba ablation: vanilla depthwise conv + GTX, wherever a block is placed."""

    log_vmamba_config = LoGVMambaConfig().with_(variant="global")
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMambaNoAMP(nnUNetTrainerLoGVMamba):
    """LoG-VMamba trained fully in fp32 (no autocast, no gradient scaler) on every device."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.grad_scaler = None

    # nnU-Net's train and validation steps and nnUNetv2_predict open autocast on CUDA
    build_network_architecture = network_builder(nnUNetTrainerLoGVMamba.log_vmamba_config, fp32_forward=True)


def disable_autocast_in_forward(module: torch.nn.Module) -> None:
    """Run ``module``'s forward with autocast off for its device, whatever the caller opened.

    Forward hooks rather than a wrapper module, so the state dict keys stay those of the network.
    """
    def enter(mod, args):
        device = next(mod.parameters()).device.type
        context = torch.autocast(device_type=device, enabled=False)
        context.__enter__()
        mod._autocast_off_contexts = getattr(mod, "_autocast_off_contexts", []) + [context]

    def leave(mod, args, output):
        mod._autocast_off_contexts.pop().__exit__(None, None, None)
        return output

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)   # also when the forward raises (e.g. out of memory)


# --- ablations of the join order (default: interleaved) and of the scan directions K (default 1) ---

class nnUNetTrainerLoGVMamba_JoinHead(nnUNetTrainerLoGVMamba):
    log_vmamba_config = LoGVMambaConfig(join="head")
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMamba_JoinMiddle(nnUNetTrainerLoGVMamba):
    log_vmamba_config = LoGVMambaConfig(join="middle")
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMamba_JoinSplit(nnUNetTrainerLoGVMamba):
    log_vmamba_config = LoGVMambaConfig(join="split")
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMamba_K2(nnUNetTrainerLoGVMamba):
    log_vmamba_config = LoGVMambaConfig(directions=2)
    build_network_architecture = network_builder(log_vmamba_config)


class nnUNetTrainerLoGVMamba_K4(nnUNetTrainerLoGVMamba):
    log_vmamba_config = LoGVMambaConfig(directions=4)
    build_network_architecture = network_builder(log_vmamba_config)


# --- short budgets (nnU-Net has no epochs flag) for tests, CPU evaluations and debugging ---

def set_budget(trainer: nnUNetTrainer, epochs: int, iterations: int, val_iterations: int) -> None:
    """Shorten a trainer's schedule (the poly LR schedule follows ``num_epochs``).

    Budgets of 12 epochs and more write ``checkpoint_latest.pth`` after every epoch (nnU-Net: every
    50), so that a long CPU run that is stopped continues with ``nnUNetv2_train ... --c``.
    """
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    if epochs >= 12:
        trainer.save_every = 1


#: Environment variable with an integer seed for the budget trainers (paired comparisons, see below).
SEED_ENV = "BIOIMAGE_MAMBA_SEED"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (nnU-Net's sampling and augmentation use them)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def comparison_seed() -> int | None:
    """The seed in ``$BIOIMAGE_MAMBA_SEED``, or None when unset; a clear error when it is not an integer."""
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV}={value!r} is not an integer seed; unset it or give e.g. {SEED_ENV}=0") from None


def budget_variant(base: type, epochs: int, iterations: int, val_iterations: int, doc: str) -> type:
    """A subclass of ``base`` with a short schedule, named nnU-Net's way (``<base>_<E>epochs_<I>iters``).

    The class keeps nnU-Net's ``__init__`` signature and lives in this module, so the stock finder and
    checkpoints (which store the class name) see it like any hand-written trainer.

    With ``$BIOIMAGE_MAMBA_SEED`` set, a budget trainer seeds the global generators before building its
    network and again right after: a plain and a LoG-VMamba run with the same seed then start from the
    same convolution weights (the blocks draw their own initialisation after those) and see the same
    sequence of training batches and augmentations (common random numbers), so a short comparison
    measures the blocks rather than the luck of the draw. Unset, nnU-Net's usual unseeded behaviour.
    """
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        respect_omp_num_threads(device)  # the plain baselines too, so both sides use the same threads
        set_budget(self, epochs=epochs, iterations=iterations, val_iterations=val_iterations)

    def initialize(self):
        seed = comparison_seed()
        if seed is not None and not self.was_initialized:
            seed_everything(seed)
            base.initialize(self)
            seed_everything(seed + 1)  # the same data stream whatever the network drew for its blocks
            self.print_to_log_file(f"{SEED_ENV}={seed}: seeded before and after building the network")
        else:
            base.initialize(self)

    suffix = "_1epoch_2iters" if (epochs, iterations) == (1, 2) else f"_{epochs}epochs_{iterations}iters"
    name = base.__name__ + suffix
    return type(name, (base,), {"__init__": __init__, "initialize": initialize, "__doc__": doc, "__module__": __name__,
                                "__qualname__": name})


nnUNetTrainerLoGVMamba_1epoch_2iters = budget_variant(
    nnUNetTrainerLoGVMamba, 1, 2, 1, "Smoke-test budget: 1 epoch of 2 training and 1 validation iteration.")
nnUNetTrainerLoGVMamba_4epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMamba, 4, 25, 5, "Short CPU evaluation budget: 4 epochs of 25 iterations (100 steps).")
nnUNetTrainer_4epochs_25iters = budget_variant(
    nnUNetTrainer, 4, 25, 5, "The plain nnU-Net baseline at the 100-step budget.")
nnUNetTrainerLoGVMamba_12epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMamba, 12, 25, 5, "CPU evaluation budget: 12 epochs of 25 iterations (300 steps).")
nnUNetTrainerLoGVMamba_FastReadout_12epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMamba_FastReadout, 12, 25, 5, "Fast block read-out at the 300-step budget.")
nnUNetTrainerLoGVMamba_UniformLR_12epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMamba_UniformLR, 12, 25, 5, "Uniform learning rate at the 300-step budget.")
nnUNetTrainerLoGVMambaAllStages_12epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMambaAllStages, 12, 25, 5, "The all-stages layout at the 300-step budget.")
nnUNetTrainerLoGVMambaAllStagesLean_12epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMambaAllStagesLean, 12, 25, 5, "The lean all-stages layout at the 300-step budget.")
nnUNetTrainerLoGVMambaPaperModes_12epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMambaPaperModes, 12, 25, 5, "The paper's modes within the cost cap at the 300-step budget.")
nnUNetTrainerLVMamba_12epochs_25iters = budget_variant(
    nnUNetTrainerLVMamba, 12, 25, 5, "L-VMamba ablation at the 300-step budget.")
nnUNetTrainerGVMamba_12epochs_25iters = budget_variant(
    nnUNetTrainerGVMamba, 12, 25, 5, "G-VMamba ablation at the 300-step budget.")
nnUNetTrainer_12epochs_25iters = budget_variant(
    nnUNetTrainer, 12, 25, 5, "The plain nnU-Net baseline at the 300-step budget.")
nnUNetTrainer_18epochs_25iters = budget_variant(
    nnUNetTrainer, 18, 25, 5, "Plain nnU-Net given the CPU wall time of the all-stages layout's 300 steps (1.5x: 450 steps).")
nnUNetTrainerLoGVMambaCapped_14epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMambaCapped, 14, 25, 5,
    "The capped layout given the CPU wall time of the lean all-stages layout's 300 steps (1.296x / 1.096x: 350 steps).")
nnUNetTrainerLoGVMamba_40epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMamba, 40, 25, 5, "1000-step CPU budget: 40 epochs of 25 iterations.")
nnUNetTrainer_40epochs_25iters = budget_variant(
    nnUNetTrainer, 40, 25, 5, "The plain nnU-Net baseline at the 1000-step budget.")
nnUNetTrainerLoGVMambaAllStages_40epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMambaAllStages, 40, 25, 5, "The all-stages layout at the 1000-step budget.")
nnUNetTrainerLoGVMambaAllStagesLean_40epochs_25iters = budget_variant(
    nnUNetTrainerLoGVMambaAllStagesLean, 40, 25, 5, "The lean all-stages layout at the 1000-step budget.")


__all__ = ["TRAINERS", "SEED_ENV", "seed_everything", "comparison_seed", "parameter_groups", "regroup_optimizer_state", "budget_variant", "network_builder", "set_budget", "respect_omp_num_threads", "disable_autocast_in_forward"]

#: Every trainer this package provides (the names nnU-Net's -tr option accepts).
TRAINERS = {cls.__name__: cls for cls in (
    nnUNetTrainerLoGVMamba, nnUNetTrainerLoGVMambaAllStages, nnUNetTrainerLVMamba, nnUNetTrainerGVMamba,
    nnUNetTrainerLoGVMambaNoAMP,
    nnUNetTrainerLoGVMamba_JoinHead, nnUNetTrainerLoGVMamba_JoinMiddle, nnUNetTrainerLoGVMamba_JoinSplit,
    nnUNetTrainerLoGVMamba_K2, nnUNetTrainerLoGVMamba_K4, nnUNetTrainerLoGVMamba_1epoch_2iters,
    nnUNetTrainerLoGVMamba_4epochs_25iters, nnUNetTrainer_4epochs_25iters,
    nnUNetTrainerLoGVMamba_12epochs_25iters, nnUNetTrainer_12epochs_25iters,
    nnUNetTrainerLoGVMambaAllStages_12epochs_25iters, nnUNetTrainerLVMamba_12epochs_25iters,
    nnUNetTrainerLoGVMamba_FastReadout, nnUNetTrainerLoGVMamba_FastReadout_12epochs_25iters,
    nnUNetTrainerLoGVMamba_UniformLR, nnUNetTrainerLoGVMamba_UniformLR_12epochs_25iters,
    nnUNetTrainerGVMamba_12epochs_25iters, nnUNetTrainerLoGVMamba_40epochs_25iters, nnUNetTrainer_40epochs_25iters,
    nnUNetTrainerLoGVMambaAllStages_40epochs_25iters, nnUNetTrainerLoGVMambaPaperModes,
    nnUNetTrainerLoGVMambaPaperModes_12epochs_25iters, nnUNetTrainer_18epochs_25iters,
    nnUNetTrainerLoGVMambaAllStagesLean, nnUNetTrainerLoGVMambaAllStagesLean_12epochs_25iters,
    nnUNetTrainerLoGVMambaAllStagesLean_40epochs_25iters, nnUNetTrainerLoGVMambaCapped, nnUNetTrainerLoGVMambaCapped_14epochs_25iters)}
__all__ += sorted(TRAINERS)
