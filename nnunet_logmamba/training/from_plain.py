"""Start a LoG-VMamba training from a trained plain nnU-Net.

nnU-Net's ``-pretrained_weights`` needs every tensor of the new network in the file it loads, so a plain
nnU-Net checkpoint does not load into a LoG-VMamba network as it is: a stage with a block is wrapped
(``encoder.stages.3.stage.*``) and the blocks are new. :func:`convert_plain_checkpoint` writes the plain
network's tensors under our names next to freshly built blocks. A fresh block is the identity (its output
projection starts at zero), so with all its tensors the converted network computes exactly what the plain one
did. Through ``-pretrained_weights`` nnU-Net restarts the 1x1 segmentation layers (as for any pretrained
weights); every other tensor is the plain model's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..networks import StageWithMamba

#: where a plain nnU-Net trainer's checkpoint keeps what rebuilding its network needs
_CHECKPOINT_KEYS = ("network_weights", "init_args")


def plain_twin_keys(network: torch.nn.Module) -> dict[str, str | None]:
    """For each state-dict key of a LoG-VMamba network, the key of the same tensor in the plain network of
    the same plans, or None for a block's own tensors.

    Modules reachable under two names (the 2D decoder holds the encoder) are mapped under both.
    """
    wrappers = [name for name, module in network.named_modules(remove_duplicate=False)
                if isinstance(module, StageWithMamba)]
    twins = {}
    for key in network.state_dict():
        twin = key
        for prefix in wrappers:
            if key.startswith(f"{prefix}.mamba."):
                twin = None
                break
            if key.startswith(f"{prefix}.stage."):
                twin = f"{prefix}.{key[len(prefix) + len('.stage.'):]}"
                break
        twins[key] = twin
    return twins


def weights_from_plain(network: torch.nn.Module, plain_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``network``'s state dict with every tensor the plain network has taken from ``plain_weights``.

    The blocks keep their fresh values. A ValueError, naming the first mismatches, when the plain weights
    come from other plans (a tensor missing, of another shape, or left over).
    """
    state = network.state_dict()
    used, problems = set(), []
    for key, twin in plain_twin_keys(network).items():
        if twin is None:
            continue
        if twin not in plain_weights:
            problems.append(f"{twin} is missing")
        elif tuple(plain_weights[twin].shape) != tuple(state[key].shape):
            problems.append(f"{twin} has shape {tuple(plain_weights[twin].shape)}, not {tuple(state[key].shape)}")
        else:
            state[key] = plain_weights[twin].detach().clone().to(state[key].dtype)
            used.add(twin)
    problems += [f"{key} has no place in this network" for key in sorted(set(plain_weights) - used)]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"the plain weights do not fit these plans ({shown}): convert the checkpoint of a plain "
                         "nnU-Net trained with the same plans and configuration")
    return state


def build_trainer_network(trainer_name: str, plans: dict, configuration: str, dataset_json: dict) -> torch.nn.Module:
    """The network ``trainer_name`` trains for these plans, with deep supervision, as ``nnUNetv2_train`` builds it."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    if configuration not in plans_manager.available_configurations:
        raise ValueError(f"the plans have no configuration {configuration!r}; they have "
                         f"{plans_manager.available_configurations}")
    configuration_manager = plans_manager.get_configuration(configuration)
    try:
        trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise ValueError(f"nnU-Net finds no trainer named {trainer_name!r}; `nnunet_logmamba doctor` lists ours") from None
    return trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, True)


def convert_plain_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike,
                             trainer_name: str = "nnUNetTrainerLoGVMamba", overwrite: bool = False) -> dict:
    """Write ``output``, a file for ``nnUNetv2_train ... -tr trainer_name -pretrained_weights output``.

    Args:
        checkpoint: a plain nnU-Net v2 checkpoint (``checkpoint_final.pth`` / ``checkpoint_best.pth``); its
            ``init_args`` hold the plans, configuration and dataset.json the network is rebuilt from.
        output: the file to write (through a temporary name).
        trainer_name: the LoG-VMamba trainer that will train from it.
    Returns:
        ``{"plain": tensors taken from the plain network, "new": block tensors, "configuration", "dataset",
        "plans": names to train with}``.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or choose another output")
    # nnU-Net's own checkpoints hold numpy values in their logs, so nnU-Net loads them with
    # weights_only=False too; only load a checkpoint you trained or trust
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or any(k not in saved for k in _CHECKPOINT_KEYS):
        raise ValueError(f"{checkpoint} is not an nnU-Net v2 training checkpoint (it has no "
                         f"{' / '.join(_CHECKPOINT_KEYS)}); pass fold_X/checkpoint_final.pth of a plain training")
    init = saved["init_args"]
    network = build_trainer_network(trainer_name, init["plans"], init["configuration"], init["dataset_json"])
    twins = plain_twin_keys(network)
    if not any(twin is None for twin in twins.values()):
        raise ValueError(f"{trainer_name} puts no LoG-VMamba block into these plans: train it directly")
    if any(".mamba." in key for key in saved["network_weights"]):
        raise ValueError(f"{checkpoint} already holds LoG-VMamba blocks ({saved.get('trainer_name')}); pass it to "
                         "-pretrained_weights as it is")
    state = weights_from_plain(network, saved["network_weights"])
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        torch.save({"network_weights": state, "trainer_name": trainer_name, "init_args": init,
                    "converted_from": {"checkpoint": str(checkpoint), "trainer_name": saved.get("trainer_name")}}, tmp)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    new = sum(1 for twin in twins.values() if twin is None)
    plans = init["plans"]
    return {"plain": len(twins) - new, "new": new, "configuration": init["configuration"],
            "dataset": plans.get("dataset_name", "DATASET"), "plans": plans.get("plans_name", "nnUNetPlans")}
