"""VEMamba reconstruction network: (batch, 1, d, H, W) low-res along axis d -> (batch, 1, d*factor, H, W)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .blocks import ResidualGroup
from .degradation_encoder import DegradationEncoder

MIN_FACTOR, MAX_FACTOR = 2, 10
#: The scan form of models saved before ``paths_per_chunk`` / ``aggregation`` were recorded.
LEGACY_SCAN_FORM = {"paths_per_chunk": 2, "aggregation": "input"}


@dataclass
class NetworkConfig:
    """Architecture hyper-parameters. The paper's configuration is ``groups=4, blocks=4, dim=32``.

    ``paths_per_chunk`` (4: the paper's ALCSSM, both lateral orders per chunk; 2: one) and
    ``aggregation`` (``restored``: the paper's DWAM; ``input``; ``sum``) choose the scan form of every
    volume Mamba module (see :mod:`vemamba_iso.model.volume_mamba`). Models saved before these existed
    used 2 paths and ``input`` weights; :meth:`from_dict` reads them so.

    ``sample_offset`` is the high-resolution position of low-resolution sample 0 (see
    :func:`vemamba_iso.degradation.sample_offset`); the network adds a linear interpolation of its input
    at these positions to its output, so it learns only the residual detail.

    ``keep_observed``: the low-resolution samples are exact slices of the high-resolution volume (the
    ``subsample`` degradation, every k-th section kept), so the network returns them unchanged and
    reconstructs only the slices between them (a hard data-consistency constraint; the residual is
    zeroed there, in training and inference alike). Off for blurred or averaged sections, whose samples
    are not slices of the target. Models saved before it existed read it from their degradation preset
    (:func:`vemamba_iso.training.load_model`).

    ``training_patch``: the (axial, lateral) input patch the network was trained on, in low-resolution
    voxels. Inference tiles default to it (:func:`vemamba_iso.inference.default_tiling`): the scans
    reconstruct best at the sequence lengths they were trained on.
    """

    factor: int = 4
    dim: int = 32
    groups: int = 4
    blocks: int = 4
    state_size: int = 8
    expand: float = 1.0
    ffn_ratio: float = 2.0
    representation_dim: int = 64
    use_degradation_encoder: bool = True
    sample_offset: float = 0.0
    paths_per_chunk: int = 4
    aggregation: str = "restored"
    keep_observed: bool = False
    training_patch: tuple | None = None

    def __post_init__(self):
        if not MIN_FACTOR <= int(self.factor) <= MAX_FACTOR:
            raise ValueError(f"factor must be in {MIN_FACTOR}..{MAX_FACTOR}, got {self.factor}")
        if self.keep_observed and float(self.sample_offset) != round(float(self.sample_offset)):
            raise ValueError(f"keep_observed needs samples on the high-resolution grid (an integer sample_offset), "
                             f"got sample_offset={self.sample_offset}: area-averaged sections are not kept slices")
        if self.training_patch is not None:
            self.training_patch = tuple(int(v) for v in self.training_patch)
            if len(self.training_patch) != 2 or min(self.training_patch) < 1:
                raise ValueError(f"training_patch is (axial, lateral) in voxels, got {self.training_patch}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        names = {f.name for f in fields(cls)}
        d = {**LEGACY_SCAN_FORM, **d} if "paths_per_chunk" not in d else d
        return cls(**{k: v for k, v in d.items() if k in names})


def axial_pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(batch, C*factor, D, H, W) -> (batch, C, D*factor, H, W): channels become axial sub-positions.

    Channel ``c * factor + j`` goes to axial position ``d * factor + j`` of output channel ``c``. A
    channels-last input gives a channels-last output (the layout the next convolution is fastest in on CPU).
    """
    b, cf, d, *lateral = x.shape
    c = cf // factor
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        last = x.movedim(1, -1).reshape(b, d, *lateral, c, factor)           # a view: channels are innermost
        last = last.permute(0, 1, 5, 2, 3, 4).reshape(b, d * factor, *lateral, c)
        return last.movedim(-1, 1)
    return x.view(b, c, factor, d, *lateral).permute(0, 1, 3, 2, *range(4, x.ndim + 1)) \
        .reshape(b, c, d * factor, *lateral)


def interpolate_axial_linear(x: torch.Tensor, factor: int, offset: float) -> torch.Tensor:
    """Linear interpolation along dim 2 to ``factor`` times its length, low-res sample ``j`` sitting at
    high-res coordinate ``j * factor + offset``; constant beyond the first and last samples."""
    n = x.shape[2]
    target = (torch.arange(n * factor, device=x.device, dtype=torch.float32) - offset) / factor
    target = target.clamp(0, n - 1)
    lo = target.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (target - lo).to(x.dtype).view(1, 1, -1, *([1] * (x.ndim - 3)))
    return x.index_select(2, lo) * (1 - w) + x.index_select(2, hi) * w


class VEMambaNetwork(nn.Module):
    """Shallow conv, residual volume-Mamba groups with a global residual, axial pixel-shuffle upsampling."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        c = config
        self.degradation_encoder = DegradationEncoder(c.representation_dim) if c.use_degradation_encoder else None
        rep = c.representation_dim if c.use_degradation_encoder else None
        self.shallow = nn.Conv3d(1, c.dim, 3, padding=1)
        self.groups = nn.ModuleList(
            ResidualGroup(c.dim, c.blocks, representation_dim=rep, state_size=c.state_size, expand=c.expand,
                          ffn_ratio=c.ffn_ratio, paths_per_chunk=c.paths_per_chunk, aggregation=c.aggregation)
            for _ in range(c.groups))
        self.body_conv = nn.Conv3d(c.dim, c.dim, 3, padding=1)
        self.upsample_conv = nn.Conv3d(c.dim, c.dim * c.factor, 3, padding=1)
        self.last_conv = nn.Conv3d(c.dim, 1, 3, padding=1)
        # Zero-initialised output: an untrained network returns the linear interpolation of its input.
        nn.init.zeros_(self.last_conv.weight)
        nn.init.zeros_(self.last_conv.bias)

    def reconstruction_parameters(self):
        """(name, parameter) pairs the reconstruction loss trains: all but the degradation encoder's, which MoCo
        trains first and which stays frozen after."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("degradation_encoder.")]

    def freeze_degradation_encoder(self) -> None:
        if self.degradation_encoder is not None:
            self.degradation_encoder.requires_grad_(False)
            self.degradation_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        # The encoder stays in eval mode once frozen (it is trained separately with MoCo).
        if self.degradation_encoder is not None and not any(
                p.requires_grad for p in self.degradation_encoder.parameters()):
            self.degradation_encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, 1, d, H, W), normalised intensities, axis 2 degraded by ``factor``."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected (batch, 1, d, H, W), got {tuple(x.shape)}")
        rep = self.degradation_encoder(x) if self.degradation_encoder is not None else None
        shallow = self.shallow(x).contiguous(memory_format=torch.channels_last_3d)
        y = shallow
        for group in self.groups:
            y = group(y, rep)
        y = self.body_conv(y) + shallow
        y = axial_pixel_shuffle(self.upsample_conv(y), self.config.factor)
        residual = self.last_conv(y)
        if self.config.keep_observed:
            residual = residual * observed_slice_mask(residual.shape[2], self.config.factor,
                                                      int(self.config.sample_offset), residual)
        return residual + interpolate_axial_linear(x, self.config.factor, self.config.sample_offset)


def observed_slice_mask(length: int, factor: int, offset: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, length, 1, 1) of ``like``'s dtype and device: 0 on the kept slices ``offset + j * factor``,
    1 between them."""
    mask = torch.ones(length, dtype=like.dtype, device=like.device)
    mask[offset::factor] = 0
    return mask.view(1, 1, length, *([1] * (like.ndim - 3)))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
