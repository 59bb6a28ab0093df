"""Evaluation: metrics, interpolation baselines, the evaluation pipeline and figures."""
from .baselines import interpolate_axial
from .evaluate import evaluate_reconstruction
from .figure import orthogonal_views
from .metrics import PLANE_AXES, gaussian_filter_valid, psnr, ssim, volume_metrics

__all__ = ["psnr", "ssim", "volume_metrics", "gaussian_filter_valid", "PLANE_AXES", "interpolate_axial",
           "evaluate_reconstruction", "orthogonal_views"]
