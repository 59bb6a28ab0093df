"""Continuous ("snake") scan orders over a 3D token grid and their exact inverses.

A volume of features (batch, channels, D, H, W) is flattened row-major to (batch, channels, D*H*W);
``D`` is the axial (upsampled) axis, ``H`` and ``W`` are lateral. A scan order is a permutation
``perm`` of ``range(D*H*W)``: the sequence is ``tokens[..., perm]`` and ``sequence[..., argsort(perm)]``
puts it back. Snake orders reverse the direction of the faster axes at every step of the slower ones,
so consecutive tokens are always grid neighbours (no jumps at line ends).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Traversal (slowest, middle, fastest) axes, as indices into (D, H, W), of the two lateral orders of each
#: order family. ``axial_first``: D varies fastest (columns along the axial axis), walked plane by plane
#: with H or W slowest; ``lateral_first``: one lateral plane after another, each in H-W or W-H order.
FAMILY_ORDERS = {
    "axial_first": ((1, 2, 0), (2, 1, 0)),
    "lateral_first": ((0, 1, 2), (0, 2, 1)),
}
#: The first (main) order of each family.
ORDER_AXES = {family: orders[0] for family, orders in FAMILY_ORDERS.items()}


def snake_permutation(shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Flat indices (row-major over ``shape``) of a continuous snake through the grid.

    Args:
        shape: grid size, any number of dimensions.
        axes: the grid axes from slowest to fastest varying along the scan.

    Returns:
        int64 array of length ``prod(shape)``; neighbouring entries index grid neighbours.
    """
    sizes = [shape[a] for a in axes]
    # Boustrophedon in traversal coordinates: an axis runs backwards whenever the number of
    # completed lines of all slower axes so far is odd.
    grids = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
    coords = []
    lines_before = np.zeros(sizes, dtype=np.int64)
    for level, (size, grid) in enumerate(zip(sizes, grids)):
        backwards = lines_before % 2 == 1
        coords.append(np.where(backwards, size - 1 - grid, grid))
        lines_before = lines_before * size + grid  # lines completed, in traversal order
    grid_coords = [None] * len(shape)
    for axis, coord in zip(axes, coords):
        grid_coords[axis] = coord.reshape(-1)
    return np.ravel_multi_index(grid_coords, shape).astype(np.int64)


@lru_cache(maxsize=64)
def _orders(shape: tuple[int, int, int], family: str, lateral_orders: int) -> tuple[np.ndarray, ...]:
    perms = []
    for axes in FAMILY_ORDERS[family][:lateral_orders]:
        forward = snake_permutation(shape, axes)
        perms += [forward, forward[::-1].copy()]
    return tuple(perms)


def scan_permutations(shape: tuple[int, int, int], family: str, device=None,
                      lateral_orders: int = 1) -> list[torch.Tensor]:
    """Snake permutations of one order family for a (D, H, W) grid.

    Args:
        shape: the token grid (D, H, W).
        family: ``axial_first`` or ``lateral_first``.
        lateral_orders: 1 (the family's main order) or 2 (both lateral orders, as the paper's ALCSSM).

    Returns:
        ``2 * lateral_orders`` permutations: each order forward, then reversed.
    """
    if family not in FAMILY_ORDERS:
        raise ValueError(f"unknown scan order family {family!r}; choose one of {sorted(FAMILY_ORDERS)}")
    if lateral_orders not in (1, 2):
        raise ValueError(f"lateral_orders must be 1 or 2, got {lateral_orders}")
    return [torch.as_tensor(p, device=device)
            for p in _orders(tuple(int(s) for s in shape), family, int(lateral_orders))]


@lru_cache(maxsize=256)
def _paths_on(shape: tuple[int, int, int], family: str, device: str, lateral_orders: int):
    perms = scan_permutations(shape, family, device=device, lateral_orders=lateral_orders)
    return tuple((p, inverse_permutation(p)) for p in perms)


def scan_paths(shape: tuple[int, int, int], family: str, device, lateral_orders: int = 1):
    """``(permutation, inverse)`` pairs of :func:`scan_permutations`, built once per grid and device.

    A network calls this every forward with the same few grids; caching spares rebuilding the
    inverses and, on a GPU, copying the index tensors to the device each time. Do not modify them.
    """
    return _paths_on(tuple(int(s) for s in shape), family, str(torch.device(device)), int(lateral_orders))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm``: ``x[..., perm][..., inverse] == x``."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _PermuteTokens(torch.autograd.Function):
    """``tokens[..., perm]`` whose backward is the gather with the inverse permutation (a permutation's
    adjoint), instead of index_select's scatter-add."""

    @staticmethod
    def forward(ctx, tokens, perm, inverse):
        ctx.save_for_backward(inverse, perm)
        return _gather_last(tokens, perm)

    @staticmethod
    def backward(ctx, grad):
        inverse, perm = ctx.saved_tensors
        return _gather_last(grad, inverse), None, None


def _gather_last(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # index_select along the last axis of a 2D view: on CPU about 10x faster than on the 3D tensor
    flat = tokens.reshape(-1, tokens.shape[-1])
    return flat.index_select(1, index).view(*tokens.shape[:-1], index.numel())


def permute_tokens(tokens: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``tokens[..., perm]`` for a permutation ``perm`` of the last axis with its ``inverse`` (differentiable).

    tokens: (..., L) -> (..., L). Used to put tokens into scan order (``perm``) and back (``inverse``,
    with ``perm`` as its own inverse).
    """
    return _PermuteTokens.apply(tokens, perm, inverse)


def to_sequence(tokens: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(batch, channels, L) grid-ordered tokens -> the same tokens in scan order."""
    return tokens.index_select(-1, perm)


def from_sequence(sequence: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_sequence`."""
    return sequence.index_select(-1, inverse_permutation(perm))
