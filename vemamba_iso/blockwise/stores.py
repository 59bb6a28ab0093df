"""Chunked volume stores read and written block by block: Zarr (plain or OME-Zarr), HDF5 and TIFF.

TIFF input is read through tifffile's Zarr view of the file (decoding only the pages a block needs), so a
stack larger than memory is never loaded whole; a TIFF output is streamed slab by slab from the working store.

Axis order is (Z, Y, X). Voxel sizes are in nanometres, taken from OME-Zarr ``multiscales`` scale
transforms, or a ``resolution`` / ``voxel_size`` attribute (nm), or ``element_size_um`` (µm).

Outputs are always assembled in a Zarr working store ``<output>.partial.zarr``: Zarr writes each
chunk as its own file, so a run killed mid-write loses at most the blocks in flight (HDF5 files
can be corrupted by a kill). When every block is done the working store is renamed to the output
(Zarr) or copied into it through a temporary name (HDF5). Resolution pyramids (levels "1", "2", ...
next to level "0") are built in the working store too, so they are in place before the rename.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from ..data.atomic import check_writable
from ..data.io import DEFAULT_KEY, HDF5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, VolumeFormatError, file_format


def store_format(path: str) -> str:
    """'zarr', 'hdf5' or 'tiff' from the path, or a ValueError that names the supported formats."""
    try:
        fmt = file_format(path)
    except VolumeFormatError:
        fmt = "zarr" if os.path.isdir(path) and _looks_like_zarr(path) else None
    if fmt not in ("zarr", "hdf5", "tiff"):
        raise ValueError(f"{path}: unknown chunked-store format; block-wise reconstruction reads and writes Zarr "
                         f"({', '.join(ZARR_SUFFIXES)}, OME-Zarr included), HDF5 ({', '.join(HDF5_SUFFIXES)}) and "
                         f"TIFF ({', '.join(TIFF_SUFFIXES)})")
    return fmt


def tiff_nbytes(path: str) -> int | None:
    """Uncompressed size in bytes of a TIFF's first image series, read from its header (no pixel data);
    None when tifffile cannot parse it (reading it will then report the damage)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return int(tif.series[0].nbytes) if tif.series else None
    except Exception:  # a corrupt file: the reader that follows names the problem
        return None


OME_ZARR_SUFFIX = ".ome.zarr"


def is_ome_zarr_path(path: str) -> bool:
    """True for an OME-Zarr output name (``*.ome.zarr``, the OME-NGFF naming convention)."""
    return str(path).lower().rstrip("/").endswith(OME_ZARR_SUFFIX)


def _looks_like_zarr(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in (".zarray", ".zgroup", "zarr.json"))


def _ome_multiscales(attrs) -> list | None:
    attrs = dict(attrs)
    if "multiscales" in attrs:
        return attrs["multiscales"]
    return dict(attrs.get("ome", {})).get("multiscales")


def _voxel_size_from_attrs(attrs) -> tuple[float, ...] | None:
    attrs = dict(attrs)
    for key in ("voxel_size", "resolution"):
        if key in attrs:
            return tuple(float(v) for v in attrs[key])
    if "element_size_um" in attrs:
        return tuple(float(v) * 1000 for v in attrs["element_size_um"])
    return None


