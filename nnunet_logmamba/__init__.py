"""LoG-VMamba (Local-Global Vision Mamba) blocks and trainers for nnU-Net v2."""
__version__ = "0.1.0"
