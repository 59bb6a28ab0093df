"""Plain sequential selective scan (S6): the ground truth the fast backends are tested against.

One time step after the other, exactly as the recurrence is written:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,          out_t = y_t * silu(z_t)

Slow (a Python loop over the length) but obviously right; autograd gives its gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import as_grouped, check_scan_inputs, compute_dtype


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False):
    """Sequential selective scan; same arguments and shapes as :func:`nnunet_logmamba.ssm.selective_scan`."""
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = compute_dtype(dtype_in)
    heads = shape.dim // shape.groups
    u_c = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # (batch, groups, state, length) -> (batch, dim, state, length): channel d reads group d // heads
    B_d = as_grouped(B).to(cdt).repeat_interleave(heads, dim=1)
    C_d = as_grouped(C).to(cdt).repeat_interleave(heads, dim=1)
    A_c = A.to(cdt)
    h = u_c.new_zeros(shape.batch, shape.dim, shape.state)
    ys = []
    # unbind, not indexing: indexing makes autograd build a full-size gradient per step (O(L^2))
    steps = zip(dt.unbind(-1), (dt * u_c).unbind(-1), B_d.unbind(-1), C_d.unbind(-1))
    for dt_t, dtu_t, B_t, C_t in steps:
        h = torch.exp(dt_t[:, :, None] * A_c) * h + dtu_t[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u_c.new_zeros(u_c.shape)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
