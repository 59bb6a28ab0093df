"""Simulated axial degradation (blur, downsampling, Poisson-Gaussian noise, jitter)."""
from .simulate import (DOWNSAMPLING_MODES, PRESETS, DegradationConfig, add_poisson_gaussian_noise,
                       average_pool_axial, blur_axial, degrade_axial, downsample_axial, preset, randomized,
                       sample_offset)

__all__ = ["DegradationConfig", "degrade_axial", "average_pool_axial", "blur_axial", "downsample_axial",
           "add_poisson_gaussian_noise", "preset", "randomized", "sample_offset", "PRESETS",
           "DOWNSAMPLING_MODES"]
