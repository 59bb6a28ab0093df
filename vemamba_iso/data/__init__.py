"""Volume I/O (TIFF, HDF5, Zarr, NIfTI), nnU-Net normalisation, lateral training pairs, sample data."""
from pathlib import Path

from .io import SUPPORTED, Volume, VolumeFormatError, file_format, read_volume, rescaled_voxel_size, write_volume

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLES = {
    "isotropic": "fib25_cube2_crop_iso_10nm.tif",            # (64, 128, 128) uint8, 10 x 10 x 10 nm
    "anisotropic": "fib25_cube2_crop_aniso_40x10x10nm.tif",  # (16, 128, 128) uint8, 40 x 10 x 10 nm
}


def sample_path(kind: str = "isotropic") -> Path:
    """Path of a shipped FIB-25 sample (CC BY 3.0, see sample/ATTRIBUTION.md), axis order (Z, Y, X).

    ``isotropic``: 64 x 128 x 128 uint8 at 10 nm (ground truth for evaluation); ``anisotropic``: the same
    crop keeping every 4th Z slice, 16 x 128 x 128 at 40 x 10 x 10 nm (input for prediction).
    """
    if kind not in SAMPLES:
        raise ValueError(f"unknown sample {kind!r}; choose one of {sorted(SAMPLES)}")
    return SAMPLE_DIR / SAMPLES[kind]


__all__ = ["read_volume", "write_volume", "rescaled_voxel_size", "file_format", "Volume", "VolumeFormatError", "SUPPORTED",
           "sample_path", "SAMPLE_DIR"]
