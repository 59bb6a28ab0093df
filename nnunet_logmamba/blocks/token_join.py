"""Where global tokens go in the scanned sequence, and how the local outputs are recovered.

Every join order is a permutation of the concatenation ``[local tokens, global tokens]``; joining
gathers with it and splitting reads back the positions that hold local tokens, so each order has an
exact inverse by construction.

Orders (``L`` local tokens, ``G`` global tokens):

* ``head``: all global tokens first.
* ``middle``: global tokens after the first ``L // 2`` local tokens.
* ``split``: the first ``ceil(G / 2)`` global tokens at the head, the rest at the tail.
* ``interleaved`` (default): one global token before each of ``min(G, L)`` equal runs of local
  tokens (the last run takes the remainder), so the scan meets global context at fixed intervals;
  global tokens beyond ``L`` go to the head.
"""
from __future__ import annotations

import functools

import torch

JOIN_ORDERS = ("head", "middle", "split", "interleaved")


@functools.lru_cache(maxsize=256)
def _order(num_local: int, num_global: int, join: str) -> tuple[int, ...]:
    local = list(range(num_local))
    glob = list(range(num_local, num_local + num_global))
    if join == "head":
        return tuple(glob + local)
    if join == "middle":
        half = num_local // 2
        return tuple(local[:half] + glob + local[half:])
    if join == "split":
        first = (num_global + 1) // 2
        return tuple(glob[:first] + local + glob[first:])
    # interleaved
    runs = min(num_global, num_local)
    if runs == 0:
        return tuple(glob + local)
    excess, placed = glob[:num_global - runs], glob[num_global - runs:]
    interval = num_local // runs
    order = list(excess)
    for r in range(runs):
        stop = num_local if r == runs - 1 else (r + 1) * interval
        order.append(placed[r])
        order.extend(local[r * interval:stop])
    return tuple(order)


def join_permutation(num_local: int, num_global: int, join: str = "interleaved") -> list[int]:
    """Indices into ``[local tokens, global tokens]`` giving the joined sequence (length ``L + G``)."""
    if join not in JOIN_ORDERS:
        raise ValueError(f"unknown join order {join!r}; choose one of {JOIN_ORDERS}")
    if num_local < 1 or num_global < 0:
        raise ValueError(f"need num_local >= 1 and num_global >= 0, got {num_local}, {num_global}")
    return list(_order(num_local, num_global, join))


def join_tokens(local: torch.Tensor, global_tokens: torch.Tensor | None, join: str = "interleaved",
                dim: int = -1) -> torch.Tensor:
    """Join ``local`` (``L`` tokens along ``dim``) and ``global_tokens`` (``G`` along ``dim``) along ``dim``.

    The other axes must match. Returns ``L + G`` tokens along ``dim``; with no global tokens, ``local``
    itself. ``dim=-2`` joins sequences stored as ``(..., tokens, channels)``, keeping that layout.
    """
    if global_tokens is None or global_tokens.shape[dim] == 0:
        if join not in JOIN_ORDERS:
            raise ValueError(f"unknown join order {join!r}; choose one of {JOIN_ORDERS}")
        return local
    others = [s for i, s in enumerate(local.shape) if i != dim % local.dim()]
    if local.dim() != global_tokens.dim() or others != [s for i, s in enumerate(global_tokens.shape)
                                                         if i != dim % global_tokens.dim()]:
        raise ValueError(f"local tokens {tuple(local.shape)} and global tokens {tuple(global_tokens.shape)} "
                         f"must agree on every axis but the token axis ({dim})")
    order = join_permutation(local.shape[dim], global_tokens.shape[dim], join)
    index = torch.tensor(order, device=local.device)
    return torch.cat([local, global_tokens], dim=dim).index_select(dim, index)


def local_positions(num_local: int, num_global: int, join: str = "interleaved") -> list[int]:
    """Positions of the local tokens, in their original order, inside the joined sequence."""
    order = join_permutation(num_local, num_global, join)
    positions = [0] * num_local
    for pos, source in enumerate(order):
        if source < num_local:
            positions[source] = pos
    return positions


def split_local(joined: torch.Tensor, num_global: int, join: str = "interleaved", dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`join_tokens` for the local part: ``L + G`` tokens along ``dim`` -> ``L``."""
    if num_global == 0:
        return joined
    num_local = joined.shape[dim] - num_global
    index = torch.tensor(local_positions(num_local, num_global, join), device=joined.device)
    return joined.index_select(dim, index)
