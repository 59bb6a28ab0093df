"""A trained VEMamba model as a block processor for :func:`reconstruct_blockwise`.

Blocks of one volume must all be normalised alike, or the seams show: the intensity record
(scale, offset) is computed once for the whole store, streaming over it chunk by chunk, with the
model's nnU-Net normalisation scheme. The network is loaded lazily, once per process, so that the
processor itself stays small when Dask sends it to every worker.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .stores import VolumeSource

_NETWORKS: dict = {}


def volume_intensity_record(source: VolumeSource, scheme: str, slab: int | None = None) -> dict:
    """``{scheme, scale, offset}`` of :func:`vemamba_iso.data.intensity.normalize` for the whole store,
    computed slab by slab along Z (memory bounded by one slab)."""
    if scheme == "RGBTo01Normalization":
        if source.dtype != np.uint8:
            scheme = "RescaleTo01Normalization"
        else:
            return {"scheme": scheme, "scale": 255.0, "offset": 0.0}
    slab = slab or max(1, source.chunks[0])
    lo, hi, total, total_sq, count = np.inf, -np.inf, 0.0, 0.0, 0
    for z in range(0, source.shape[0], slab):
        values = source.read((slice(z, z + slab), slice(None), slice(None))).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{source.path} has NaN or infinite voxels in slices {z}..{z + slab}; "
                             "replace them (e.g. by 0) before reconstruction")
        lo, hi = min(lo, values.min()), max(hi, values.max())
        total, total_sq, count = total + values.sum(), total_sq + (values ** 2).sum(), count + values.size
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
        import json

        from ..training.checkpoint import METADATA_FILE, resolve_model_dir

        self.path = str(resolve_model_dir(model))
        meta_path = os.path.join(os.path.dirname(self.path), METADATA_FILE)
        with open(meta_path) as f:
            self.metadata = json.load(f)
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
