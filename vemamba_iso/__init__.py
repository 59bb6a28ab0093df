"""VEMamba isotropic reconstruction of volume EM (self-supervised, volume Mamba network)."""
try:
    from importlib.metadata import version as _version
    __version__ = _version("bioimage-mamba")
except Exception:  # not installed (source tree)
    __version__ = "0.0.0"
