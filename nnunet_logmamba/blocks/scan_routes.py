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
        ``(batch, K, channels, L + G)`` with ``L = prod(spatial)``, stored as ``(batch, L + G, K, channels)``:
        every position's tokens of all routes side by side, the layout in which the scan's input
        projections are one matrix product and the scan reads them without a transposed copy.
        Tokens stored channels last (as :func:`.token_extractors.unfold_neighbourhood` returns them)
        with one route and no global tokens are returned as a view.
    """
    check_directions(directions)
    ndim = tokens.dim() - 2
    # joined and stacked as (batch, tokens, channels)
    glob = None if global_tokens is None else global_tokens.transpose(1, 2)
    forward = join_tokens(tokens.flatten(2).transpose(1, 2), glob, join, dim=-2)
    routes = [forward]
    if directions >= 2:
        routes.append(forward.flip(-2))
    if directions == 4:
        transposed = tokens.permute(_transpose_order(ndim)).flatten(2).transpose(1, 2)
        transposed = join_tokens(transposed, glob, join, dim=-2)
        routes.extend([transposed, transposed.flip(-2)])
    stacked = forward.unsqueeze(2) if directions == 1 else torch.stack(routes, dim=2)
    return stacked.permute(0, 2, 3, 1)


def merge_routes(sequences: torch.Tensor, spatial_size: tuple[int, ...], num_global: int,
                 join: str) -> torch.Tensor:
    """Inverse of :func:`build_routes` for the local positions, summed over routes.

    Args:
        sequences: ``(batch, K, channels, L + G)`` scan outputs.
        spatial_size: the token map's spatial size (``L = prod``).
        num_global: ``G``.

    Returns:
        ``(batch, channels, L)`` in row-major order, stored as ``(batch, L, channels)`` (a view of
        ``sequences`` when it is stored as :func:`build_routes` stores it, with one route and no global
        tokens).
    """
    directions = sequences.shape[1]
    check_directions(directions)
    ndim = len(spatial_size)
    routes = sequences.transpose(-1, -2)  # (batch, K, L + G, channels)
    forward = split_local(routes[:, 0], num_global, join, dim=-2)
    if directions >= 2:
        forward = forward + split_local(routes[:, 1].flip(-2), num_global, join, dim=-2)
    if directions == 4:
        transposed = split_local(routes[:, 2], num_global, join, dim=-2)
        transposed = transposed + split_local(routes[:, 3].flip(-2), num_global, join, dim=-2)
        batch, channels = transposed.shape[0], transposed.shape[-1]
        transposed = transposed.reshape(batch, *reversed(spatial_size), channels)
        order = [0] + list(range(ndim, 0, -1)) + [ndim + 1]  # the spatial axes back in row-major order
        forward = forward + transposed.permute(order).reshape(batch, -1, channels)
    return forward.transpose(1, 2)
