"""LoG-VMamba blocks inserted into the network that nnU-Net's plans describe.

We build the planned network with nnU-Net's own ``get_network_from_plans`` (PlainConvUNet,
ResidualEncoderUNet, any planner) and wrap stages in place: ``stage -> LoGVSSBlock``. The encoder
object is shared with the decoder (``UNetDecoder.encoder``), so it must be modified in place, not
replaced. Deep supervision is untouched (the decoder always builds every segmentation head), so the
state dict is the same with it on or off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..blocks import LoGVSSBlock
from .placement import PlacementRule, stage_spatial_sizes


PLACEMENTS = ("by_size", "all_stages", "all_stages_capped")


@dataclass(frozen=True)
class LoGVMambaConfig:
    """How blocks are built and placed.

    Attributes:
        rule: placement by spatial size (variant ``log``, ``local`` or ``global``; thresholds).
        join: join order of global tokens.
        directions: scan directions ``K``.
        expand: inner width factor of each block.
        state_size: SSM state size.
        num_global_tokens: global tokens per GTX.
        drop_path: stochastic depth of the block residuals.
        in_decoder: after decoder stages; None = only for 2D (the paper's 2D model has its Mamba
            blocks in the decoder).
        encoder_stages: ``all`` (every qualifying encoder stage), ``bottleneck`` (only the last) or
            ``none``; None = ``all`` in 3D, ``none`` in 2D (blocks in the decoder only, as the paper's
            2D model; with encoder blocks too, a 2D hippocampus step took 1.6-1.8x the plain
            network's time, 2D plans having batches of hundreds; see benchmarks/bench_network.py).
        scan_backend: selective-scan backend.
        placement: ``by_size`` (the rule above, with its cost cap) or ``all_stages`` (the official
            LoG-VMamba 3D model: a block after every encoder stage, LTX only on the first, LTX +
            GTX on the middle ones, GTX only on the last, no cost cap) or ``all_stages_capped`` (the
            official model's modes and GTX grids, but stages over the rule's ``max_batch_tokens`` get no
            block, as under ``by_size``: on nnU-Net's 3D plans that drops the block on the full-size map,
            which costs more than the rest of the network).
        global_max_edge: GTX compressed grid edge per axis (``by_size``: every block;
            ``all_stages``: every block but the last, which uses ``last_global_max_edge``).
        last_global_max_edge: GTX grid edge of the last encoder stage under ``all_stages``.
        zero_init_residual: blocks start as the identity (zero ``out_proj``), so the network starts
            as the plain network of the same plans.
        large_map_expand, large_map_state_size: ``expand`` and ``state_size`` of the blocks that
            ``all_stages`` places on maps over the rule's ``max_batch_tokens`` (None: as the others).
        large_map_recompute: those blocks keep no activations for backward but recompute them, in
            chunks of whole samples holding at most ``max_batch_tokens`` positions, at least one
            sample (see ``LoGVSSBlock``'s ``recompute_tokens``): on nnU-Net's full-size 3D maps the
            block's activations would otherwise outweigh the whole plain network's. The
            ``large_map_*`` settings need ``placement="all_stages"`` (the other placements put no
            block on such maps).
    """

    rule: PlacementRule = field(default_factory=PlacementRule)
    join: str = "interleaved"
    directions: int = 1
    expand: float = 1.0
    state_size: int = 16
    num_global_tokens: int = 4
    drop_path: float = 0.0
    in_decoder: bool | None = None
    encoder_stages: str | None = None
    scan_backend: str = "auto"
    placement: str = "by_size"
    global_max_edge: int = 4
    last_global_max_edge: int = 4
    zero_init_residual: bool = True
    large_map_expand: float | None = None
    large_map_state_size: int | None = None
    large_map_recompute: bool = False

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENTS}")
        if self.large_map_expand is not None and self.large_map_expand <= 0:
            raise ValueError(f"large_map_expand must be positive, got {self.large_map_expand}")
        if self.large_map_state_size is not None and self.large_map_state_size < 1:
            raise ValueError(f"large_map_state_size must be >= 1, got {self.large_map_state_size}")
        large_map_set = (self.large_map_expand, self.large_map_state_size) != (None, None) or self.large_map_recompute
        if large_map_set and self.placement != "all_stages":
            raise ValueError(f"the large_map_* settings apply to blocks on maps over max_batch_tokens, which only "
                             f"placement='all_stages' places (got placement={self.placement!r})")

    def with_(self, **changes) -> "LoGVMambaConfig":
        """A copy with some fields changed (``rule`` fields may be given by name too)."""
        rule_fields = {k: changes.pop(k) for k in list(changes) if k in PlacementRule.__dataclass_fields__}
        rule = replace(self.rule, **rule_fields) if rule_fields else self.rule
        return replace(self, rule=rule, **changes)


class StageWithMamba(nn.Module):
    """An nnU-Net stage followed by a LoG-VMamba block (same channels and size in and out)."""

    def __init__(self, stage: nn.Module, block: LoGVSSBlock):
        super().__init__()
        self.stage = stage
        self.mamba = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mamba(self.stage(x))

    def compute_conv_feature_map_size(self, input_size):
        """Feature-map voxels, as dynamic-network-architectures' stages report them (used by planners)."""
        inner = self.stage[-1] if isinstance(self.stage, nn.Sequential) else self.stage
        output = np.int64(inner.compute_conv_feature_map_size(input_size))
        block = self.mamba
        # Rough: the block keeps a few maps of its inner width at the stage's output size; a block
        # that recomputes its branch keeps only the branch's output (plus, during its backward, one
        # chunk's activations at a time).
        kept = block.norm.normalized_shape[0] if block.recompute_tokens else 4 * block.token_channels
        output += np.int64(kept * math.prod(block.spatial_size))
        return output


def _block(channels: int, size: Sequence[int], mode: str, config: LoGVMambaConfig,
           global_max_edge: int | None = None, large_map: bool = False) -> LoGVSSBlock:
    expand, state_size, recompute_tokens = config.expand, config.state_size, None
    if large_map:
        expand = config.expand if config.large_map_expand is None else config.large_map_expand
        state_size = config.state_size if config.large_map_state_size is None else config.large_map_state_size
        recompute_tokens = config.rule.max_batch_tokens if config.large_map_recompute else None
    return LoGVSSBlock(channels, size, mode=mode, expand=expand, state_size=state_size,
                       recompute_tokens=recompute_tokens,
                       kernel_size=config.rule.kernel_size, num_global_tokens=config.num_global_tokens,
                       join=config.join, directions=config.directions, drop_path=config.drop_path,
                       global_max_edge=config.global_max_edge if global_max_edge is None else global_max_edge,
                       scan_backend=config.scan_backend, zero_init_residual=config.zero_init_residual)


def all_stages_mode(stage: int, num_stages: int, variant: str = "log") -> str:
    """Token mode of encoder stage ``stage`` of ``num_stages`` in the official 3D model's layout."""
    if variant != "log":
        return variant
    if stage == 0:
        return "local"
    return "global" if stage == num_stages - 1 else "local_global"


def insert_log_vmamba_blocks(network: nn.Module, patch_size: Sequence[int], batch_size: int = 1,
                             config: LoGVMambaConfig = LoGVMambaConfig()) -> list[dict]:
    """Wrap the stages of a dynamic-network-architectures U-Net with LoG-VMamba blocks, in place.

    Args:
        network: a PlainConvUNet / ResidualEncoderUNet (``encoder.stages``, ``encoder.strides``,
            ``encoder.output_channels``, ``decoder.stages``).
        patch_size: the network's input size (nnU-Net's configuration patch size).
        batch_size: the planned training batch size (the placement's cost cap; see
            :mod:`.placement`). Take it from the plans, not from the run, so that training and
            prediction build the same network.
        config: block and placement settings.

    Returns:
        One dict per inserted block: ``{"where": "encoder"|"decoder", "stage": i, "size": ..., "mode": ...}``.
    """
    encoder = getattr(network, "encoder", None)
    decoder = getattr(network, "decoder", None)
    if encoder is None or decoder is None or not hasattr(encoder, "strides") or not hasattr(decoder, "stages"):
        raise TypeError(f"{type(network).__name__} is not a dynamic-network-architectures U-Net with "
                        "encoder.stages/encoder.strides and decoder.stages; use PlainConvUNet or ResidualEncoderUNet")
    if len(patch_size) != len(encoder.strides[0]):
        raise ValueError(f"patch size {tuple(patch_size)} has {len(patch_size)} axes but the network is "
                         f"{len(encoder.strides[0])}D")
    sizes = stage_spatial_sizes(patch_size, encoder.strides)
    channels = list(encoder.output_channels)
    ndim = len(patch_size)
    in_decoder = (ndim == 2) if config.in_decoder is None else config.in_decoder
    encoder_stages = ("none" if ndim == 2 else "all") if config.encoder_stages is None else config.encoder_stages
    if encoder_stages not in ("all", "bottleneck", "none"):
        raise ValueError(f"encoder_stages must be 'all', 'bottleneck' or 'none', got {encoder_stages!r}")
    if config.placement in ("all_stages", "all_stages_capped"):
        return _insert_after_every_encoder_stage(encoder, sizes, channels, config, batch_size,
                                                 capped=config.placement == "all_stages_capped")
    placed = []
    for i, size in enumerate(sizes):
        if encoder_stages == "none" or (encoder_stages == "bottleneck" and i != len(sizes) - 1):
            continue
        mode = config.rule.mode_for(size, batch_size)
        if mode is None or isinstance(encoder.stages[i], StageWithMamba):
            continue
        encoder.stages[i] = StageWithMamba(encoder.stages[i], _block(channels[i], size, mode, config))
        placed.append({"where": "encoder", "stage": i, "size": size, "mode": mode})
    if in_decoder:
        for s in range(len(decoder.stages)):
            level = len(sizes) - 2 - s  # decoder stage s works at the resolution of encoder stage level
            mode = config.rule.mode_for(sizes[level], batch_size)
            if mode is None or isinstance(decoder.stages[s], StageWithMamba):
                continue
            decoder.stages[s] = StageWithMamba(decoder.stages[s], _block(channels[level], sizes[level], mode, config))
            placed.append({"where": "decoder", "stage": s, "size": sizes[level], "mode": mode})
    if not placed:
        raise ValueError(f"no stage of patch size {tuple(patch_size)} qualifies for a LoG-VMamba block "
                         f"at batch size {batch_size} (max_batch_tokens={config.rule.max_batch_tokens}); raise "
                         "max_batch_tokens or use the plain trainer")
    return placed


def _insert_after_every_encoder_stage(encoder: nn.Module, sizes: list[tuple[int, ...]], channels: list[int],
                                      config: LoGVMambaConfig, batch_size: int = 1,
                                      capped: bool = False) -> list[dict]:
    placed = []
    for i, size in enumerate(sizes):
        if isinstance(encoder.stages[i], StageWithMamba):
            continue
        large_map = not config.rule.within_cost_cap(size, batch_size)
        if capped and large_map:
            continue
        mode = all_stages_mode(i, len(sizes), config.rule.variant)
        edge = config.last_global_max_edge if i == len(sizes) - 1 else config.global_max_edge
        encoder.stages[i] = StageWithMamba(encoder.stages[i],
                                           _block(channels[i], size, mode, config, edge, large_map))
        placed.append({"where": "encoder", "stage": i, "size": size, "mode": mode})
    if not placed:
        raise ValueError(f"no encoder stage fits max_batch_tokens={config.rule.max_batch_tokens} at batch size "
                         f"{batch_size}; raise max_batch_tokens or use placement='all_stages'")
    return placed


def build_log_vmamba_network(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                             input_channels: int, output_channels: int, patch_size: Sequence[int],
                             batch_size: int = 1, enable_deep_supervision: bool = True,
                             config: LoGVMambaConfig = LoGVMambaConfig()) -> nn.Module:
    """The planned nnU-Net network with LoG-VMamba blocks (arguments as nnU-Net's configuration has them)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    network = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                     output_channels, allow_init=True, deep_supervision=enable_deep_supervision)
    network.log_vmamba_blocks = insert_log_vmamba_blocks(network, patch_size, batch_size, config)
    network.register_load_state_dict_pre_hook(explain_block_mismatch)
    return network


def _block_places(keys) -> list[str]:
    # the decoder keeps a reference to the encoder: its keys repeat the encoder's under "decoder.encoder."
    return sorted({k.split(".mamba.")[0] for k in keys if not k.startswith("decoder.encoder.")})


def explain_block_mismatch(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """``load_state_dict`` pre-hook: weights whose LoG-VMamba blocks are not this network's raise the reason and
    the fix, instead of torch's lists of hundreds of missing and unexpected keys.

    The placement follows the plans' patch size and batch size (the cost cap) and the trainer, so a
    ``plans.json`` edited after training, or another ``-tr``, builds another network. Weights without any
    block (a plain nnU-Net's) are left to the caller. torch hands hooks ``strict=True`` whatever the caller
    passed, so a non-strict load of blocks placed elsewhere is refused too: trained blocks would be dropped
    or fresh ones left untrained; remove the ``.mamba.`` entries first to load only the convolutions.

    Raises:
        RuntimeError: the weights hold LoG-VMamba blocks, and not this network's.
    """
    theirs = {k[len(prefix):] for k in state_dict if k.startswith(prefix) and ".mamba." in k}
    ours = {k for k in module.state_dict() if ".mamba." in k}
    if not theirs or theirs == ours or any(k.startswith(("module.", "_orig_mod.")) for k in theirs):
        return   # no blocks, ours, or the weights of a wrapped network (DDP, torch.compile): torch says that
    where_theirs, where_ours = _block_places(theirs), _block_places(ours)
    if where_theirs != where_ours:
        what = f"the weights hold LoG-VMamba blocks in {where_theirs}, this network in {where_ours}"
    else:
        what = (f"the LoG-VMamba blocks in {where_ours} have other parameters in the weights (another token "
                "mode or block setting)")
    raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__}: {what}. Where blocks go "
                       "follows the plans' patch_size and batch_size and the trainer: build the network with the "
                       "plans.json saved next to the trained model "
                       "(nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION/plans.json) and the same -tr.")
