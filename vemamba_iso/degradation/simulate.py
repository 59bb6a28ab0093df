"""Simulated axial degradation of a volume: blur, downsampling, Poisson-Gaussian noise, intensity jitter.

Volumes are numpy arrays in (Z, Y, X) order (any axis can be the degraded one), intensities
normalised to about [0, 1]. The degraded axis shrinks from ``n`` to ``n // factor`` (a remainder is
cropped from the end). Low-resolution sample ``j`` sits at high-resolution coordinate
``j * factor + offset`` with ``offset = 0`` for plain subsampling and ``(factor - 1) / 2`` for area
averaging (the centre of the averaged slab); see :func:`sample_offset`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.ndimage import gaussian_filter1d

DOWNSAMPLING_MODES = ("area", "subsample")
PRESETS = ("realistic", "average_pool", "subsample")


@dataclass(frozen=True)
class DegradationConfig:
    """Parameters of the axial degradation (defaults = the ``realistic`` preset).

    Attributes:
        factor: downsampling factor along the degraded axis (2..10 typical).
        blur_sigma: Gaussian blur sigma along the degraded axis in high-resolution voxels, modelling
            section thickness / axial point spread (0 = none). Default 0.25 * factor when None.
        downsampling: ``"area"`` (mean of each slab of ``factor`` slices) or ``"subsample"`` (keep
            every ``factor``-th slice).
        poisson_photons: photons per unit intensity for shot noise (0 = no Poisson noise).
        gaussian_std: std of additive Gaussian read noise, in normalised intensity units.
        jitter_gain, jitter_offset: half-widths of the uniform per-volume random gain (around 1)
            and offset (around 0).
    """

    factor: int = 4
    blur_sigma: float | None = None
    downsampling: str = "area"
    poisson_photons: float = 1000.0
    gaussian_std: float = 0.01
    jitter_gain: float = 0.05
    jitter_offset: float = 0.02

    def __post_init__(self):
        if int(self.factor) < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if self.downsampling not in DOWNSAMPLING_MODES:
            raise ValueError(f"downsampling must be one of {DOWNSAMPLING_MODES}, got {self.downsampling!r}")

    @property
    def sigma(self) -> float:
        return 0.25 * self.factor if self.blur_sigma is None else float(self.blur_sigma)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blur_sigma"] = self.sigma
        return d


def preset(name: str, factor: int) -> DegradationConfig:
    """Named degradations: ``realistic`` (blur + area + noise + jitter), ``average_pool`` (mean of
    each slab only), ``subsample`` (keep every ``factor``-th slice, nothing else)."""
    if name == "realistic":
        return DegradationConfig(factor=factor)
    if name == "average_pool":
        return DegradationConfig(factor=factor, blur_sigma=0.0, downsampling="area", poisson_photons=0.0,
                                 gaussian_std=0.0, jitter_gain=0.0, jitter_offset=0.0)
    if name == "subsample":
        return DegradationConfig(factor=factor, blur_sigma=0.0, downsampling="subsample", poisson_photons=0.0,
                                 gaussian_std=0.0, jitter_gain=0.0, jitter_offset=0.0)
    raise ValueError(f"unknown degradation preset {name!r}; choose one of {PRESETS}")


def sample_offset(factor: int, downsampling: str) -> float:
    """High-resolution coordinate of low-resolution sample 0 (sample j is at j * factor + offset)."""
    return 0.0 if downsampling == "subsample" else (factor - 1) / 2.0


def randomized(config: DegradationConfig, rng: np.random.Generator, spread: float = 0.5) -> DegradationConfig:
    """A random variation of ``config`` (blur and noise scaled by up to +-``spread``), so that a batch
    holds different degradations (negatives for the degradation encoder, robustness for the model)."""
    def scale():
        return float(rng.uniform(1 - spread, 1 + spread))
    return replace(config, blur_sigma=config.sigma * scale(), poisson_photons=config.poisson_photons * scale(),
                   gaussian_std=config.gaussian_std * scale())


def blur_axial(volume: np.ndarray, sigma: float, axis: int = 0) -> np.ndarray:
    """Gaussian blur along ``axis`` (reflecting borders, so the mean is kept)."""
    if sigma <= 0:
        return volume
    return gaussian_filter1d(volume, sigma, axis=axis, mode="reflect", truncate=3.0)


def downsample_axial(volume: np.ndarray, factor: int, axis: int = 0, mode: str = "area") -> np.ndarray:
    """Shrink ``axis`` by ``factor``: ``area`` averages slabs, ``subsample`` keeps every factor-th slice."""
    n = (volume.shape[axis] // factor) * factor
    if n == 0:
        raise ValueError(f"axis {axis} has {volume.shape[axis]} voxels, fewer than the factor {factor}")
    v = np.moveaxis(volume, axis, 0)[:n]
    if mode == "subsample":
        out = v[::factor]
    elif mode == "area":
        out = v.reshape(n // factor, factor, *v.shape[1:]).mean(axis=1, dtype=np.float32)
    else:
        raise ValueError(f"downsampling must be one of {DOWNSAMPLING_MODES}, got {mode!r}")
    return np.moveaxis(out, 0, axis)


def average_pool_axial(volume: np.ndarray, factor: int, axis: int = 0) -> np.ndarray:
    """The simple degradation: mean of each slab of ``factor`` slices along ``axis``."""
    return downsample_axial(volume.astype(np.float32, copy=False), factor, axis, "area")


def add_poisson_gaussian_noise(volume: np.ndarray, photons: float, gaussian_std: float,
                               rng: np.random.Generator) -> np.ndarray:
    """Shot noise (``photons`` per unit intensity, zero mean) plus Gaussian read noise."""
    out = volume.astype(np.float32, copy=True)
    if photons > 0:
        out = rng.poisson(np.clip(out, 0, None) * photons).astype(np.float32) / photons + (out - np.clip(out, 0, None))
    if gaussian_std > 0:
        out += rng.normal(0.0, gaussian_std, size=out.shape).astype(np.float32)
    return out


def degrade_axial(volume: np.ndarray, config: DegradationConfig, axis: int = 0,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Simulate an anisotropic acquisition of ``volume`` along ``axis``.

    Args:
        volume: float array in normalised intensity, any number of dims >= 1.
        config: degradation parameters (see :class:`DegradationConfig`).
        axis: the axis to degrade (0 = Z in (Z, Y, X)).
        rng: random generator for noise and jitter (a fresh default one when None).

    Returns:
        float32 array, ``axis`` shrunk to ``shape[axis] // factor``.
    """
    rng = rng or np.random.default_rng()
    out = blur_axial(volume.astype(np.float32, copy=False), config.sigma, axis)
    out = downsample_axial(out, int(config.factor), axis, config.downsampling).astype(np.float32, copy=False)
    out = add_poisson_gaussian_noise(out, config.poisson_photons, config.gaussian_std, rng)
    if config.jitter_gain or config.jitter_offset:
        gain = 1 + rng.uniform(-config.jitter_gain, config.jitter_gain)
        offset = rng.uniform(-config.jitter_offset, config.jitter_offset)
        mean = out.mean()
        out = (out - mean) * gain + mean + offset  # gain around the mean keeps the mean on average
    return out.astype(np.float32, copy=False)
