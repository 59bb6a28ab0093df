"""PSNR and SSIM in torch, for 2D/3D images, whole volumes and per orthogonal plane.

SSIM follows Wang et al. 2004 with a Gaussian window (sigma 1.5, radius 5 -> 11 taps), K1 = 0.01,
K2 = 0.03, population covariances, averaged over the region where the window fits (same value as
``skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: (Z, Y, X) axes spanned by each named plane.
PLANE_AXES = {"xy": (1, 2), "xz": (0, 2), "yz": (0, 1)}


#: radius of the Gaussian window (its taps: 2 * radius + 1)
SSIM_RADIUS = 5
#: the smallest edge, in voxels, of a volume whose SSIM can be measured with the default window
SSIM_MIN_EDGE = 2 * SSIM_RADIUS + 1


def _gaussian_taps(sigma: float, radius: int, device, dtype) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_filter_valid(x: torch.Tensor, dims: tuple[int, ...], sigma: float = 1.5,
                          radius: int = SSIM_RADIUS) -> torch.Tensor:
    """Separable Gaussian filter of ``x`` along ``dims``, keeping only the fully covered ('valid') part."""
    taps = _gaussian_taps(sigma, radius, x.device, x.dtype).view(1, 1, -1)
    for d in dims:
        moved = x.movedim(d, -1)
        shape = moved.shape
        out = F.conv1d(moved.reshape(-1, 1, shape[-1]), taps)
        x = out.reshape(*shape[:-1], out.shape[-1]).movedim(-1, d)
    return x


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, dims: tuple[int, ...] | None = None,
         sigma: float = 1.5, radius: int = SSIM_RADIUS) -> torch.Tensor:
    """Mean SSIM of ``x`` and ``y`` (same shape) with the window spanning ``dims`` (default: all dims).

    For a (Z, Y, X) volume, ``dims=(1, 2)`` gives the mean SSIM of its XY planes, ``None`` 3D SSIM;
    a leading batch/channel dim is handled by leaving it out of ``dims``. Differentiable.
    """
    dims = tuple(range(x.ndim)) if dims is None else tuple(d % x.ndim for d in dims)
    if any(x.shape[d] < 2 * radius + 1 for d in dims):
        raise ValueError(f"SSIM window of {2 * radius + 1} voxels does not fit in shape {tuple(x.shape)}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = x.float(), y.float()
    mu_x, mu_y = gaussian_filter_valid(x, dims, sigma, radius), gaussian_filter_valid(y, dims, sigma, radius)
    var_x = gaussian_filter_valid(x * x, dims, sigma, radius) - mu_x ** 2
    var_y = gaussian_filter_valid(y * y, dims, sigma, radius) - mu_y ** 2
    cov = gaussian_filter_valid(x * y, dims, sigma, radius) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean()


def psnr(x, y, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of arrays/tensors ``x`` (estimate) and ``y`` (reference)."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double()
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).double()
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def volume_metrics(estimate: np.ndarray, reference: np.ndarray, data_range: float) -> dict:
    """PSNR and SSIM of a (Z, Y, X) estimate: 3D and mean over XY, XZ and YZ planes."""
    if estimate.shape != reference.shape:
        raise ValueError(f"shape mismatch: {estimate.shape} vs {reference.shape}")
    e = torch.from_numpy(np.asarray(estimate, dtype=np.float32))
    r = torch.from_numpy(np.asarray(reference, dtype=np.float32))
    out = {"psnr": psnr(e, r, data_range), "ssim_3d": float(ssim(e, r, data_range))}
    for name, axes in PLANE_AXES.items():
        out[f"ssim_{name}"] = float(ssim(e, r, data_range, dims=axes))
    return out
