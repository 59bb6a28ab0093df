"""LoG-VMamba building blocks: token extractors, join orders, scan routes and the VSS-style block."""
from .scan_routes import SCAN_DIRECTIONS, build_routes, merge_routes
from .token_extractors import (DepthwiseTokenExtractor, GlobalTokenExtractor, LocalTokenExtractor,
                               global_compression, unfold_neighbourhood)
from .token_join import JOIN_ORDERS, join_permutation, join_tokens, local_positions, split_local
from .vss_block import DEFAULT_SQUEEZE, TOKEN_MODES, DropPath, LoGVSSBlock

__all__ = ["LocalTokenExtractor", "GlobalTokenExtractor", "DepthwiseTokenExtractor", "unfold_neighbourhood",
           "global_compression", "JOIN_ORDERS", "join_permutation", "join_tokens", "local_positions",
           "split_local", "SCAN_DIRECTIONS", "build_routes", "merge_routes", "LoGVSSBlock", "DropPath",
           "TOKEN_MODES", "DEFAULT_SQUEEZE"]
