"""Simulated axial degradation and the interpolation baselines it must agree with."""
import numpy as np
import pytest

from vemamba_iso.degradation import (DegradationConfig, average_pool_axial, blur_axial, degrade_axial,
                                     downsample_axial, preset, randomized, sample_offset)
from vemamba_iso.evaluation.baselines import interpolate_axial


def smooth_volume(shape=(40, 24, 20), seed=0):
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter
    v = gaussian_filter(rng.random(shape).astype(np.float32), 2)
    return (v - v.min()) / (v.max() - v.min()) * 0.6 + 0.2


@pytest.mark.parametrize("name", ["realistic", "average_pool", "subsample"])
@pytest.mark.parametrize("axis", [0, 1])
def test_degradation_shrinks_the_axis_and_keeps_mean_intensity(name, axis):
    v = smooth_volume()
    config = preset(name, 4)
    out = degrade_axial(v, config, axis=axis, rng=np.random.default_rng(1))
    expected = list(v.shape)
    expected[axis] //= 4
    assert out.shape == tuple(expected) and out.dtype == np.float32
    tolerance = 1e-6 if name == "average_pool" else 0.03
    assert abs(out.mean() - v.mean()) < tolerance


def test_average_pool_is_the_slab_mean_and_subsample_keeps_slices():
    v = np.arange(12 * 2 * 2, dtype=np.float32).reshape(12, 2, 2)
    assert np.allclose(average_pool_axial(v, 3), v.reshape(4, 3, 2, 2).mean(1))
    assert np.array_equal(downsample_axial(v, 3, mode="subsample"), v[::3])
    assert downsample_axial(v[:11], 3).shape[0] == 3  # remainder cropped


def test_blur_keeps_mean_and_reduces_variation_along_its_axis_only():
    v = smooth_volume(seed=3)
    b = blur_axial(v, 2.0, axis=0)
    assert abs(b.mean() - v.mean()) < 1e-3
    assert np.abs(np.diff(b, axis=0)).mean() < np.abs(np.diff(v, axis=0)).mean()
    assert np.allclose(blur_axial(v[:1], 2.0, axis=1).sum(), v[:1].sum(), rtol=1e-3)


def test_noise_has_the_configured_strength():
    flat = np.full((64, 64, 64), 0.5, np.float32)
    config = DegradationConfig(factor=1, blur_sigma=0, downsampling="subsample", poisson_photons=0,
                               gaussian_std=0.05, jitter_gain=0, jitter_offset=0)
    out = degrade_axial(flat, config, rng=np.random.default_rng(0))
    assert abs(out.std() - 0.05) < 0.002
    shot = DegradationConfig(factor=1, blur_sigma=0, downsampling="subsample", poisson_photons=200,
                             gaussian_std=0, jitter_gain=0, jitter_offset=0)
    out = degrade_axial(flat, shot, rng=np.random.default_rng(0))
    assert abs(out.std() - np.sqrt(0.5 * 200) / 200) < 0.002


@pytest.mark.parametrize("mode", ["area", "subsample"])
def test_sample_offset_locates_low_res_samples(mode):
    # A linear ramp is reproduced exactly by linear interpolation only with the right sample positions.
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 3, 3)).copy()
    low = downsample_axial(ramp, 5, mode=mode)
    up = interpolate_axial(low, 5, sample_offset(5, mode), "linear")
    inner = slice(5, 30)
    assert np.allclose(up[inner], ramp[inner], atol=1e-5)
    assert np.allclose(interpolate_axial(low, 5, sample_offset(5, mode), "cubic")[inner], ramp[inner], atol=1e-4)


def test_config_validation_defaults_and_randomisation():
    with pytest.raises(ValueError, match="downsampling"):
        DegradationConfig(downsampling="bicubic")
    with pytest.raises(ValueError, match="preset"):
        preset("unknown", 4)
    assert DegradationConfig(factor=8).sigma == 2.0
    varied = {randomized(DegradationConfig(), np.random.default_rng(s)).sigma for s in range(5)}
    assert len(varied) == 5 and all(0.5 <= s <= 1.5 for s in varied)