class VolumeSource:
    """A 3D volume in a chunked store, opened lazily (picklable: each Dask worker opens its own handle).

    Args:
        path: ``.zarr`` directory (array, group with one array, or OME-Zarr: level 0 is used), HDF5 file or
            TIFF stack (its first series; pages are decoded as blocks need them).
        key: dataset / array name inside the store (required when there is more than one).
    """

    def __init__(self, path: str, key: str | None = None):
        self.path, self.key = str(path), key
        self.format = store_format(self.path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file or directory")
        self._array = None
        self._file = None
        array = self._open()
        if array.ndim != 3:
            raise ValueError(f"{self.path}: the volume has {array.ndim} dimensions {tuple(array.shape)}; "
                             "a (Z, Y, X) volume with 3 dimensions is needed (split channels or time points first)")
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.chunks = tuple(int(c) for c in (array.chunks or self.shape))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = state["_file"] = None
        return state

    def _open(self):
        if self._array is not None:
            return self._array
        if self.format == "tiff":
            self._array = self._open_tiff()
        elif self.format == "zarr":
            import zarr

            node = zarr.open(self.path, mode="r")
            self.voxel_size = _voxel_size_from_attrs(node.attrs)
            if isinstance(node, zarr.Group):
                multiscales = _ome_multiscales(node.attrs)
                if self.key is None and multiscales:
                    level0 = multiscales[0]["datasets"][0]
                    self.key = level0["path"]
                    for transform in level0.get("coordinateTransformations", []):
                        if transform.get("type") == "scale":
                            self.voxel_size = tuple(float(v) for v in transform["scale"])
                names = sorted(node.array_keys())
                if self.key is None:
                    if len(names) != 1:
                        raise KeyError(f"{self.path} holds the arrays {names}: choose one with --key")
                    self.key = names[0]
                if self.key not in node:
                    raise KeyError(f"{self.path} has no array {self.key!r}; it holds {names}: choose one with --key")
                node = node[self.key]
                self.voxel_size = self.voxel_size or _voxel_size_from_attrs(node.attrs)
            self._array = node
        else:
            import h5py

            self._file = h5py.File(self.path, "r")
            names = []
            self._file.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            if self.key is None:
                if len(names) != 1:
                    raise KeyError(f"{self.path} holds the datasets {names}: choose one with --key")
                self.key = names[0]
            if self.key not in self._file or not isinstance(self._file[self.key], h5py.Dataset):
                raise KeyError(f"{self.path} has no dataset {self.key!r}; it holds {names}: choose one with --key")
            self._array = self._file[self.key]
            self.voxel_size = _voxel_size_from_attrs(self._array.attrs) or _voxel_size_from_attrs(self._file.attrs)
        return self._array

    def _open_tiff(self):
        import tifffile
        import zarr

        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.series:
                    raise VolumeFormatError(f"{self.path} is a TIFF without images; copy or export it again")
                self.voxel_size = _tiff_voxel_size(tif)
            self._file = tifffile.imread(self.path, aszarr=True)
            return zarr.open(self._file, mode="r")
        except VolumeFormatError:
            raise
        except Exception as exc:   # tifffile reports damage as IndexError, ValueError, ...
            raise VolumeFormatError(f"{self.path} cannot be read as TIFF: it is truncated or corrupt "
                                    f"({type(exc).__name__}: {exc}); copy or export it again") from exc

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """The voxels of ``region`` as a numpy array."""
        return np.asarray(self._open()[region])

    def close(self) -> None:
        """Release the open file handle (HDF5, TIFF); a later ``read`` opens it again."""
        handle, self._file, self._array = self._file, None, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> "VolumeSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tiff_voxel_size(tif) -> tuple[float, float, float] | None:
    """(z, y, x) from ImageJ metadata (``spacing``) and the first page's resolution tags, as read_volume does."""
    ij = tif.imagej_metadata or {}
    page = tif.pages[0]
    if "spacing" in ij and "XResolution" in page.tags:
        xr, yr = page.tags["XResolution"].value, page.tags["YResolution"].value
        return float(ij["spacing"]), yr[1] / yr[0], xr[1] / xr[0]
    return None


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in ``dtype``: rounded and clipped to its range for integer types."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def check_output_location(output: str, overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite) or an unwritable location, before anything is written."""
    parent = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the output folder {parent} does not exist")
    check_writable(output, overwrite)


class WorkingStore:
    """The Zarr store an output is assembled in, then moved to its final place and format."""

    ARRAY = "0"   # OME-Zarr's name for the full-resolution level

    def __init__(self, output: str, shape, dtype, chunks, voxel_size=None, resume: bool = False,
                 array_name: str = ARRAY):
        import zarr

        self.output = output
        self.array_name = array_name
        self.path = f"{output}.partial.zarr"
        self.format = store_format(output)
        self.voxel_size = voxel_size
        if resume and os.path.isdir(self.path):
            self.array = zarr.open_group(self.path, mode="r+")[self.array_name]
            if tuple(self.array.shape) != tuple(shape) or np.dtype(self.array.dtype) != np.dtype(dtype):
                raise ValueError(f"{self.path} does not match this run (shape {self.array.shape}, dtype "
                                 f"{self.array.dtype}); pass --overwrite to start over")
            return
        shutil.rmtree(self.path, ignore_errors=True)
        group = zarr.open_group(self.path, mode="w", zarr_format=2)
        self.array = group.create_array(array_name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
                                        fill_value=0)
        group.attrs["multiscales"] = [ome_multiscales_metadata(voxel_size, name=os.path.basename(output),
                                                               level0_path=array_name)]
        if voxel_size is not None:
            group.attrs["voxel_size"] = list(voxel_size)

    def write_multiscales(self, levels: int) -> None:
        """Record levels 0..``levels`` in the OME-Zarr ``multiscales`` metadata of the working store."""
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        group.attrs["multiscales"] = [ome_multiscales_metadata(self.voxel_size, name=os.path.basename(self.output),
                                                               levels=levels)]

    def level(self, level: int):
        """The array of pyramid ``level`` (0 = full resolution)."""
        import zarr

        return self.array if level == 0 else zarr.open_group(self.path, mode="r+")[str(level)]

    def create_level(self, level: int, shape):
        """A new, empty array for pyramid ``level`` >= 1 (an unfinished one from a killed run is replaced).

        Chunks: level 0's, clipped to the level's shape.
        """
        import zarr

        if level < 1:
            raise ValueError(f"pyramid levels start at 1 (level 0 is the reconstruction), got {level}")
        chunks = tuple(min(c, s) for c, s in zip(self.array.chunks, shape))
        group = zarr.open_group(self.path, mode="r+")
        return group.create_array(str(level), shape=tuple(shape), chunks=chunks, dtype=self.array.dtype,
                                  fill_value=0, overwrite=True)

    def write(self, region, values: np.ndarray) -> None:
        self.array[region] = values

    def finish(self, output_key: str = DEFAULT_KEY) -> str:
        """Move the assembled volume to the output (atomically replacing an old one); returns its path."""
        if self.format == "zarr":
            _replace_path(self.path, self.output)
        elif self.format == "tiff":
            self._finish_tiff()
        else:
            import h5py

            tmp = f"{self.output}.tmp-{os.getpid()}"
            try:
                with h5py.File(tmp, "w") as f:
                    data = f.create_dataset(output_key, shape=self.array.shape, dtype=self.array.dtype,
                                            chunks=tuple(min(c, s) for c, s in zip(self.array.chunks, self.array.shape)),
                                            compression="gzip", compression_opts=1)
                    if self.voxel_size is not None:
                        data.attrs["voxel_size"] = list(self.voxel_size)
                        data.attrs["element_size_um"] = [v / 1000 for v in self.voxel_size]
                    step = self.array.chunks[0]
                    for z in range(0, self.array.shape[0], step):
                        data[z:z + step] = self.array[z:z + step]
                _replace_path(tmp, self.output)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            shutil.rmtree(self.path, ignore_errors=True)
        return self.output


    def _finish_tiff(self) -> None:
        """Stream the working store into a TIFF, one Z slice at a time, through a temporary name."""
        import tifffile

        from ..data.atomic import atomic_path

        shape, dtype = tuple(self.array.shape), np.dtype(self.array.dtype)
        big = int(np.prod(shape)) * dtype.itemsize > 2 ** 31   # classic TIFF ends at 4 GB, ImageJ's at 2
        kwargs = {"photometric": "minisblack", "bigtiff": big}
        if self.voxel_size is not None and not big:
            v = self.voxel_size
            kwargs.update(imagej=True, resolution=(1 / v[2], 1 / v[1]), metadata={"spacing": v[0], "axes": "ZYX"})
        slices = (np.asarray(self.array[z]) for z in range(shape[0]))
        with atomic_path(self.output, overwrite=True) as tmp:
            tifffile.imwrite(tmp, data=slices, shape=shape, dtype=dtype, **kwargs)
        shutil.rmtree(self.path, ignore_errors=True)


def _replace_path(src: str, dst: str) -> None:
    """Move src to dst; an existing dst is moved aside first and deleted only once src is in place."""
    old = None
    if os.path.exists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def ome_multiscales_metadata(voxel_size=None, name: str = "volume", levels: int = 0,
                             level0_path: str = "0") -> dict:
    """OME-Zarr 0.4 ``multiscales`` entry for (Z, Y, X) levels 0..``levels`` at paths '0', '1', ...

    ``level0_path`` names the full-resolution array where a user chose another name (no pyramid then).

    Level ``k`` has the scale ``voxel_size * 2**k`` (nm; 1 per voxel without a voxel size) and, for
    k >= 1, the translation ``(2**k - 1) / 2 * voxel_size``: a mean-downsampled voxel's centre is the
    centre of the 2**k level-0 voxels it averages, so the levels overlay exactly in viewers.
    """
    base = [float(v) for v in voxel_size] if voxel_size is not None else [1.0, 1.0, 1.0]
    axes = [{"name": n, "type": "space"} for n in ("z", "y", "x")]
    if voxel_size is not None:
        for a in axes:
            a["unit"] = "nanometer"
    datasets = []
    for level in range(levels + 1):
        transforms = [{"type": "scale", "scale": [v * 2 ** level for v in base]}]
        if level:
            transforms.append({"type": "translation", "translation": [v * (2 ** level - 1) / 2 for v in base]})
        datasets.append({"path": str(level) if level else level0_path, "coordinateTransformations": transforms})
    metadata = {"version": "0.4", "name": name, "axes": axes, "datasets": datasets}
    if levels:
        metadata["type"] = "mean"
        metadata["metadata"] = {"description": "each level is the 2x2x2 mean of the previous one (ceil sizes; "
                                               "integers rounded to nearest, ties to even)"}
    return metadata
