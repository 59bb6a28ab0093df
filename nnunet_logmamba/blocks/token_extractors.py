"""Token extractors of LoG-VMamba: what each position of the scanned sequence carries.

All extractors take a channels-first feature map ``(batch, channels, *spatial)`` with 1, 2 or 3
spatial axes and work the same way for every dimension (the conv op is picked from the tensor's
dimension, never copied per dimension).

* :class:`LocalTokenExtractor` (LTX): squeeze channels, SiLU, then put the ``k**d`` neighbourhood of
  each position onto the channel axis, so one token "sees" its neighbours although the scan is 1D.
* :class:`DepthwiseTokenExtractor`: the vanilla VSS local mixing (depthwise conv + SiLU), used where
  no LTX is wanted (the G-VMamba variant and the GTX-only stages).
* :class:`GlobalTokenExtractor` (GTX): compress the map with a strided depthwise conv,
  mix the whole compressed field of view with one linear layer, SiLU: a handful of global tokens
  that are joined to the local sequence.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_for_ndim(ndim: int) -> type[nn.Module]:
    """The ``nn.ConvNd`` class for ``ndim`` spatial axes (1, 2 or 3)."""
    if ndim not in _CONV:
        raise ValueError(f"only 1, 2 or 3 spatial axes are supported, got {ndim}")
    return _CONV[ndim]


def unfold_neighbourhood(x: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Stack the ``kernel_size**d`` neighbours of every position onto the channel axis.

    Args:
        x: ``(batch, channels, *spatial)``, ``d = len(spatial)`` in 1..3.
        kernel_size: odd neighbourhood edge ``k``.

    Returns:
        ``(batch, channels * k**d, *spatial)``, stored channels last (the layout in which the tokens are
        projected and scanned). Channel ``c * k**d + j`` holds input channel ``c`` shifted by the
        ``j``-th offset of the neighbourhood in row-major order (offsets ``-k//2 .. k//2`` per axis,
        first axis slowest); positions outside the map read zero.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    conv_for_ndim(x.dim() - 2)
    # the Function returns the channels-last tensor itself, not a view, so callers may modify it in place
    return _NeighbourhoodUnfold.apply(x, kernel_size).movedim(-1, 1)


def _neighbourhood_windows(spatial: Sequence[int], kernel_size: int):
    """Per neighbourhood offset (row-major), the index of the shifted window in the padded map."""
    for offset in itertools.product(range(kernel_size), repeat=len(spatial)):
        yield (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset, spatial))


class _NeighbourhoodUnfold(torch.autograd.Function):
    """``unfold_neighbourhood`` with a backward that adds the ``k**d`` shifted gradients into one buffer.

    Autograd of the slice-and-stack forward would build one zero-filled padded map per offset and sum
    them: ``k**d`` full-size allocations per call, which cost more than the scan on large maps.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        half = kernel_size // 2
        padded = F.pad(x.movedim(1, -1), [0, 0] + [half] * (2 * len(spatial)))  # (batch, *padded, channels)
        windows = padded
        for axis in range(1, len(spatial) + 1):  # a view (batch, *spatial, channels, k, ..., k)
            windows = windows.unfold(axis, kernel_size, 1)
        out = x.new_empty(x.shape[:1] + spatial + (x.shape[1] * kernel_size ** len(spatial),))
        out.view(windows.shape).copy_(windows)
        ctx.kernel_size, ctx.shape = kernel_size, x.shape
        return out  # (batch, *spatial, channels * k**d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kernel_size, shape = ctx.kernel_size, ctx.shape
        spatial, half = tuple(shape[2:]), kernel_size // 2
        grad = grad.unflatten(-1, (shape[1], kernel_size ** len(spatial)))
        padded = grad.new_zeros(shape[:1] + tuple(s + 2 * half for s in spatial) + (shape[1],))
        for j, window in enumerate(_neighbourhood_windows(spatial, kernel_size)):
            padded[window] += grad[..., j]
        interior = (slice(None),) + tuple(slice(half, half + s) for s in spatial)
        return padded[interior].movedim(-1, 1), None


