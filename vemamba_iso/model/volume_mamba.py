"""Volume Mamba module: axial-lateral chunked selective scans (ALCSSM) fused by DWAM.

After a depthwise 3x3x3 conv, the channels are split in two chunks. The first is scanned in
axial-first snake orders (the axial axis varies fastest), the second in lateral-first snake orders
(in-plane first). With ``paths_per_chunk=4`` (the paper's form, the default) each chunk has both
lateral orders (H then W, W then H), each forward and reversed: 8 paths in all; with 2, only the
first lateral order (the earlier form, kept for the ablation). Every path has its own scan parameters
(``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``dt_bias``).

DWAM (dynamic weight aggregation) fuses the restored paths of a chunk with per-token softmax weights:
``aggregation="restored"`` (the paper's) computes them from the concatenated restored paths
(Linear(P*C -> P*C/2), ReLU, Linear(-> P)); ``"input"`` from the chunk's input tokens (the earlier
form); ``"sum"`` adds the paths with equal weights (ablation). Chunks are concatenated, normalised,
gated by ``silu(z)`` and projected. All scans go through :func:`nnunet_logmamba.ssm.selective_scan`,
in fp32 with autocast disabled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_logmamba.ssm import selective_scan

from .scan_orders import permute_tokens, scan_paths

CHUNK_FAMILIES = ("axial_first", "lateral_first")
PATHS_PER_CHUNK = (2, 4)   # one lateral order or both, each forward and reversed
AGGREGATIONS = ("restored", "input", "sum")


class PathScanParameters(nn.Module):
    """Mamba (S6) parameters for ``paths`` independent scans of ``channels`` channels each."""

    def __init__(self, paths: int, channels: int, state_size: int, dt_rank: int):
        super().__init__()
        self.paths, self.channels, self.state_size, self.dt_rank = paths, channels, state_size, dt_rank
        self.x_proj = nn.Parameter(torch.randn(paths, dt_rank + 2 * state_size, channels) / math.sqrt(channels))
        self.dt_proj = nn.Parameter(torch.randn(paths, channels, dt_rank) * dt_rank ** -0.5)
        # dt initialised log-uniformly in [1e-3, 1e-1] (Mamba's default) through the softplus bias.
        dt = torch.exp(torch.rand(paths * channels) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_size + 1, dtype=torch.float32))
                                  .repeat(paths * channels, 1))
        self.D = nn.Parameter(torch.ones(paths * channels))

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """sequences: (batch, paths, channels, L), one sequence per path -> same shape."""
        batch, paths, channels, length = sequences.shape
        with torch.autocast(device_type=sequences.device.type, enabled=False):
            u = sequences.float()
            projected = torch.einsum("pkc,bpcl->bpkl", self.x_proj.float(), u)
            dt_low, B, C = projected.split([self.dt_rank, self.state_size, self.state_size], dim=2)
            delta = torch.einsum("pcr,bprl->bpcl", self.dt_proj.float(), dt_low)
            y = selective_scan(
                u.reshape(batch, paths * channels, length).contiguous(),
                delta.reshape(batch, paths * channels, length).contiguous(),
                -torch.exp(self.A_log.float()),
                B.contiguous(), C.contiguous(),
                D=self.D.float(), delta_bias=self.dt_bias.float(), delta_softplus=True,
            )
        return y.reshape(batch, paths, channels, length)


class DirectionWeightedAggregation(nn.Module):
    """DWAM: per-token softmax weights over the scan paths of a chunk.

    Args:
        channels: channels ``C`` of one path.
        paths: paths ``P`` of the chunk.
        source: ``restored`` (weights from the P restored paths concatenated, P*C features, as the
            paper), ``input`` (from the chunk's input tokens, C features) or ``sum`` (equal weights 1/P).
    """

    def __init__(self, channels: int, paths: int, source: str = "restored"):
        super().__init__()
        if source not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {source!r}; choose one of {AGGREGATIONS}")
        self.paths, self.source = paths, source
        if source == "restored":
            features = paths * channels
            self.mlp = nn.Sequential(nn.Linear(features, max(features // 2, 4)), nn.ReLU(),
                                     nn.Linear(max(features // 2, 4), paths))
        elif source == "input":
            hidden = max(channels // 2, 4)
            self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, paths))
        else:
            self.mlp = None

    def weights(self, tokens: torch.Tensor, path_outputs: torch.Tensor) -> torch.Tensor:
        """tokens: (batch, C, L); path_outputs: (batch, P, C, L) -> weights (batch, P, L), summing to one."""
        batch, paths, channels, length = path_outputs.shape
        if self.mlp is None:
            return path_outputs.new_full((batch, paths, length), 1.0 / paths)
        features = path_outputs.reshape(batch, paths * channels, length) if self.source == "restored" else tokens
        return torch.softmax(self.mlp(features.transpose(1, 2)), dim=-1).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, path_outputs: torch.Tensor) -> torch.Tensor:
        """path_outputs: (batch, P, C, L) restored to grid order -> (batch, C, L)."""
        return (path_outputs * self.weights(tokens, path_outputs).unsqueeze(2)).sum(dim=1)


class VolumeMambaModule(nn.Module):
    """ALCSSM + DWAM on (batch, dim, D, H, W) features, D being the axial axis."""

    def __init__(self, dim: int, expand: float = 1.0, state_size: int = 8, dt_rank: int | None = None,
                 conv_kernel: int = 3, paths_per_chunk: int = 4, aggregation: str = "restored"):
        super().__init__()
        if paths_per_chunk not in PATHS_PER_CHUNK:
            raise ValueError(f"paths_per_chunk must be one of {PATHS_PER_CHUNK}, got {paths_per_chunk}")
        self.paths_per_chunk = paths_per_chunk
        inner = int(round(dim * expand))
        if inner % 2:
            inner += 1
        self.inner, self.chunk = inner, inner // 2
        dt_rank = dt_rank or max(1, math.ceil(dim / 16))
        self.in_proj = nn.Linear(dim, 2 * inner)
        self.local_conv = nn.Conv3d(inner, inner, conv_kernel, padding=conv_kernel // 2, groups=inner)
        self.scans = nn.ModuleList(PathScanParameters(paths_per_chunk, self.chunk, state_size, dt_rank)
                                   for _ in CHUNK_FAMILIES)
        self.aggregations = nn.ModuleList(DirectionWeightedAggregation(self.chunk, paths_per_chunk, aggregation)
                                          for _ in CHUNK_FAMILIES)
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, dim, D, H, W) -> same shape."""
        batch, _, *grid = x.shape
        xz = self.in_proj(x.flatten(2).transpose(1, 2))  # (batch, L, 2*inner)
        features, gate = xz.chunk(2, dim=-1)
        features = features.transpose(1, 2).reshape(batch, self.inner, *grid)
        features = features.contiguous(memory_format=torch.channels_last_3d)  # the depthwise conv's fast layout
        features = F.silu(self.local_conv(features)).flatten(2)  # (batch, inner, L)
        fused = []
        for chunk_tokens, family, scan, aggregate in zip(features.split(self.chunk, dim=1), CHUNK_FAMILIES,
                                                         self.scans, self.aggregations):
            paths = scan_paths(tuple(grid), family, x.device, lateral_orders=self.paths_per_chunk // 2)
            sequences = torch.stack([permute_tokens(chunk_tokens, perm, inverse) for perm, inverse in paths], dim=1)
            scanned = scan(sequences)
            back = torch.stack([permute_tokens(scanned[:, i], inverse, perm) for i, (perm, inverse) in enumerate(paths)],
                               dim=1)
            fused.append(aggregate(chunk_tokens, back.to(chunk_tokens.dtype)))
        y = self.out_norm(torch.cat(fused, dim=1).transpose(1, 2)) * F.silu(gate)
        return self.out_proj(y).transpose(1, 2).reshape(batch, -1, *grid)
