"""Which LoG-VMamba block goes where, decided by each stage's spatial size (never by stage index).

nnU-Net plans vary (4 to 7 stages, anisotropic strides, 2D or 3D), so the rule looks at the map a
block would see: ``patch_size // cumulative stride`` of the stage.

The paper's scheme, in terms of the geometric-mean edge ``e`` of a map (``tokens ** (1 / ndim)``)
and the neighbourhood edge ``k`` of the LTX:

* ``e > large_edge * k``: large maps, LTX only (``local``);
* ``small_edge * k < e <= large_edge * k``: middle maps, LTX + GTX (``local_global``);
* ``e <= small_edge * k``: the smallest maps, where a ``k``-neighbourhood already covers much of the
  map, GTX only (``global``).

Stages whose maps hold more than ``max_batch_tokens`` positions per training batch (planned batch
size x positions per map) get no block: the scan costs about as much per position as the whole
stage's convolutions cost per position several times over, so on the large maps it would dominate
the step time (the paper's 3D model also starts its Mamba stages below full resolution). The cap
uses the batch size because nnU-Net trades batch for patch size: 2D plans have small maps and
batches of hundreds, 3D plans the opposite, and the positions per step are what the cost follows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

VARIANTS = ("log", "local", "global")


@dataclass(frozen=True)
class PlacementRule:
    """Thresholds of the size rule (see module doc). ``variant`` ``local``/``global`` forces one mode."""

    variant: str = "log"
    kernel_size: int = 3
    small_edge: float = 2.0
    large_edge: float = 6.0
    max_batch_tokens: int = 100_000

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if not 0 < self.small_edge <= self.large_edge:
            raise ValueError(f"need 0 < small_edge <= large_edge, got {self.small_edge}, {self.large_edge}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")

    def within_cost_cap(self, spatial_size: Sequence[int], batch_size: int = 1) -> bool:
        """Whether maps of ``spatial_size`` in batches of ``batch_size`` hold at most ``max_batch_tokens`` positions."""
        return math.prod(int(s) for s in spatial_size) * max(1, int(batch_size)) <= self.max_batch_tokens

    def mode_for(self, spatial_size: Sequence[int], batch_size: int = 1) -> str | None:
        """Token mode for maps of ``spatial_size`` in batches of ``batch_size``, or None for no block."""
        if not self.within_cost_cap(spatial_size, batch_size):
            return None
        tokens = math.prod(int(s) for s in spatial_size)
        if self.variant == "local":
            return "local"
        if self.variant == "global":
            return "global"
        edge = tokens ** (1.0 / len(spatial_size))
        if edge > self.large_edge * self.kernel_size:
            return "local"
        if edge > self.small_edge * self.kernel_size:
            return "local_global"
        return "global"


def stage_spatial_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int] | int]) -> list[tuple[int, ...]]:
    """Spatial size at the output of every encoder stage.

    Args:
        patch_size: network input size, one entry per spatial axis.
        strides: per stage, an int or one stride per axis (as in nnU-Net's plans).

    Raises:
        ValueError: if a stride does not divide the running size (nnU-Net's planner never produces
            that; a hand-edited plan might).
    """
    size = [int(p) for p in patch_size]
    sizes = []
    for i, stride in enumerate(strides):
        stride = [int(stride)] * len(size) if isinstance(stride, int) else [int(s) for s in stride]
        if len(stride) != len(size):
            raise ValueError(f"stage {i} stride {stride} does not match patch size {tuple(patch_size)}")
        if any(s % st for s, st in zip(size, stride)):
            raise ValueError(f"patch size {tuple(patch_size)} is not divisible by the cumulative strides up "
                             f"to stage {i} (size {tuple(size)}, stride {stride}); use a plan whose patch "
                             "size is a multiple of the product of all strides")
        size = [s // st for s, st in zip(size, stride)]
        sizes.append(tuple(size))
    return sizes
