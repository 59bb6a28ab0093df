"""Simple block processors: axial interpolation (the baseline every reconstruction must beat)."""
from __future__ import annotations

import numpy as np


def upsample_positions(length: int, factor: int) -> np.ndarray:
    """Input-slice coordinate of each of the ``length * factor`` output slices.

    Convention shared with the models (pixel shuffle): input slice i covers output slices
    i*factor .. i*factor+factor-1, its centre sits at output i*factor + (factor-1)/2.
    """
    return np.clip((np.arange(length * factor) - (factor - 1) / 2) / factor, 0, length - 1)


class LinearInterpolation:
    """Linear interpolation along ``axis`` by ``factor`` (float32 output)."""

    def __init__(self, factor: int, axis: int = 0):
        self.factor, self.axis = int(factor), int(axis)

    def identity(self) -> dict:
        return {"method": "linear", "factor": self.factor, "axis": self.axis}

    def __call__(self, block: np.ndarray) -> np.ndarray:
        x = np.moveaxis(np.asarray(block, dtype=np.float32), self.axis, 0)
        pos = upsample_positions(x.shape[0], self.factor)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, x.shape[0] - 1)
        w = (pos - i0).astype(np.float32).reshape(-1, *([1] * (x.ndim - 1)))
        return np.moveaxis(x[i0] * (1 - w) + x[i1] * w, 0, self.axis)
