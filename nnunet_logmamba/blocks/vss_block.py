"""The LoG-VMamba block (VSS style), one implementation for 2D and 3D feature maps.

    x -> LayerNorm -> in_proj (x', gate z) -> token extractor(s) -> K-route selective scan (fp32)
      -> linear back to the inner width -> LayerNorm -> * SiLU(z) -> out_proj -> DropPath -> + x

Token modes:
    ``local``        LTX only (L-VMamba, and large maps in LoG-VMamba)
    ``global``       depthwise conv + GTX (G-VMamba, and the smallest maps in LoG-VMamba)
    ``local_global`` LTX + GTX sharing the squeezed features (LoG-VMamba's middle stages)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..ssm import selective_scan
from .layout import to_channels_first, to_channels_last
from .scan_routes import build_routes, check_directions, merge_routes
from .token_extractors import DepthwiseTokenExtractor, GlobalTokenExtractor, LocalTokenExtractor, unfold_neighbourhood
from .token_join import JOIN_ORDERS

TOKEN_MODES = ("local", "global", "local_global")
#: Paper defaults of the LTX channel squeeze per number of spatial axes.
DEFAULT_SQUEEZE = {1: 8, 2: 8, 3: 16}


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor ``(batch, 1, ...)``: 0 for a dropped sample, ``1 / (1 - p)`` otherwise; None
        when nothing is dropped (eval mode or ``p == 0``). Draws from the global generator."""
        if not self.training or self.p == 0.0:
            return None
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return keep / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.sample_scale(x)
        return x if scale is None else x * scale


