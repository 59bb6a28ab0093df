"""Simple block processors: axial interpolation (the baseline every reconstruction must beat)."""
from __future__ import annotations

import numpy as np
import torch

from ..model.network import interpolate_axial_linear


class LinearInterpolation:
    """Linear interpolation along ``axis`` by ``factor`` (float32 output).

    ``offset``: output position of input slice 0 (0 = slices were kept, the default models'
    convention; (factor - 1) / 2 = slices were averaged over their section thickness).
    """

    def __init__(self, factor: int, axis: int = 0, offset: float = 0.0):
        self.factor, self.axis, self.offset = int(factor), int(axis), float(offset)

    def identity(self) -> dict:
        return {"method": "linear", "factor": self.factor, "axis": self.axis, "offset": self.offset}

    def __call__(self, block: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.moveaxis(np.asarray(block, dtype=np.float32), self.axis, 0).copy())
        y = interpolate_axial_linear(x[None, None], self.factor, self.offset)[0, 0]
        return np.moveaxis(y.numpy(), 0, self.axis)
