"""Fast pure-PyTorch selective scan (the ``torch`` backend), CPU and GPU.

Why not a log-space cumulative sum: ``exp(cumsum(delta * A))`` under- and overflows for long
sequences, and dividing by it loses all precision. Here the linear recurrence
``h_t = a_t * h_{t-1} + x_t`` (``a_t = exp(delta_t * A)`` in (0, 1]) is evaluated only with products of
decays, which stay in [0, 1]:

* the length is cut into segments (bounded memory: only one segment's (batch, dim, seg, state)
  tensors live at a time, and only each segment's start state is kept for backward);
* inside a segment, a two-level blocked scan: the segment is viewed as ``blocks x block_len``
  with the position inside a block as the leading axis, so each Python step updates all blocks at
  once on a contiguous slice. Pass 1 summarises each block (its end state from zero and its decay
  product), a short loop over blocks turns those into each block's start state, pass 2 writes the
  states. About 3 sweeps over the data and ~3*sqrt(seg) Python steps per segment.

Backward is written out by hand (a reverse scan of the same shape plus reductions) and recomputes
the segment's states from the saved start state, as the CUDA kernel does; it is tested against
:mod:`nnunet_logmamba.ssm.reference` for every input. Double backward is not supported.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import as_grouped, check_scan_inputs, compute_dtype
from .workspace import WORKSPACE

# elements of one (batch, dim, segment, state) tensor: ~32 MB in fp32, a handful live at once
_SEGMENT_ELEMENTS = 1 << 23
# below this many (batch*dim*state*length) elements, forward keeps decays and states for backward
# (two such tensors) instead of recomputing them segment by segment
_KEEP_ELEMENTS = 1 << 24


def _segment_length(length: int, per_position: int) -> int:
    seg = max(256, _SEGMENT_ELEMENTS // max(per_position, 1))
    return min(length, seg)


def _block_split(seg: int) -> tuple[int, int]:
    """(block_len, blocks) with block_len * blocks >= seg, both about sqrt(seg)."""
    block_len = max(1, int(math.ceil(math.sqrt(seg))))
    blocks = -(-seg // block_len)
    return block_len, blocks


def _to_blocked(x: torch.Tensor, block_len: int, blocks: int, pad_value: float) -> torch.Tensor:
    """(..., seg) -> (block_len, blocks, ...) contiguous, padded at the end with pad_value."""
    seg = x.shape[-1]
    pad = block_len * blocks - seg
    if pad:
        x = F.pad(x, (0, pad), value=pad_value)
    x = x.reshape(*x.shape[:-1], blocks, block_len)
    nd = x.dim()
    return x.permute(nd - 1, nd - 2, *range(nd - 2)).contiguous()


def _from_blocked(x: torch.Tensor, seg: int) -> torch.Tensor:
    """(block_len, blocks, ...) -> (..., seg)."""
    nd = x.dim()
    x = x.permute(*range(2, nd), 1, 0)
    return x.reshape(*x.shape[:-2], -1)[..., :seg]


def _scan_forward(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor, h0: torch.Tensor,
                  h: torch.Tensor, block_decay: torch.Tensor) -> torch.Tensor:
    """States of h_p = a_p * h_{p-1} + left_p * right_p along the flattened (block_len, blocks) positions.

    a: (block_len, blocks, *rest); left, right broadcast to it (the input x = left * right is never
    materialised: it is formed slice by slice while the slice is in cache); h0: (*rest);
    block_decay: (blocks, *rest), the product of ``a`` over each block.
    Position p = block * block_len + t. The states are written into ``h`` (shape of ``a``).
    """
    block_len, blocks = a.shape[:2]
    # pass 1: each block's end state from a zero start
    end = torch.mul(left[0], right[0])
    for t in range(1, block_len):
        end.mul_(a[t]).addcmul_(left[t], right[t])
    # start state of every block
    starts = torch.empty_like(end)
    s = h0
    for k in range(blocks):
        starts[k] = s
        s = torch.addcmul(end[k], block_decay[k], s)
    # pass 2: the states themselves
    torch.mul(a[0], starts, out=h[0]).addcmul_(left[0], right[0])
    for t in range(1, block_len):
        torch.mul(a[t], h[t - 1], out=h[t]).addcmul_(left[t], right[t])
    return h


def _scan_reverse(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor, g_in: torch.Tensor,
                  g: torch.Tensor, block_carry: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_scan_forward`: g_p = dh_p + a_{p+1} * g_{p+1}, dh = left * right,
    and g_last = dh_last + g_in (g_in: gradient arriving from beyond the segment, already multiplied
    by the next segment's first decay). Written into ``g``.

    block_carry: (blocks, *rest), the product of ``a`` over positions 1.. of each block, i.e. what
    carries g from a block's last position to its first.
    """
    block_len, blocks = a.shape[:2]
    last = block_len - 1
    # coefficient that carries g from the first position of block k+1 back to the last of block k
    link = torch.ones_like(a[0])
    link[:-1] = a[0, 1:]
    # pass 1: each block's first-position value from zero incoming
    first = torch.mul(left[last], right[last])
    for t in range(last - 1, -1, -1):
        first.mul_(a[t + 1]).addcmul_(left[t], right[t])
    carry = block_carry * link
    # value of g at the first position of block k+1 (g_in beyond the last block)
    nexts = torch.empty_like(first)
    s = g_in
    for k in range(blocks - 1, -1, -1):
        nexts[k] = s
        s = torch.addcmul(first[k], carry[k], s)
    # pass 2
    torch.mul(link, nexts, out=g[last]).addcmul_(left[last], right[last])
    for t in range(last - 1, -1, -1):
        torch.mul(a[t + 1], g[t + 1], out=g[t]).addcmul_(left[t], right[t])
    return g


