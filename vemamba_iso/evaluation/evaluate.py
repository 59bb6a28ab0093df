"""Evaluate isotropic reconstruction on an isotropic ground truth.

The ground truth (Z, Y, X) is degraded along Z by the factor the way the model was trained, then
reconstructed by the model and by linear and cubic interpolation. Metrics are computed on the
result written back in the ground truth's dtype (as predict would write it), with ``data_range`` the
dtype's range for integers or the ground truth's range for floats.
"""
from __future__ import annotations

import numpy as np

from ..data.intensity import denormalize, input_scheme, normalize
from ..degradation import degrade_axial, preset, sample_offset
from ..inference.tiling import reconstruct_volume, resolve_tiling, tiles_per_pass
from .baselines import interpolate_axial
from .metrics import SSIM_MIN_EDGE, psnr, volume_metrics


def removed_slice_near_centre(length: int, factor: int) -> int:
    """A Z index near the centre that subsampling removed (for figures)."""
    return (length // 2 // factor) * factor + factor // 2


def data_range_of(reference: np.ndarray) -> float:
    if np.issubdtype(reference.dtype, np.integer):
        info = np.iinfo(reference.dtype)
        return float(info.max) - float(info.min)
    return float(reference.max() - reference.min())


def evaluate_reconstruction(network, metadata: dict, ground_truth: np.ndarray, tile=None,
                            overlap=None, device="cpu", progress=True, seed: int = 0,
                            flip_average: bool = False):
    """Returns (report dict with one key per method, volumes dict for figures).

    ``ground_truth`` is cropped along Z to a multiple of the factor. ``tile``/``overlap``: as for
    :func:`vemamba_iso.inference.reconstruct_volume` (default: the model's training patch).
    """
    factor = int(metadata["factor"])
    degradation_name = metadata.get("degradation", {}).get("preset", "subsample")
    degradation = preset(degradation_name, factor)
    offset = sample_offset(factor, degradation.downsampling)
    n = (ground_truth.shape[0] // factor) * factor
    if n < 2 * factor:
        raise ValueError(f"ground truth has {ground_truth.shape[0]} Z slices; at least {2 * factor} are needed "
                         f"for factor x{factor}")
    if min(n, *ground_truth.shape[1:]) < SSIM_MIN_EDGE:
        raise ValueError(f"ground truth of {n} x {ground_truth.shape[1]} x {ground_truth.shape[2]} voxels (Z cropped to "
                         f"a multiple of x{factor}) is too small to measure SSIM: every axis needs at least "
                         f"{SSIM_MIN_EDGE} voxels; evaluate a larger volume")
    gt = ground_truth[:n]
    scheme = input_scheme(metadata.get("normalisation", {}).get("scheme"), gt.dtype, gt.min(), gt.max())
    normed, record = normalize(gt, scheme)
    degraded = degrade_axial(normed, degradation, axis=0, rng=np.random.default_rng(seed))
    tile, overlap = resolve_tiling(network, tile, overlap)
    estimates = {
        "linear": interpolate_axial(degraded, factor, offset, "linear"),
        "cubic": interpolate_axial(degraded, factor, offset, "cubic"),
        "vemamba": reconstruct_volume(network, degraded, tile=tile, overlap=overlap, device=device,
                                      batch_size=tiles_per_pass(device), progress=progress,
                                      flip_average=flip_average),
    }
    data_range = data_range_of(gt)
    observed = np.arange(degraded.shape[0]) * factor + offset
    unobserved = np.setdiff1d(np.arange(n), observed[observed == np.round(observed)].astype(int))
    report = {"settings": {"factor": factor, "degradation": degradation_name, "shape_zyx": list(gt.shape),
                           "degraded_shape_zyx": list(degraded.shape), "data_range": data_range,
                           "normalisation": record["scheme"], "flip_average": flip_average,
                           "tile": list(tile), "overlap": list(overlap),
                           "keep_observed": bool(getattr(getattr(network, "config", None), "keep_observed", False)),
                           "note": "psnr/ssim over all voxels; psnr_unobserved_slices over Z slices that "
                                   "were not kept by the degradation"}}
    volumes = {"ground truth": gt,
               f"degraded x{factor} (nearest)": np.repeat(denormalize(degraded, record, gt.dtype), factor, 0)}
    for name, estimate in estimates.items():
        written = denormalize(estimate, record, gt.dtype)
        metrics = volume_metrics(written.astype(np.float32), gt.astype(np.float32), data_range)
        metrics["psnr_unobserved_slices"] = psnr(written[unobserved].astype(np.float32),
                                                 gt[unobserved].astype(np.float32), data_range)
        report[name] = {k: round(v, 4) for k, v in metrics.items()}
        volumes[name] = written
    for name in ("linear", "cubic"):
        report["vemamba"][f"psnr_gain_over_{name}"] = round(report["vemamba"]["psnr"] - report[name]["psnr"], 4)
    return report, volumes
