"""Intensity normalisation with nnU-Net's schemes, plus the inverse needed to write results back.

Schemes are nnU-Net's classes from ``nnunetv2.preprocessing.normalization``: ``RGBTo01Normalization``
(x / 255, the default for uint8 EM), ``RescaleTo01Normalization`` (min-max to [0, 1], the default for
other dtypes) and ``ZScoreNormalization``. The parameters needed to invert them are recorded.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
    RescaleTo01Normalization, RGBTo01Normalization, ZScoreNormalization)

SCHEMES = {cls.__name__: cls for cls in (RGBTo01Normalization, RescaleTo01Normalization, ZScoreNormalization)}


def default_scheme(dtype) -> str:
    return "RGBTo01Normalization" if np.dtype(dtype) == np.uint8 else "RescaleTo01Normalization"


def input_scheme(model_scheme: str | None, dtype, low: float, high: float) -> str:
    """The scheme that brings an input of ``dtype`` with values in ``low..high`` to a model's training range.

    A model trained with ``RGBTo01Normalization`` (uint8 EM divided by 255) gets the same division for data
    in 0..255 stored as integers, or as floats that use that range (maximum above 1); data outside 0..255,
    and float data already in [0, 1] (which x / 255 would squash to near zero), are rescaled min-max to
    [0, 1] instead. Other schemes are the model's; no scheme: :func:`default_scheme`. The in-memory and the
    block-wise paths both decide with this function, so a file is normalised the same way at any size.
    """
    if model_scheme is None:
        return default_scheme(dtype)
    if model_scheme != "RGBTo01Normalization":
        return model_scheme
    in_range = low >= 0 and high <= 255 and (np.issubdtype(np.dtype(dtype), np.integer) or high > 1)
    return model_scheme if in_range else "RescaleTo01Normalization"


def normalize(volume: np.ndarray, scheme: str | None = None) -> tuple[np.ndarray, dict]:
    """float32 normalised copy of ``volume`` and the record ``{scheme, scale, offset}`` such that
    ``original = normalised * scale + offset``."""
    scheme = scheme or default_scheme(volume.dtype)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown normalisation {scheme!r}; choose one of {sorted(SCHEMES)}")
    if scheme == "RGBTo01Normalization" and (volume.min() < 0 or volume.max() > 255):
        raise ValueError(f"RGBTo01Normalization needs values in 0..255, got {volume.min()}..{volume.max()}; "
                         "use RescaleTo01Normalization")
    if scheme == "RGBTo01Normalization":
        scale, offset = 255.0, 0.0
    elif scheme == "RescaleTo01Normalization":
        lo, hi = float(volume.min()), float(volume.max())
        scale, offset = max(hi - lo, 1e-8), lo
    else:
        scale, offset = max(float(volume.std()), 1e-8), float(volume.mean())
    normaliser = SCHEMES[scheme](use_mask_for_norm=False, intensityproperties={}, target_dtype=np.float32)
    out = normaliser.run(volume.astype(np.float32, copy=True), None)
    return out, {"scheme": scheme, "scale": scale, "offset": offset}


def denormalize(volume: np.ndarray, record: dict, dtype=None) -> np.ndarray:
    """Undo :func:`normalize`; with an integer ``dtype`` values are rounded and clipped to its range."""
    out = volume.astype(np.float32) * record["scale"] + record["offset"]
    if dtype is None:
        return out
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)
