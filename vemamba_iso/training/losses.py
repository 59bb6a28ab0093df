"""Reconstruction loss: L1 + (1 - SSIM)."""
from __future__ import annotations

import torch

from ..evaluation.metrics import ssim


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, ssim_weight: float = 1.0) -> torch.Tensor:
    """L1 + ssim_weight * (1 - SSIM) for (batch, 1, D, H, W) tensors in [0, 1]; SSIM window over D, H, W."""
    l1 = (prediction.float() - target.float()).abs().mean()
    if ssim_weight == 0:
        return l1
    # Small patches get a smaller window (the standard 11 taps need 11 voxels on every axis).
    radius = max(1, min(5, (min(target.shape[2:]) - 1) // 2))
    structural = ssim(prediction[:, 0], target[:, 0], data_range=1.0, dims=(1, 2, 3), radius=radius)
    return l1 + ssim_weight * (1 - structural)
