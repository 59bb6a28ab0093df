"""VEMamba network: volume Mamba blocks (ALCSSM + DWAM), ConvFFN, VDIM, MoCo degradation encoder."""
from .blocks import ConvFeedForward, DegradationInjection, ResidualGroup, VEMambaBlock
from .degradation_encoder import DegradationEncoder, MoCoDegradationLearner
from .network import (MAX_FACTOR, MIN_FACTOR, NetworkConfig, VEMambaNetwork, axial_pixel_shuffle,
                      count_parameters, interpolate_axial_linear)
from .scan_orders import FAMILY_ORDERS, ORDER_AXES, inverse_permutation, scan_permutations, snake_permutation
from .volume_mamba import AGGREGATIONS, PATHS_PER_CHUNK, DirectionWeightedAggregation, VolumeMambaModule

__all__ = ["NetworkConfig", "VEMambaNetwork", "VEMambaBlock", "ResidualGroup", "ConvFeedForward",
           "DegradationInjection", "DegradationEncoder", "MoCoDegradationLearner", "VolumeMambaModule",
           "DirectionWeightedAggregation", "scan_permutations", "snake_permutation", "inverse_permutation",
           "ORDER_AXES", "FAMILY_ORDERS", "AGGREGATIONS", "PATHS_PER_CHUNK", "axial_pixel_shuffle", "interpolate_axial_linear", "count_parameters",
           "MIN_FACTOR", "MAX_FACTOR"]
