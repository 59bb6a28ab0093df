"""Inference: tiled reconstruction (file-independent) and loading of trained models."""
from .tiling import blend_ramp, default_tiling, reconstruct_tile, reconstruct_volume, tile_starts

__all__ = ["reconstruct_volume", "reconstruct_tile", "default_tiling", "tile_starts", "blend_ramp"]
