"""Resolution pyramids (OME-Zarr multiscale levels) built block by block from a finished volume.

Level ``k`` is the 2x2x2 mean of level ``k - 1`` (2x2 in 2D: the window has two voxels per axis,
whatever the number of axes). Rules, chosen once for every level:

* Odd sizes: level shapes use ceil division (``ceil(n / 2)``); the last voxel along an odd axis
  averages only the voxels that exist (1 instead of 2 along that axis), so there is no padding bias.
* Integer dtypes: the mean is rounded to the nearest integer, ties to even (``numpy.rint``, the rule
  the engine already uses when it writes level 0), and stored in the output dtype. The window counts
  are powers of two, so the mean is exact in floating point and the rounding is deterministic.
  Float dtypes keep the plain mean.
* A level is refused (ValueError) when it would halve an axis that has already shrunk to one voxel:
  its scale would double without any downsampling. :func:`max_pyramid_levels` says how many fit.

Each level is written chunk by chunk of the target array; a chunk reads at most a 2x2x2 chunk
region of the previous level, so memory is bounded by a few chunks, never a whole level.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .grid import BlockGrid
from .stores import cast_like


def downsampled_shape(shape) -> tuple[int, ...]:
    """The shape of the next level: every axis halved, rounded up."""
    return tuple(-(-int(s) // 2) for s in shape)


def max_pyramid_levels(shape) -> int:
    """How many levels (beyond level 0) can be built before some axis would have to halve one voxel."""
    levels, shape = 0, tuple(int(s) for s in shape)
    while min(shape) >= 2:
        shape = downsampled_shape(shape)
        levels += 1
    return levels


def pyramid_shapes(shape, levels: int) -> list[tuple[int, ...]]:
    """Shapes of levels 0..``levels`` for a level-0 ``shape``; ValueError if ``levels`` is invalid.

    Args:
        shape: level-0 shape (Z, Y, X) in voxels.
        levels: number of downsampled levels (0 = level 0 only).
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 0:
        raise ValueError(f"pyramid_levels must be a whole number >= 0, got {levels!r}")
    shapes = [tuple(int(s) for s in shape)]
    for level in range(1, int(levels) + 1):
        previous = shapes[-1]
        if min(previous) < 2:
            raise ValueError(f"pyramid_levels={levels} is too many for an output of shape {shapes[0]}: level "
                             f"{level} would halve an axis of level {level - 1} {previous} that has a single voxel; "
                             f"use at most {max_pyramid_levels(shapes[0])} levels")
        shapes.append(downsampled_shape(previous))
    return shapes


def downsample_mean(values: np.ndarray, dtype=None) -> np.ndarray:
    """The 2x..x2 mean of ``values`` (any number of axes), in ``dtype`` (default: the input's).

    Output shape: ``ceil(n / 2)`` per axis; a window cut by an odd border averages the voxels it has.
    Integer dtypes are rounded to nearest, ties to even, and clipped to the dtype's range.
    """
    values = np.asarray(values)
    dtype = np.dtype(dtype or values.dtype)
    # float32 holds sums of 8 voxels of up to 16-bit integers exactly; wider types need float64
    total = values.astype(np.result_type(values.dtype, np.float32), copy=False)
    count = np.ones((1,) * values.ndim, dtype=total.dtype)
    for axis in range(values.ndim):
        n = total.shape[axis]

        def along(index):
            return tuple(index if i == axis else slice(None) for i in range(values.ndim))

        evens, odds = total[along(slice(0, None, 2))], total[along(slice(1, None, 2))]
        summed = evens.copy()
        summed[along(slice(0, odds.shape[axis]))] += odds
        total = summed
        per_axis = np.full(evens.shape[axis], 2, dtype=total.dtype)
        if n % 2:
            per_axis[-1] = 1
        count = count * per_axis.reshape([-1 if i == axis else 1 for i in range(values.ndim)])
    return cast_like(total / count, dtype)


def build_level(previous, target, progress: bool = True, description: str = "pyramid") -> None:
    """Fill ``target`` with the 2x2x2 mean of ``previous``, one target chunk at a time.

    Args:
        previous: array-like (Zarr array) of the finer level, indexable with slices.
        target: writable array of shape ``downsampled_shape(previous.shape)``; its chunks set the
            unit of work, so each write covers whole chunks.
    """
    expected = downsampled_shape(previous.shape)
    if tuple(target.shape) != expected:
        raise ValueError(f"a level below {tuple(previous.shape)} must have the shape {expected}, "
                         f"not {tuple(target.shape)}")
    chunks = tuple(int(c) for c in (getattr(target, "chunks", None) or target.shape))
    grid = BlockGrid(target.shape, chunks, (0,) * len(chunks))
    for block in tqdm(grid, total=len(grid), unit="chunk", desc=description, disable=not progress,
                      dynamic_ncols=True):
        region = tuple(slice(2 * s.start, min(2 * s.stop, n)) for s, n in zip(block.out, previous.shape))
        target[block.out] = downsample_mean(np.asarray(previous[region]), target.dtype)
