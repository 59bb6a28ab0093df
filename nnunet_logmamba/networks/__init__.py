"""nnU-Net's planned U-Nets with LoG-VMamba blocks placed by spatial size."""
from .log_vmamba_unet import (PLACEMENTS, LoGVMambaConfig, StageWithMamba, all_stages_mode, build_log_vmamba_network,
                              insert_log_vmamba_blocks)
from .placement import VARIANTS, PlacementRule, stage_spatial_sizes

__all__ = ["LoGVMambaConfig", "PlacementRule", "StageWithMamba", "build_log_vmamba_network",
           "insert_log_vmamba_blocks", "stage_spatial_sizes", "VARIANTS", "PLACEMENTS", "all_stages_mode"]
