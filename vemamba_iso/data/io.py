"""Reading and writing volumes: TIFF, HDF5, Zarr, NIfTI.

Arrays are (Z, Y, X); voxel sizes are (z, y, x) in the file's unit (nm for EM TIFFs written by us),
or None when the file has none. HDF5 and Zarr need a dataset key: ``--key`` or ``path.h5:key``.
Writes go to a temporary name first and are renamed at the end, so an error never leaves a partial file.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_SUFFIXES = (".zarr",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED = TIFF_SUFFIXES + HDF5_SUFFIXES + ZARR_SUFFIXES + NIFTI_SUFFIXES
#: the dataset (HDF5) or array (in-memory Zarr group) a volume is written to when no key is given
DEFAULT_KEY = "data"


class VolumeFormatError(ValueError):
    """A file that is not a readable 3D volume in a supported format."""


@dataclass
class Volume:
    data: np.ndarray                                   # (Z, Y, X)
    voxel_size: tuple[float, float, float] | None = None  # (z, y, x)


def split_key(path: str | os.PathLike, key: str | None = None) -> tuple[Path, str | None]:
    """``file.h5:raw`` -> (file.h5, "raw"); an explicit ``key`` wins."""
    text = str(path)
    if key is None and ":" in text and not os.path.exists(text):
        head, _, tail = text.rpartition(":")
        if head and file_format(head) in ("hdf5", "zarr"):
            return Path(head), tail
    return Path(text), key


def file_format(path: str | os.PathLike) -> str:
    """``tiff``, ``hdf5``, ``zarr`` or ``nifti`` from the file name; VolumeFormatError otherwise."""
    name = str(path).lower().rstrip("/")
    for fmt, suffixes in (("tiff", TIFF_SUFFIXES), ("hdf5", HDF5_SUFFIXES), ("zarr", ZARR_SUFFIXES),
                          ("nifti", NIFTI_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise VolumeFormatError(f"unknown volume format for {path!s}: use one of {', '.join(SUPPORTED)}")


def _check_3d(data: np.ndarray, path) -> np.ndarray:
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim < 3:
        raise VolumeFormatError(f"{path!s} holds a {data.ndim}D array of shape {data.shape}; a 3D (Z, Y, X) "
                                "volume is needed (for a 2D image there is no axis to reconstruct)")
    if data.ndim > 3:
        raise VolumeFormatError(f"{path!s} holds a {data.ndim}D array of shape {data.shape}; a 3D (Z, Y, X) "
                                "volume is needed: save one channel / time point per file first")
    return data


def _hdf5_key(handle, key, path):
    import h5py
    datasets = []
    handle.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    if key is None:
        if len(datasets) == 1:
            return datasets[0]
        raise VolumeFormatError(f"{path!s} holds {len(datasets)} datasets {datasets}; name one with --key")
    if key not in handle or not isinstance(handle[key], h5py.Dataset):
        raise VolumeFormatError(f"dataset key {key!r} not found in {path!s}; available: {datasets}")
    return key


def rescaled_voxel_size(voxel_size, axis: int, ratio: float):
    """``voxel_size`` (nm, Z, Y, X) with ``axis`` multiplied by ``ratio`` (1 / factor after upsampling by
    factor, factor after downsampling); None stays None (a volume without voxel size metadata)."""
    if voxel_size is None:
        return None
    return tuple(float(v) * (ratio if i == axis else 1) for i, v in enumerate(voxel_size))


def read_volume(path: str | os.PathLike, key: str | None = None) -> Volume:
    """Read a 3D volume (Z, Y, X) and its voxel size (z, y, x) when the file records one.

    A file the format's library cannot parse (truncated, corrupt, another format under the extension) is a
    VolumeFormatError that names the file, not the library's own exception.
    """
    path, key = split_key(path, key)
    fmt = file_format(path)
    if not path.exists():
        raise FileNotFoundError(f"no such volume: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise VolumeFormatError(f"{path} is empty (0 bytes); copy or export it again")
    try:
        with _quiet_tifffile():
            data, voxel = _READERS[fmt](path, key)
    except (VolumeFormatError, FileNotFoundError, PermissionError):
        raise
    except MemoryError:
        raise MemoryError(f"{path} does not fit in memory; crop it, or convert it to Zarr/HDF5 for block-wise "
                          "reconstruction (vemamba_iso_predict reads large TIFFs block by block)") from None
    except Exception as exc:
        # the libraries report damage in many ways (tifffile: IndexError on a cut page table or TiffFileError,
        # h5py: OSError, SimpleITK: RuntimeError, codecs: their own); the user needs the file and the fix
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VolumeFormatError(f"{path} cannot be read as {fmt.upper()}: it is truncated, corrupt or not a "
                                f"{fmt.upper()} file ({type(exc).__name__}: {detail}); copy or export it again") from exc
    return Volume(check_volume_array(data, path), voxel)


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's log lines about damaged tags while reading: the one error we raise says it all."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_volume_array(data, path) -> np.ndarray:
    """``data`` as a 3D numeric array, or a VolumeFormatError naming ``path`` and what is wrong."""
    data = _check_3d(data, path)
    if data.dtype.kind not in "biuf":
        raise VolumeFormatError(f"{path!s} holds {data.dtype} values; a volume needs numbers (integers or floats): "
                                "convert it first")
    if 0 in data.shape:
        raise VolumeFormatError(f"{path!s} has an empty axis (shape {data.shape}); it holds no voxels")
    return data


def _read_tiff(path: Path, key):
    import tifffile
    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise VolumeFormatError(f"{path} is a TIFF without images; copy or export it again")
        data = tif.asarray()
        if data.size == 0:   # a header whose page table is zeros or garbage: tifffile finds an empty page
            raise VolumeFormatError(f"{path} holds no image data: it is truncated or corrupt; copy or export it again")
        voxel = None
        ij = tif.imagej_metadata or {}
        page = tif.pages[0]
        if "spacing" in ij and "XResolution" in page.tags:
            xr = page.tags["XResolution"].value
            yr = page.tags["YResolution"].value
            voxel = (float(ij["spacing"]), yr[1] / yr[0], xr[1] / xr[0])
    return data, voxel


def _read_hdf5(path: Path, key):
    import h5py
    with h5py.File(path, "r") as f:
        ds = f[_hdf5_key(f, key, path)]
        data = ds[()]
        voxel = ds.attrs.get("voxel_size", ds.attrs.get("resolution"))
    return data, tuple(float(v) for v in voxel) if voxel is not None else None


def _read_zarr(path: Path, key):
    import zarr
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Group):
        names = sorted(node.array_keys())
        if key is None:
            if len(names) != 1:
                raise VolumeFormatError(f"{path!s} holds arrays {names}; name one with --key")
            key = names[0]
        if key not in names:
            raise VolumeFormatError(f"array key {key!r} not found in {path!s}; available: {names}")
        node = node[key]
    voxel = node.attrs.get("voxel_size")
    return np.asarray(node[...]), tuple(voxel) if voxel else None


def _read_nifti(path: Path, key):
    import SimpleITK as sitk
    image = sitk.ReadImage(str(path))
    data = sitk.GetArrayFromImage(image)  # SimpleITK gives (z, y, x) arrays and (x, y, z) spacing
    return data, tuple(float(s) for s in reversed(image.GetSpacing()))


_READERS = {"tiff": _read_tiff, "hdf5": _read_hdf5, "zarr": _read_zarr, "nifti": _read_nifti}


def write_volume(path: str | os.PathLike, data: np.ndarray, voxel_size=None, key: str | None = None,
                 overwrite: bool = True) -> Path:
    """Write a (Z, Y, X) array atomically (temporary name beside it, then rename). Returns the path written.

    With ``overwrite=False`` an existing ``path`` is a FileExistsError and is left untouched.
    """
    path, key = split_key(path, key)
    fmt = file_format(path)
    if data.ndim != 3:
        raise VolumeFormatError(f"can only write 3D (Z, Y, X) volumes, got shape {data.shape}")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another output name")
    with atomic_path(path, overwrite=overwrite) as tmp:
        _WRITERS[fmt](tmp, data, voxel_size, key)
    return path


def _write_tiff(tmp: Path, data, voxel_size, key) -> None:
    import tifffile
    kwargs = {"photometric": "minisblack"}
    if voxel_size is not None:
        kwargs = dict(imagej=True, photometric="minisblack", resolution=(1 / voxel_size[2], 1 / voxel_size[1]),
                      metadata={"spacing": voxel_size[0], "axes": "ZYX"})
    tifffile.imwrite(tmp, data, **kwargs)


def _write_hdf5(tmp: Path, data, voxel_size, key) -> None:
    import h5py
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(key or DEFAULT_KEY, data=data, chunks=True, compression="gzip")
        if voxel_size is not None:
            ds.attrs["voxel_size"] = np.asarray(voxel_size, dtype=float)


def _write_zarr(tmp: Path, data, voxel_size, key) -> None:
    import zarr
    chunks = tuple(min(s, 64) for s in data.shape)
    if key:
        arr = zarr.open_group(str(tmp), mode="w").create_array(key, shape=data.shape, dtype=data.dtype, chunks=chunks)
    else:
        arr = zarr.open_array(str(tmp), mode="w", shape=data.shape, dtype=data.dtype, chunks=chunks)
    arr[...] = data
    if voxel_size is not None:
        arr.attrs["voxel_size"] = [float(v) for v in voxel_size]


def _write_nifti(tmp: Path, data, voxel_size, key) -> None:
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(data)
    if voxel_size is not None:
        image.SetSpacing([float(v) for v in reversed(voxel_size)])
    sitk.WriteImage(image, str(tmp))


_WRITERS = {"tiff": _write_tiff, "hdf5": _write_hdf5, "zarr": _write_zarr, "nifti": _write_nifti}
