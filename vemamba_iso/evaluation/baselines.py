"""Interpolation baselines along the degraded axis (linear and cubic spline)."""
from __future__ import annotations

import numpy as np
from scipy.interpolate import CubicSpline

METHODS = ("linear", "cubic")


def interpolate_axial(volume: np.ndarray, factor: int, offset: float, method: str = "linear") -> np.ndarray:
    """Upsample axis 0 of (d, H, W) to d*factor, sample ``j`` at high-res coordinate ``j*factor + offset``.

    Beyond the first/last sample the edge value is held (no extrapolation). Returns float32.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interpolation {method!r}; choose one of {METHODS}")
    d = volume.shape[0]
    target = np.clip((np.arange(d * factor, dtype=np.float64) - offset) / factor, 0, d - 1)
    v = volume.astype(np.float32, copy=False)
    if method == "linear" or d < 4:
        lo = np.floor(target).astype(int)
        hi = np.minimum(lo + 1, d - 1)
        w = (target - lo).astype(np.float32)[:, None, None]
        return v[lo] * (1 - w) + v[hi] * w
    spline = CubicSpline(np.arange(d), v, axis=0)
    return spline(target).astype(np.float32)