class _ResidualInChunks(torch.autograd.Function):
    """``x + scale * branch(x)`` over chunks of whole samples, keeping none of the branch's activations.

    ``branch`` maps a channels-first chunk to its output stored channels last, ``(batch, *spatial, C)``.
    Forward runs the branch without autograd, one chunk at a time, and writes each chunk's sum straight
    into the output (no concatenation, no separate residual pass over the whole map). Backward runs each
    chunk's branch again under the forward's autocast state and differentiates it at once, writing the
    input gradient chunk by chunk and summing the parameter gradients; the output gradient is brought
    into the branch's layout instead of recomputing the output's transposed copy. The branch must be a
    function of its input and ``params`` only, and draw no random numbers.
    """

    @staticmethod
    def forward(ctx, x, scale, branch, per_chunk, *params):
        ctx.branch, ctx.per_chunk = branch, per_chunk
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, scale, *params)
        out = None
        for start in range(0, x.shape[0], per_chunk):
            chunk = x[start:start + per_chunk]
            y = to_channels_first(branch(chunk))
            if scale is not None:
                y = y * scale[start:start + per_chunk]  # promoted as the plain path's drop path promotes it
            if out is None:  # the dtype the sum promotes to (a bf16 branch under autocast, an fp32 map)
                out = torch.empty(x.shape, dtype=torch.result_type(chunk, y), device=x.device)
            torch.add(chunk, y, out=out[start:start + per_chunk])
        return out

    @staticmethod
    @once_differentiable  # the recomputed branch is differentiated inside: no double backward
    def backward(ctx, grad_out):
        x, scale, *params = ctx.saved_tensors
        trainable = [i for i, p in enumerate(params) if ctx.needs_input_grad[4 + i]]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_params = [None] * len(params)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        for start in range(0, x.shape[0], ctx.per_chunk):
            chunk = x[start:start + ctx.per_chunk].detach().requires_grad_(grad_x is not None)
            grad = grad_out[start:start + ctx.per_chunk]
            if scale is not None:
                grad = grad * scale[start:start + ctx.per_chunk]
            grad = to_channels_last(grad)  # the branch's output layout: its transpose is not recomputed
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                y = ctx.branch(chunk)
            wrt = ([chunk] if grad_x is not None else []) + [params[i] for i in trainable]
            grads = list(torch.autograd.grad(y, wrt, grad.to(y.dtype), allow_unused=True))
            if grad_x is not None:
                torch.add(grad_out[start:start + ctx.per_chunk], grads.pop(0), out=grad_x[start:start + ctx.per_chunk])
            for i, g in zip(trainable, grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        return (grad_x, None, None, None, *grad_params)


class LoGVSSBlock(nn.Module):
    """A residual VSS block with LoG-VMamba token extractors.

    Args:
        channels: feature channels ``C`` of the map (input = output).
        spatial_size: spatial size of the maps the block will see (patch size / cumulative
            strides); needed by the GTX, checked for the other modes too.
        mode: ``local``, ``global`` or ``local_global`` (see module doc).
        expand: inner width = ``expand * C``.
        state_size: SSM state size ``N``.
        squeeze: LTX channel squeeze (default: 8 in 2D, 16 in 3D).
        kernel_size: LTX neighbourhood / depthwise kernel edge.
        num_global_tokens: global tokens ``G`` from the GTX.
        join: ``head``, ``middle``, ``split`` or ``interleaved``.
        directions: scan directions ``K`` (1, 2 or 4).
        drop_path: stochastic depth probability of the residual branch.
        global_max_edge: GTX compressed edge per axis.
        scan_backend: passed to :func:`nnunet_logmamba.ssm.selective_scan`.
        zero_init_residual: start ``out_proj`` at zero so that a new block is the identity (see below).
        recompute_tokens: when set, training keeps none of the residual branch's intermediate maps:
            the branch runs on chunks of whole samples, as many as hold at most this many positions
            but at least one, and each chunk is recomputed during backward (activation
            checkpointing). Outputs and gradients are those of the plain forward up to rounding (matrix
            products over fewer samples at once, parameter gradients summed per chunk); it trades one
            more forward of the branch for memory, for blocks on maps too large to keep their
            activations. The branch draws no random numbers (DropPath acts outside it), so the RNG
            state is not saved.

    A block inserted into a trained or freshly initialised network should not disturb the features
    its neighbours learn under: with ``zero_init_residual`` (the default) the residual branch adds
    exactly zero at step 0, so a network with blocks starts as the plain network of the same weights
    (as ResEnc U-Nets zero the last norm before each residual add). ``out_proj`` itself gets a
    gradient at once; everything before it does from the first optimiser step on.

    ``forward``: ``(batch, C, *spatial_size)`` -> same shape.
    """

    def __init__(self, channels: int, spatial_size: Sequence[int], mode: str = "local_global",
                 expand: float = 1.0, state_size: int = 16, squeeze: int | None = None,
                 kernel_size: int = 3, num_global_tokens: int = 4, join: str = "interleaved",
                 directions: int = 1, drop_path: float = 0.0, global_max_edge: int = 4,
                 scan_backend: str = "auto", zero_init_residual: bool = True,
                 recompute_tokens: int | None = None):
        super().__init__()
        if recompute_tokens is not None and recompute_tokens < 1:
            raise ValueError(f"recompute_tokens must be None or >= 1, got {recompute_tokens}")
        if mode not in TOKEN_MODES:
            raise ValueError(f"unknown token mode {mode!r}; choose one of {TOKEN_MODES}")
        if join not in JOIN_ORDERS:
            raise ValueError(f"unknown join order {join!r}; choose one of {JOIN_ORDERS}")
        check_directions(directions)
        if channels < 1 or state_size < 1 or expand <= 0:
            raise ValueError(f"channels, state_size and expand must be positive, got {channels}, "
                             f"{state_size}, {expand}")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.ndim = len(self.spatial_size)
        if self.ndim not in (1, 2, 3):
            raise ValueError(f"spatial_size must have 1, 2 or 3 axes, got {self.spatial_size}")
        self.mode, self.join, self.directions, self.scan_backend = mode, join, directions, scan_backend
        self.recompute_tokens = recompute_tokens
        inner = max(1, int(round(expand * channels)))
        squeeze = DEFAULT_SQUEEZE[self.ndim] if squeeze is None else squeeze

        self.norm = nn.LayerNorm(channels)
        self.in_proj = nn.Linear(channels, 2 * inner, bias=False)
        if mode == "global":
            self.local_tokens = DepthwiseTokenExtractor(inner, self.ndim, kernel_size)
            token_channels, gtx_in = inner, inner
        else:
            self.local_tokens = LocalTokenExtractor(inner, self.ndim, squeeze, kernel_size)
            token_channels, gtx_in = self.local_tokens.out_channels, self.local_tokens.squeezed_channels
        self.global_tokens = (GlobalTokenExtractor(gtx_in, self.spatial_size, num_global_tokens, token_channels,
                                                   kernel_size, global_max_edge)
                              if mode != "local" else None)
        self.token_channels = token_channels
        self._init_ssm(token_channels, state_size, directions)
        self.back_proj = nn.Linear(token_channels, inner) if token_channels != inner else nn.Identity()
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, channels, bias=False)
        if zero_init_residual:
            nn.init.zeros_(self.out_proj.weight)
        self.drop_path = DropPath(drop_path)

    def _init_ssm(self, dim: int, state: int, directions: int) -> None:
        # Mamba's parameterisation, one set per scan direction (as VMamba's SS2D).
        self.dt_rank = math.ceil(dim / 16)
        self.state_size = state
        bound = dim ** -0.5
        self.x_proj_weight = nn.Parameter(torch.empty(directions, self.dt_rank + 2 * state, dim).uniform_(-bound, bound))
        dt_bound = self.dt_rank ** -0.5
        self.dt_proj_weight = nn.Parameter(torch.empty(directions, dim, self.dt_rank).uniform_(-dt_bound, dt_bound))
        dt = torch.exp(torch.rand(directions, dim) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, state + 1, dtype=torch.float32).repeat(directions * dim, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(directions * dim))

    #: Parameters that Mamba keeps out of weight decay (its ``_no_weight_decay`` marks): decaying them
    #: pulls the state decay rates, the skip and the step size towards zero, not towards a prior.
    no_weight_decay = ("A_log", "D", "dt_bias")

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "global":
            local = self.local_tokens(x)
            return local, self.global_tokens(local)
        squeezed = self.local_tokens.squeezed(x)
        local = unfold_neighbourhood(squeezed, self.local_tokens.kernel_size)
        return local, (self.global_tokens(squeezed) if self.global_tokens is not None else None)

    def _scan(self, sequences: torch.Tensor) -> torch.Tensor:
        """``(batch, K, dim, length)`` -> same, the K routes scanned with their own parameters, fp32.

        Works in the layout :func:`.scan_routes.build_routes` stores routes in, ``(batch, length, K, dim)``:
        the projections are then matrix products over all positions at once, and the scan reads the
        tokens and writes its output there without transposed copies (other layouts are copied once).
        """
        batch, directions, dim, length = sequences.shape
        with torch.autocast(device_type=sequences.device.type, enabled=False):
            xs = sequences.float().permute(0, 3, 1, 2)  # (batch, length, K, dim)
            projected = torch.einsum("blkd,kcd->blkc", xs, self.x_proj_weight.float())
            dts, b, c = projected.split([self.dt_rank, self.state_size, self.state_size], dim=-1)
            dts = torch.einsum("blkr,kdr->blkd", dts, self.dt_proj_weight.float())
            y = selective_scan(xs.reshape(batch, length, directions * dim).transpose(1, 2),
                               dts.reshape(batch, length, directions * dim).transpose(1, 2),
                               -torch.exp(self.A_log.float()), b.permute(0, 2, 3, 1), c.permute(0, 2, 3, 1),
                               D=self.D.float(), delta_bias=self.dt_bias.float().flatten(),
                               delta_softplus=True, backend=self.scan_backend)
        return y.transpose(1, 2).reshape(batch, length, directions, dim).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(f"{type(self).__name__} was built for maps of spatial size {self.spatial_size} "
                             f"(batch, {self.norm.normalized_shape[0]}, ...), got {tuple(x.shape)}")
        if self.recompute_tokens is None or not (torch.is_grad_enabled() and self.training):
            return x + self.drop_path(self._branch(x))
        per_chunk = max(1, self.recompute_tokens // math.prod(self.spatial_size))
        return _ResidualInChunks.apply(x, self.drop_path.sample_scale(x), self._branch_channels_last, per_chunk,
                                       *self.parameters())

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch, ``(batch, C, *spatial)`` -> same; every operation in it is per sample."""
        return to_channels_first(self._branch_channels_last(x))

    def _branch_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch, ``(batch, C, *spatial)`` -> ``(batch, *spatial, C)``."""
        h = self.in_proj(self.norm(to_channels_last(x)))
        inner, gate = h.chunk(2, dim=-1)
        local, glob = self._tokens(inner.movedim(-1, 1))
        num_global = 0 if glob is None else glob.shape[-1]
        sequences = build_routes(local, glob, self.directions, self.join)
        y = merge_routes(self._scan(sequences), self.spatial_size, num_global, self.join)
        y = y.to(x.dtype) if not torch.is_autocast_enabled() else y
        y = y.transpose(1, 2).reshape(*inner.shape[:-1], self.token_channels)
        y = self.out_norm(self.back_proj(y)) * torch.nn.functional.silu(gate)
        return self.out_proj(y)
