"""A trained VEMamba model as a block processor for :func:`reconstruct_blockwise`.

Blocks of one volume must all be normalised alike, or the seams show: the intensity record
(scale, offset) is computed once for the whole store, streaming over it chunk by chunk, with the
model's nnU-Net normalisation scheme. The network is loaded lazily, once per process, so that the
processor itself stays small when Dask sends it to every worker.
"""
from __future__ import annotations

import hashlib

import numpy as np

from tqdm import tqdm

from ..data.intensity import input_scheme
from .stores import VolumeSource

_NETWORKS: dict = {}
#: voxels read at once by the statistics pass (float64, and its square: about 0.5 GB)
STATISTICS_READ_VOXELS = 2 ** 25


def volume_intensity_record(source: VolumeSource, scheme: str, slab: int | None = None,
                            progress: bool = True) -> dict:
    """``{scheme, scale, offset}`` of :func:`vemamba_iso.data.intensity.normalize` for the whole store,
    computed piece by piece: slabs of ``slab`` Z slices (default: the store's Z chunk), split along Y so
    that one read holds at most ``STATISTICS_READ_VOXELS`` voxels (a contiguous HDF5 dataset, whose one
    chunk is the whole volume, or a large lateral extent, stays within that bound)."""
    if scheme == "RGBTo01Normalization" and source.dtype == np.uint8:
        return {"scheme": scheme, "scale": 255.0, "offset": 0.0}   # known without reading the volume
    depth, height, width = source.shape
    # whole Z chunks (a thinner slab would decompress each chunk once per slice), split along Y
    slab = slab or max(1, min(source.chunks[0], STATISTICS_READ_VOXELS // max(1, width)))
    rows = max(1, min(height, STATISTICS_READ_VOXELS // max(1, slab * width)))
    lo, hi, total, total_sq, count = np.inf, -np.inf, 0.0, 0.0, 0
    pieces = [(z, y) for z in range(0, depth, slab) for y in range(0, height, rows)]
    for z, y in tqdm(pieces, desc="intensity statistics", unit="piece", disable=not progress or len(pieces) < 2,
                     dynamic_ncols=True):
        values = source.read((slice(z, z + slab), slice(y, y + rows), slice(None))).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{source.path} has NaN or infinite voxels in slices {z}..{min(z + slab, depth) - 1}; "
                             "replace them (e.g. by 0) before reconstruction")
        lo, hi = min(lo, values.min()), max(hi, values.max())
        total, total_sq, count = total + values.sum(), total_sq + (values ** 2).sum(), count + values.size
    scheme = input_scheme(scheme, source.dtype, lo, hi)
    if scheme == "RGBTo01Normalization":
        return {"scheme": scheme, "scale": 255.0, "offset": 0.0}
    if scheme == "RescaleTo01Normalization":
        return {"scheme": scheme, "scale": max(hi - lo, 1e-8), "offset": lo}
    if scheme == "ZScoreNormalization":
        mean = total / count
        return {"scheme": scheme, "scale": max(np.sqrt(max(total_sq / count - mean ** 2, 0.0)), 1e-8), "offset": mean}
    raise ValueError(f"unknown normalisation scheme {scheme!r}")


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelProcessor:
    """Reconstruct blocks with a trained model (see :class:`vemamba_iso.blockwise.BlockProcessor`).

    Args:
        model: model directory or file (None: the shipped default model).
        intensity: normalisation record of the whole input (:func:`volume_intensity_record`).
        axis: the degraded axis of the input (Z = 0).
        device, tile, overlap, batch_size (tiles per forward pass), flip_average: as for
            :func:`vemamba_iso.inference.reconstruct_volume`, inside each block (``None``: the model's
            training patch and a quarter of it; a block is not one tile, because the network reconstructs
            best at the input size it was trained on, not at the block's).
    """

    def __init__(self, model=None, *, intensity: dict, axis: int = 0, device: str = "cpu",
                 tile=None, overlap=None, batch_size: int = 2, flip_average: bool = False):
        from ..training.checkpoint import read_model_file, resolve_model_dir

        self.path = str(resolve_model_dir(model))
        # the record inside the weights file, as the in-memory path reads it: a model file passed on its
        # own, or renamed next to another model's metadata.json, still gets its own factor
        self.metadata = read_model_file(self.path)["metadata"]
        self.factor, self.axis, self.device = int(self.metadata["factor"]), int(axis), str(device)
        self.intensity, self.batch_size = dict(intensity), batch_size
        self.tile = tuple(tile) if tile is not None else None
        self.overlap = tuple(overlap) if overlap is not None else None
        self.flip_average = bool(flip_average)
        self.sha256 = _file_sha256(self.path)

    def identity(self) -> dict:
        return {"method": "vemamba", "weights_sha256": self.sha256, "intensity": self.intensity,
                "tile": list(self.tile) if self.tile else "training patch",
                "overlap": list(self.overlap) if self.overlap else "quarter tile",
                "flip_average": self.flip_average}

    def network(self):
        key = (self.sha256, self.device)
        if key not in _NETWORKS:
            from ..training.checkpoint import load_model

            _NETWORKS[key] = load_model(self.path, device=self.device)[0]
        return _NETWORKS[key]

    def _normalised(self, block: np.ndarray) -> np.ndarray:
        x = np.moveaxis(np.asarray(block, dtype=np.float32), self.axis, 0)
        return (x - self.intensity["offset"]) / self.intensity["scale"]

    def _restored(self, y: np.ndarray) -> np.ndarray:
        return np.moveaxis(y * self.intensity["scale"] + self.intensity["offset"], 0, self.axis)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        from ..inference import reconstruct_volume

        normed = self._normalised(block)
        y = reconstruct_volume(self.network(), normed, factor=self.factor, tile=self.tile, overlap=self.overlap,
                               batch_size=self.batch_size, device=self.device, progress=False,
                               flip_average=self.flip_average)
        return self._restored(y)

    def process_batch(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        """Blocks of one shape that each fit in one tile go through one forward pass; larger blocks go
        block by block (their tiles are batched inside :func:`reconstruct_volume`)."""
        from ..inference.tiling import default_tiling, reconstruct_tile

        network = self.network()
        tile = self.tile or default_tiling(network)[0]
        shape = list(blocks[0].shape)
        shape.insert(0, shape.pop(self.axis))              # the degraded axis first, as the network sees it
        if any(s > t for s, t in zip(shape, tile)):
            return [self(b) for b in blocks]
        network.eval()
        y = reconstruct_tile(network, np.stack([self._normalised(b) for b in blocks]), self.device, self.flip_average)
        return [self._restored(v) for v in y]
