"""The grid of blocks a large volume is reconstructed in.

Each block owns a *core* region of the input; it is read with a *halo* of context on every side
(clipped at the volume border), processed, and only the part of the result that belongs to the core
is written. Along the upsampled axis every input slice becomes ``factor`` output slices (the
pixel-shuffle convention of the models), so a core [c0, c1) maps to output [c0 * factor, c1 * factor).
Cores never overlap, so blocks can be written in any order and by any worker.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """One block: grid index and the slices that move its data (all in voxels, Z, Y, X order)."""

    index: tuple[int, ...]
    read: tuple[slice, ...]     # input region to read: core + halo, clipped to the volume
    out: tuple[slice, ...]      # output region this block fills
    crop: tuple[slice, ...]     # part of the processed read region's result that is kept

    @property
    def name(self) -> str:
        return "_".join(map(str, self.index))


class BlockGrid:
    """Blocks of ``block`` voxels with ``halo`` voxels of context over a volume of ``shape``.

    Args:
        shape: input volume shape.
        block: core size per axis (input voxels).
        halo: context per axis and side (input voxels); each block size must be at least its halo.
        factor: upsampling factor along ``axis`` (1 for a same-size operation).
        axis: the upsampled axis.
    """

    def __init__(self, shape, block, halo, factor: int = 1, axis: int = 0):
        shape, block, halo = tuple(map(int, shape)), tuple(map(int, block)), tuple(map(int, halo))
        if not (len(shape) == len(block) == len(halo)):
            raise ValueError(f"block {block} and halo {halo} must have one entry per axis of the volume {shape}")
        if any(b < 1 for b in block) or any(h < 0 for h in halo):
            raise ValueError(f"block sizes must be >= 1 and halos >= 0, got block {block}, halo {halo}")
        small = [i for i, (b, h) in enumerate(zip(block, halo)) if b < h]
        if small:
            raise ValueError(f"block {block} is smaller than the halo {halo} along axis {small}: "
                             "a block must be at least as large as its halo (raise --block or lower --halo)")
        if not 0 <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for a {len(shape)}D volume")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.shape, self.block, self.halo, self.factor, self.axis = shape, block, halo, int(factor), axis

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(-(-s // b) for s, b in zip(self.shape, self.block))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(s * (self.factor if i == self.axis else 1) for i, s in enumerate(self.shape))

    def __len__(self) -> int:
        n = 1
        for c in self.counts:
            n *= c
        return n

    def __iter__(self):
        for index in itertools.product(*(range(c) for c in self.counts)):
            yield self.block_at(index)

    def block_at(self, index) -> Block:
        read, out, crop = [], [], []
        for i, (k, size, b, h) in enumerate(zip(index, self.shape, self.block, self.halo)):
            c0, c1 = k * b, min((k + 1) * b, size)
            r0, r1 = max(c0 - h, 0), min(c1 + h, size)
            f = self.factor if i == self.axis else 1
            read.append(slice(r0, r1))
            out.append(slice(c0 * f, c1 * f))
            crop.append(slice((c0 - r0) * f, (c1 - r0) * f))
        return Block(tuple(index), tuple(read), tuple(out), tuple(crop))
