"""Self-supervised lateral training pairs.

The network always upsamples its first spatial axis. In an anisotropic (Z, Y, X) stack the lateral
axes are sharp, so a lateral axis is degraded like Z is, and the network learns to undo that. The 8
orthogonal rotations that keep the degraded (Z) axis fixed (the symmetries of the lateral square)
augment the data; after rotation the patch's Y axis becomes the network's upsampling axis.
"""
from __future__ import annotations

import numpy as np

from ..degradation import DegradationConfig, degrade_axial, randomized

N_LATERAL_ROTATIONS = 8
#: ``lateral``: degrade Y or X only (self-supervised, for anisotropic stacks). ``all``: also degrade Z, one
#: pair in three; only meaningful when the training volumes are isotropic (e.g. FIB-SEM ground truth).
PAIR_AXES = ("lateral", "all")


def lateral_rotation(volume: np.ndarray, index: int) -> np.ndarray:
    """One of the 8 rotations/reflections of the (Y, X) plane of a (Z, Y, X) array; Z is untouched."""
    if not 0 <= index < N_LATERAL_ROTATIONS:
        raise ValueError(f"rotation index must be in 0..7, got {index}")
    out = np.rot90(volume, k=index % 4, axes=(1, 2))
    return out[:, :, ::-1] if index >= 4 else out


def to_network_layout(patch_zyx: np.ndarray) -> np.ndarray:
    """(Z, Y, X) patch -> (Y, Z, X): the lateral Y axis becomes the axis the network upsamples."""
    return np.ascontiguousarray(np.transpose(patch_zyx, (1, 0, 2)))


class LateralPairSampler:
    """Random (degraded, target) pairs from normalised (Z, Y, X) volumes, Y degraded by the factor.

    Targets have shape (low_res_length * factor, lateral, lateral) in network layout (upsampled axis
    first); inputs (low_res_length, lateral, lateral).
    """

    def __init__(self, volumes: list[np.ndarray], degradation: DegradationConfig, low_res_length: int,
                 lateral: int, seed: int = 0, vary_degradation: bool = True, pair_axes: str = "lateral"):
        if pair_axes not in PAIR_AXES:
            raise ValueError(f"pair_axes must be one of {PAIR_AXES}, got {pair_axes!r}")
        self.pair_axes = pair_axes
        self.volumes, self.degradation = volumes, degradation
        self.high = low_res_length * degradation.factor
        self.lateral = lateral
        self.vary = vary_degradation
        self.rng = np.random.default_rng(seed)
        side = max(self.high, lateral)
        for v in volumes:
            if v.shape[0] < (side if pair_axes == "all" else lateral) or min(v.shape[1:]) < side:
                raise ValueError(f"volume of shape {v.shape} is too small for training patches of "
                                 f"{lateral} (Z) x {side} x {side} (Y, X); use a smaller --patch or factor")

    def target(self, volume_index: int | None = None) -> np.ndarray:
        """A random augmented high-resolution patch in network layout."""
        v = self.volumes[self.rng.integers(len(self.volumes)) if volume_index is None else volume_index]
        side = max(self.high, self.lateral)
        if self.pair_axes == "all" and self.rng.random() < 1 / 3:
            z = self.rng.integers(v.shape[0] - self.high + 1)
            y = self.rng.integers(v.shape[1] - side + 1)
            x = self.rng.integers(v.shape[2] - side + 1)
            crop = lateral_rotation(v[z:z + self.high, y:y + side, x:x + side], int(self.rng.integers(8)))
            return np.ascontiguousarray(crop[:, :self.lateral, :self.lateral])  # Z already first
        z = self.rng.integers(v.shape[0] - self.lateral + 1)
        y = self.rng.integers(v.shape[1] - side + 1)
        x = self.rng.integers(v.shape[2] - side + 1)
        crop = lateral_rotation(v[z:z + self.lateral, y:y + side, x:x + side], int(self.rng.integers(8)))
        return to_network_layout(crop[:, :self.high, :self.lateral])

    def degrade(self, target: np.ndarray, config: DegradationConfig | None = None) -> np.ndarray:
        config = config or (randomized(self.degradation, self.rng) if self.vary else self.degradation)
        return degrade_axial(target, config, axis=0, rng=self.rng)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (size, 1, d, l, l), targets (size, 1, d*factor, l, l)) float32 arrays."""
        targets = np.stack([self.target() for _ in range(size)])[:, None]
        inputs = np.stack([self.degrade(t[0]) for t in targets])[:, None]
        return inputs, targets

    def contrastive_batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Two views per row: two sub-volumes of one volume under one (random) degradation."""
        views_a, views_b = [], []
        for _ in range(size):
            vi = int(self.rng.integers(len(self.volumes)))
            config = randomized(self.degradation, self.rng, spread=0.9)
            views_a.append(self.degrade(self.target(vi), config))
            views_b.append(self.degrade(self.target(vi), config))
        return np.stack(views_a)[:, None], np.stack(views_b)[:, None]