class _Segment:
    """The blocked tensors of one segment, shared by forward and backward.

    Layout (block_len, blocks, batch, groups, heads, state): dim = groups * heads.
    """

    def __init__(self, u, dt, A6, B, C, heads, start, stop):
        seg = stop - start
        self.seg = seg
        self.block_len, self.blocks = _block_split(seg)
        bl, nb = self.block_len, self.blocks
        batch = u.shape[0]
        groups, state = B.shape[1], B.shape[2]
        self.shape6 = (bl, nb, batch, groups, heads, state)
        # small tensors first, so the big products below come out contiguous in the blocked layout
        self.dt = _to_blocked(dt[..., start:stop], bl, nb, 0.0).view(bl, nb, batch, groups, heads, 1)
        self.u = _to_blocked(u[..., start:stop], bl, nb, 0.0).view(self.dt.shape)
        self.B = _to_blocked(B[..., start:stop], bl, nb, 0.0).view(bl, nb, batch, groups, 1, state)
        self.C = _to_blocked(C[..., start:stop], bl, nb, 0.0).view(self.B.shape)
        self.dtu = self.dt * self.u
        self.a = None
        self.A6 = A6

    def big(self):
        """A scratch (bl, nb, b, g, h, n) tensor from the workspace."""
        return WORKSPACE.take(self.shape6, self.dt.dtype, self.dt.device)

    def block_decay(self, skip_first: bool = False):
        """Product of the decays over each block (over positions 1.. with ``skip_first``).

        exp(A * sum(dt)) over at most block_len steps: a bounded sum, never divided by, so it is as
        stable as multiplying the decays one by one, at a fraction of the cost.
        """
        dt = self.dt[1:] if skip_first else self.dt
        return torch.exp(dt.sum(0) * self.A6)

    def decay(self):
        if self.a is None:
            self.a = torch.mul(self.dt, self.A6, out=self.big()).exp_()  # (bl, nb, b, g, h, n)
        return self.a


def _output(h6, C6):
    """y = <C, h> per channel: (bl, nb, b, g, h, n) x (bl, nb, b, g, 1, n) -> (bl, nb, b, g, h, 1)."""
    return torch.matmul(h6, C6.transpose(-1, -2))


