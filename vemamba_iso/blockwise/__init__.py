"""Block-wise, resumable, distributed reconstruction of large chunked volumes (Zarr, OME-Zarr, HDF5)."""
from .engine import BlockProcessor, default_workers, reconstruct_blockwise
from .grid import Block, BlockGrid
from .processors import LinearInterpolation
from .stores import VolumeSource, store_format

__all__ = ["reconstruct_blockwise", "BlockProcessor", "BlockGrid", "Block", "VolumeSource", "store_format",
           "LinearInterpolation", "default_workers"]
