"""nnU-Net's SGD on LoG-VMamba networks: parameter groups, their learning-rate scales, old checkpoints.

Three groups (Mamba's rules on top of nnU-Net's optimiser): everything nnU-Net decays; the SSM's
``A_log`` / ``D`` / ``dt_bias`` without weight decay; the blocks' output projections at a scaled
learning rate. Checkpoints written with fewer groups (earlier releases) are regrouped on ``--c``.
"""

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from ..blocks import LoGVSSBlock


def parameter_groups(network: torch.nn.Module, weight_decay: float, readout_lr_scale: float = 1.0) -> list[dict]:
    """Optimiser groups: the SSM parameters Mamba keeps out of weight decay, and everything else.

    ``A_log``, ``D`` and ``dt_bias`` of every :class:`LoGVSSBlock` (``LoGVSSBlock.no_weight_decay``)
    get ``weight_decay=0``; all other parameters keep nnU-Net's ``weight_decay``. With
    ``readout_lr_scale != 1`` the blocks' output projections (``out_proj``, zero at the start) form a
    third group whose learning rate is ``readout_lr_scale`` times nnU-Net's (``lr_scale`` in the group,
    applied by :class:`ScaledPolyLRScheduler`).
    """
    exempt, readout = set(), set()
    for module in network.modules():
        if isinstance(module, LoGVSSBlock):
            exempt.update(id(getattr(module, name)) for name in module.no_weight_decay)
            if readout_lr_scale != 1.0:
                readout.update(id(p) for p in module.out_proj.parameters())
    decayed = [p for p in network.parameters() if id(p) not in exempt and id(p) not in readout]
    undecayed = [p for p in network.parameters() if id(p) in exempt]
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0})
    if readout:
        groups.append({"params": [p for p in network.parameters() if id(p) in readout], "weight_decay": weight_decay,
                       "lr_scale": float(readout_lr_scale)})
    return groups


class ScaledPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule, times each group's ``lr_scale`` (1 when absent)."""

    def step(self, current_step=None):
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _layouts(network: torch.nn.Module, weight_decay: float) -> list[list[list[torch.nn.Parameter]]]:
    """Every grouping of ``network``'s parameters a release of this package has written to a checkpoint."""
    return [[list(network.parameters())],  # nnU-Net's single group (before the SSM groups)
            [g["params"] for g in parameter_groups(network, weight_decay, 1.0)],
            [g["params"] for g in parameter_groups(network, weight_decay, 10.0)]]


def regroup_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, network: torch.nn.Module,
                            weight_decay: float) -> dict:
    """``saved`` (an optimiser ``state_dict`` of ``network`` in any grouping we used) in ``optimizer``'s groups.

    Each parameter keeps its own state (SGD's momentum buffer); the groups' settings (lr, weight decay,
    ``lr_scale``) are ``optimizer``'s. ``saved`` is returned unchanged when its groups already have the
    sizes of ``optimizer``'s.

    Raises:
        ValueError: ``saved`` matches none of the groupings (a checkpoint of another network).
    """
    current = optimizer.state_dict()
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes == [len(g["params"]) for g in current["param_groups"]]:
        return saved
    for layout in _layouts(network, weight_decay):
        if [len(params) for params in layout] == sizes:
            break
    else:
        raise ValueError(f"the checkpoint's optimiser has parameter groups of sizes {sizes}, which matches no "
                         "grouping of this network; it was written for another network (check -tr and the plans), "
                         "or start a new training without --c")
    saved_index = {id(p): index for params, group in zip(layout, saved["param_groups"])
                   for p, index in zip(params, group["params"])}
    state = {}
    for group, live in zip(current["param_groups"], optimizer.param_groups):
        for index, p in zip(group["params"], live["params"]):
            if saved_index[id(p)] in saved["state"]:
                state[index] = saved["state"][saved_index[id(p)]]
    return {"state": state, "param_groups": current["param_groups"]}
