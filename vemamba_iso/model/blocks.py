"""Building blocks of the reconstruction network: ConvFFN, VDIM, the VEMamba block and residual group."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .volume_mamba import VolumeMambaModule


class ConvFeedForward(nn.Module):
    """ConvFFN: 1x1x1 expansion, depthwise 3x3x3 (local context), GELU, 1x1x1 projection."""

    def __init__(self, dim: int, ratio: float = 2.0):
        super().__init__()
        hidden = int(round(dim * ratio))
        self.expand = nn.Conv3d(dim, hidden, 1)
        self.depthwise = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, dim, D, H, W), best stored channels last (as the network keeps its maps) -> same."""
        return _pointwise(self.project, F.gelu(self.depthwise(_pointwise(self.expand, x))))


def _pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution as one linear layer over the channels-last tokens; the result stays channels last.

    On one CPU thread PyTorch runs 1x1x1 convolutions through a path that returns channels-first maps,
    and the depthwise convolution after it then takes its channels-first path, whose backward is about
    3x slower (96 against 31 ms for 4 x 48 x 8 x 32 x 32).
    """
    weight = conv.weight.flatten(1)  # (out, in)
    return F.linear(x.movedim(1, -1), weight, conv.bias).movedim(-1, 1)


class DegradationInjection(nn.Module):
    """VDIM: LayerNorm over channels, then scale and shift from a linear map of the degradation
    representation (``x * (1 + scale) + shift``). Without a representation it is a plain LayerNorm."""

    def __init__(self, dim: int, representation_dim: int | None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.modulation = None
        if representation_dim:
            self.modulation = nn.Linear(representation_dim, 2 * dim)
            nn.init.normal_(self.modulation.weight, std=0.02)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, representation: torch.Tensor | None) -> torch.Tensor:
        """x: (batch, dim, *spatial); representation: (batch, representation_dim) or None."""
        y = self.norm(x.movedim(1, -1)).movedim(-1, 1)
        if self.modulation is None or representation is None:
            return y
        scale, shift = self.modulation(representation).chunk(2, dim=1)
        view = (*scale.shape, *([1] * (x.ndim - 2)))
        return y * (1 + scale.view(view)) + shift.view(view)


class VEMambaBlock(nn.Module):
    """Pre-norm residual block: VDIM -> volume Mamba module, VDIM -> ConvFFN."""

    def __init__(self, dim: int, representation_dim: int | None, state_size: int, expand: float,
                 ffn_ratio: float, paths_per_chunk: int = 4, aggregation: str = "restored"):
        super().__init__()
        self.norm_mamba = DegradationInjection(dim, representation_dim)
        self.mamba = VolumeMambaModule(dim, expand=expand, state_size=state_size, paths_per_chunk=paths_per_chunk,
                                       aggregation=aggregation)
        self.norm_ffn = DegradationInjection(dim, representation_dim)
        self.ffn = ConvFeedForward(dim, ffn_ratio)

    def forward(self, x: torch.Tensor, representation: torch.Tensor | None) -> torch.Tensor:
        x = x + self.mamba(self.norm_mamba(x, representation))
        return x + self.ffn(self.norm_ffn(x, representation))


class ResidualGroup(nn.Module):
    """Blocks followed by a 3x3x3 convolution, with a residual connection around the group."""

    def __init__(self, dim: int, blocks: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(VEMambaBlock(dim, **block_kwargs) for _ in range(blocks))
        self.conv = nn.Conv3d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, representation: torch.Tensor | None) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, representation)
        return x + self.conv(y)