class _ChunkedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        # the scan is always fp32 (or fp64): never let an outer autocast region downcast it
        with torch.autocast(u.device.type, enabled=False):
            return _ChunkedSelectiveScan._forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, dout, dlast):
        with torch.autocast(dout.device.type, enabled=False):
            return _ChunkedSelectiveScan._backward(ctx, dout, dlast)

    @staticmethod
    def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
        cdt = compute_dtype(u.dtype)
        B4, C4 = as_grouped(B).to(cdt), as_grouped(C).to(cdt)
        groups, state = B4.shape[1], B4.shape[2]
        heads = u.shape[1] // groups
        pre = delta.to(cdt)
        if delta_bias is not None:
            pre = pre + delta_bias.to(cdt)[:, None]
        dt = F.softplus(pre) if delta_softplus else pre
        A6 = A.to(cdt).view(groups, heads, state)
        return cdt, u.to(cdt), pre, dt, A6, B4, C4, heads

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        cdt, u_c, pre, dt, A6, B4, C4, heads = _ChunkedSelectiveScan._prepare(
            u, delta, A, B, C, delta_bias, delta_softplus)
        state = A.shape[1]
        seg_len = _segment_length(length, batch * dim * state)
        keep = batch * dim * state * length <= _KEEP_ELEMENTS and any(ctx.needs_input_grad)
        y = u_c.new_empty(batch, dim, length)
        h0 = u_c.new_zeros(batch, B4.shape[1], heads, state)
        starts, kept = [], []
        for start in range(0, length, seg_len):
            s = _Segment(u_c, dt, A6, B4, C4, heads, start, min(start + seg_len, length))
            starts.append(h0)
            h = _scan_forward(s.decay(), s.dtu, s.B, h0, s.big(), s.block_decay())
            y[..., start:s.seg + start] = _from_blocked(_output(h, s.C).flatten(3), s.seg)
            last_t, last_k = (s.seg - 1) % s.block_len, (s.seg - 1) // s.block_len
            h0 = h[last_t, last_k].clone()   # h's memory goes back to the workspace
            if keep:
                kept.append((s, h))
            else:
                WORKSPACE.give(s.a, h)
        if D is not None:
            y.addcmul_(D.to(cdt)[:, None], u_c)
        out = y * F.silu(z.to(cdt)) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        # y before the gate is what dz needs; keeping it (batch*dim*length) spares a recompute
        ctx.starts, ctx.kept, ctx.y_full = starts, kept, (y if z is not None else None)
        ctx.options = (delta_softplus, seg_len)
        return out.to(u.dtype), h0.reshape(batch, dim, state)

    @staticmethod
    def _backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        delta_softplus, seg_len = ctx.options
        batch, dim, length = u.shape
        cdt, u_c, pre, dt, A6, B4, C4, heads = _ChunkedSelectiveScan._prepare(
            u, delta, A, B, C, delta_bias, delta_softplus)
        groups, state = B4.shape[1], B4.shape[2]
        dout = dout.to(cdt)
        if z is not None:
            zc = z.to(cdt)
            sig = torch.sigmoid(zc)
            dy = dout * zc * sig
        else:
            dy = dout
        d_dt = u_c.new_empty(batch, dim, length)
        du = u_c.new_empty(batch, dim, length)
        dA6 = torch.zeros_like(A6)
        dB = torch.empty_like(B4)
        dC = torch.empty_like(C4)
        g_in = (dlast.to(cdt) if dlast is not None else u_c.new_zeros(batch, dim, state))
        g_in = g_in.view(batch, groups, heads, state)
        seg_starts = list(range(0, length, seg_len))
        for i in range(len(seg_starts) - 1, -1, -1):
            start = seg_starts[i]
            h0 = ctx.starts[i]
            if ctx.kept:
                s, h = ctx.kept[i]
            else:
                s = _Segment(u_c, dt, A6, B4, C4, heads, start, min(start + seg_len, length))
                h = _scan_forward(s.decay(), s.dtu, s.B, h0, s.big(), s.block_decay())
            stop = start + s.seg
            a = s.a
            dy6 = _to_blocked(dy[..., start:stop], s.block_len, s.blocks, 0.0).view(s.dt.shape)
            g = _scan_reverse(a, dy6, s.C, g_in, s.big(), s.block_decay(skip_first=True))
            g_in = a[0, 0] * g[0, 0]
            dC[..., start:stop] = _from_blocked(torch.matmul(dy6.transpose(-1, -2), h).squeeze(-2), s.seg)
            d_dtu = torch.matmul(g, s.B.transpose(-1, -2))                       # (bl, nb, b, g, h, 1)
            dB[..., start:stop] = _from_blocked(torch.matmul(s.dtu.transpose(-1, -2), g).squeeze(-2), s.seg)
            # a = exp(dt*A)  ->  d(dt*A) = g * a * h_prev, formed in g's memory
            w = g.mul_(a)
            w[1:].mul_(h[:-1])
            w[0, 1:].mul_(h[-1, :-1])
            w[0, 0].mul_(h0)
            # contractions over the state and over positions, in place (no broadcast copies)
            scratch = torch.mul(w, A6, out=h)                                     # h is done
            d_dt6 = scratch.sum(-1, keepdim=True)
            dA6 += w.mul_(s.dt).sum((0, 1, 2))
            d_dt6.addcmul_(d_dtu, s.u)
            d_dt[..., start:stop] = _from_blocked(d_dt6.flatten(3), s.seg)
            du[..., start:stop] = _from_blocked((d_dtu * s.dt).flatten(3), s.seg)
            WORKSPACE.give(a, h, g)
            del g, w, h, a, scratch, s
        ctx.kept = None
        y_full, ctx.y_full = ctx.y_full, None
        dD = None
        if D is not None:
            du.addcmul_(D.to(cdt)[:, None], dy)
            dD = (dy * u_c).sum((0, 2)).to(D.dtype)
        dz = None
        if z is not None:
            dz = (dout * y_full * sig * (1 + zc * (1 - sig))).to(z.dtype)
        d_pre = d_dt * torch.sigmoid(pre) if delta_softplus else d_dt
        d_bias = d_pre.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        dB = dB.squeeze(1) if B.dim() == 3 else dB
        dC = dC.squeeze(1) if C.dim() == 3 else dC
        return (du.to(u.dtype), d_pre.to(delta.dtype), dA6.reshape(A.shape).to(A.dtype),
                dB.to(B.dtype), dC.to(C.dtype), dD, dz, d_bias, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False):
    """Chunked selective scan; same arguments and shapes as :func:`nnunet_logmamba.ssm.selective_scan`."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, last = _ChunkedSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, last) if return_last_state else out