class LocalTokenExtractor(nn.Module):
    """LTX: grouped 1x1 conv squeezing channels by ``squeeze``, SiLU, fixed neighbourhood unfold.

    Args:
        channels: input channels.
        ndim: spatial axes (2 or 3; 1 works too).
        squeeze: channel reduction factor (paper: 8 in 2D, 16 in 3D). Capped so at least one
            channel remains.
        kernel_size: neighbourhood edge ``k`` of the unfold (paper: 3).

    ``forward``: ``(batch, channels, *spatial)`` -> ``(batch, out_channels, *spatial)`` with
    ``out_channels = squeezed_channels * k**ndim`` (see :attr:`out_channels`).
    """

    def __init__(self, channels: int, ndim: int, squeeze: int = 8, kernel_size: int = 3):
        super().__init__()
        if channels < 1 or squeeze < 1:
            raise ValueError(f"channels and squeeze must be >= 1, got channels={channels}, squeeze={squeeze}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.ndim = ndim
        self.kernel_size = kernel_size
        self.squeezed_channels = max(1, channels // squeeze)
        groups = math.gcd(channels, self.squeezed_channels)
        self.squeeze = conv_for_ndim(ndim)(channels, self.squeezed_channels, 1, groups=groups)
        self.out_channels = self.squeezed_channels * kernel_size ** ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unfold_neighbourhood(self.squeezed(x), self.kernel_size)

    def squeezed(self, x: torch.Tensor) -> torch.Tensor:
        """The squeezed, activated map before the unfold, ``(batch, squeezed_channels, *spatial)``.

        The grouped 1x1 conv is applied as one linear layer over the channel axis (its weight made
        block-diagonal): the same result, without the conv's copies of a channels-last input to
        channels first and back, which cost as much as the rest of the extractor on large maps.
        Returned stored channels last.
        """
        _check_ndim(x, self.ndim, type(self).__name__)
        weight = self.squeeze.weight.flatten(1)  # (squeezed, channels // groups)
        groups = self.squeeze.groups
        if groups > 1:
            weight = torch.block_diag(*weight.chunk(groups, dim=0))
        return F.silu(F.linear(x.movedim(1, -1), weight, self.squeeze.bias)).movedim(-1, 1)


class DepthwiseTokenExtractor(nn.Module):
    """Vanilla VSS local mixing: depthwise ``k``-conv and SiLU, channels unchanged."""

    def __init__(self, channels: int, ndim: int, kernel_size: int = 3):
        super().__init__()
        self.ndim = ndim
        self.conv = conv_for_ndim(ndim)(channels, channels, kernel_size, padding=kernel_size // 2,
                                        groups=channels)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_ndim(x, self.ndim, type(self).__name__)
        return F.silu(self.conv(x))


def global_compression(spatial_size: Sequence[int], max_edge: int = 4) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and resulting size of the GTX compression for a map of ``spatial_size``.

    Each axis is strided just enough to leave at most ``max_edge`` positions (axes already that
    small are not strided), so anisotropic maps are compressed per axis.

    Returns:
        ``(strides, compressed_size)``, one entry per spatial axis.
    """
    if max_edge < 1:
        raise ValueError(f"max_edge must be >= 1, got {max_edge}")
    if not spatial_size or any(int(s) < 1 for s in spatial_size):
        raise ValueError(f"spatial_size must be positive edges, got {tuple(spatial_size)}")
    strides = tuple(max(1, math.ceil(int(s) / max_edge)) for s in spatial_size)
    compressed = tuple(math.ceil(int(s) / st) for s, st in zip(spatial_size, strides))
    return strides, compressed


class GlobalTokenExtractor(nn.Module):
    """GTX: strided depthwise conv, flatten, linear over the compressed space, SiLU.

    Args:
        channels: input channels ``c``.
        spatial_size: spatial size of the maps this extractor will see (from the patch size and the
            stage's cumulative strides); fixes the linear layer's input length.
        num_tokens: global tokens ``G`` produced.
        token_channels: channels of each global token; a multiple of ``channels``. Each input channel
            (a "channel group" of ``token_channels // channels`` token channels) gets its own
            mixture of the whole compressed field of view.
        kernel_size: smallest depthwise kernel edge; per axis the kernel grows to span its stride
            (the paper's dilated kernel would skip positions once the stride exceeds ``k``).
        max_edge: compressed edge per axis (see :func:`global_compression`).

    ``forward``: ``(batch, channels, *spatial_size)`` -> ``(batch, token_channels, num_tokens)``.
    """

    def __init__(self, channels: int, spatial_size: Sequence[int], num_tokens: int = 4,
                 token_channels: int | None = None, kernel_size: int = 3, max_edge: int = 4):
        super().__init__()
        token_channels = channels if token_channels is None else token_channels
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if token_channels % channels:
            raise ValueError(f"token_channels ({token_channels}) must be a multiple of channels ({channels})")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.ndim = len(self.spatial_size)
        strides, self.compressed_size = global_compression(self.spatial_size, max_edge)
        # A k-tap kernel dilated to span a stride > k skips positions; the kernel instead grows to
        # its stride, and the padding is split so the windows tile the whole map (every position
        # reaches some compressed token) while the output keeps ceil(size / stride) positions.
        kernels = tuple(max(kernel_size, s) for s in strides)
        pads = []
        for size, k, st, n in zip(self.spatial_size, kernels, strides, self.compressed_size):
            total = (n - 1) * st + k - size
            pads.append(((k - st) // 2, total - (k - st) // 2))
        self._padding = [p for pair in reversed(pads) for p in pair]  # F.pad order: last axis first
        self.compress = conv_for_ndim(self.ndim)(channels, channels, kernels, stride=strides, groups=channels)
        self.num_tokens = num_tokens
        self.group_size = token_channels // channels
        self.token_channels = token_channels
        self.mix = nn.Linear(math.prod(self.compressed_size), num_tokens * self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_ndim(x, self.ndim, type(self).__name__)
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"GlobalTokenExtractor was built for spatial size {self.spatial_size} (patch size / "
                f"cumulative strides) but got {tuple(x.shape[2:])}; feed patches of the planned size")
        compressed = self.compress(F.pad(x, self._padding)).flatten(2)  # (batch, channels, prod(compressed_size))
        tokens = F.silu(self.mix(compressed))  # (batch, channels, num_tokens * group_size)
        tokens = tokens.unflatten(2, (self.num_tokens, self.group_size)).transpose(2, 3)
        return tokens.flatten(1, 2)  # (batch, channels * group_size, num_tokens)


def _check_ndim(x: torch.Tensor, ndim: int, name: str) -> None:
    if x.dim() != ndim + 2:
        raise ValueError(f"{name} expects (batch, channels, *spatial) with {ndim} spatial axes, "
                         f"got a tensor of shape {tuple(x.shape)}")
