"""Scan directions (routes) over an N-d token map: K = 1, 2 or 4 sequences and their inverses.

* route 0: row-major flatten (first spatial axis slowest);
* route 1: route 0 reversed;
* route 2: flatten with the spatial axes in reverse order (column-major, the "transposed" scan);
* route 3: route 2 reversed.

Global tokens are joined to each route's local sequence with the same join order, so every route
sees them; reversed routes reverse the joined sequence.
"""
from __future__ import annotations

import torch

from .token_join import join_tokens, split_local

SCAN_DIRECTIONS = (1, 2, 4)


def check_directions(directions: int) -> int:
    """Validate the number of scan directions ``K``."""
    if directions not in SCAN_DIRECTIONS:
        raise ValueError(f"directions (K) must be one of {SCAN_DIRECTIONS}, got {directions!r}")
    return directions


def _transpose_order(ndim: int) -> list[int]:
    return [0, 1] + list(range(ndim + 1, 1, -1))


def build_routes(tokens: torch.Tensor, global_tokens: torch.Tensor | None, directions: int,
                 join: str) -> torch.Tensor:
    """Sequences to scan.

    Args:
        tokens: local token map ``(batch, channels, *spatial)``.
        global_tokens: ``(batch, channels, G)`` or None.
        directions: ``K`` in (1, 2, 4).
        join: join order (see :mod:`.token_join`).

    Returns:
        ``(batch, K, channels, L + G)`` with ``L = prod(spatial)``.
    """
    check_directions(directions)
    ndim = tokens.dim() - 2
    forward = join_tokens(tokens.flatten(2), global_tokens, join)
    routes = [forward]
    if directions >= 2:
        routes.append(forward.flip(-1))
    if directions == 4:
        transposed = tokens.permute(_transpose_order(ndim)).flatten(2)
        transposed = join_tokens(transposed, global_tokens, join)
        routes.extend([transposed, transposed.flip(-1)])
    return torch.stack(routes, dim=1)


def merge_routes(sequences: torch.Tensor, spatial_size: tuple[int, ...], num_global: int,
                 join: str) -> torch.Tensor:
    """Inverse of :func:`build_routes` for the local positions, summed over routes.

    Args:
        sequences: ``(batch, K, channels, L + G)`` scan outputs.
        spatial_size: the token map's spatial size (``L = prod``).
        num_global: ``G``.

    Returns:
        ``(batch, channels, L)`` in row-major order.
    """
    directions = sequences.shape[1]
    check_directions(directions)
    ndim = len(spatial_size)
    forward = split_local(sequences[:, 0], num_global, join)
    if directions >= 2:
        forward = forward + split_local(sequences[:, 1].flip(-1), num_global, join)
    if directions == 4:
        transposed = split_local(sequences[:, 2], num_global, join)
        transposed = transposed + split_local(sequences[:, 3].flip(-1), num_global, join)
        batch, channels = transposed.shape[:2]
        transposed = transposed.reshape(batch, channels, *reversed(spatial_size))
        forward = forward + transposed.permute(_transpose_order(ndim)).flatten(2)
    return forward
