"""Selective scan as Triton kernels (the ``triton`` backend): a fused GPU scan that needs no compiler.

PyTorch's CUDA wheels bring Triton, so this backend works right after ``pip install``, where the
``mamba-ssm`` kernel needs nvcc matching torch. The algorithm is mamba-ssm's: one program per
(batch, group, block of channels) walks the sequence once, the state ``(BLOCK_D, state)`` in registers,
in fp32 whatever the input dtype.

* Forward writes ``out`` and, every ``CHUNK`` steps, the state at the start of that chunk (the only
  state that reaches global memory; ``state / CHUNK`` of a full state tensor) and the last state.
* Backward walks the chunks from the last to the first: it recomputes a chunk's states from its saved
  start state into a per-program scratch of ``CHUNK + 1`` states (reused chunk after chunk, so it stays
  in cache), then runs the adjoint recurrence backwards through the chunk. Reductions over channels
  (``dB``, ``dC``) are written per channel block and summed in torch, the ones over the batch (``dA``,
  ``dD``, ``d delta_bias``) per batch element: deterministic, no atomics.

Semantics, shapes and dtypes are those of :func:`nnunet_logmamba.ssm.selective_scan` (grouped and
ungrouped ``B``/``C``, ``D``, ``z`` gating, ``delta_bias``, softplus, ``return_last_state`` with its
gradient); fp64 is not supported here (the ``torch`` backend has it). On CPU tensors it runs only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before ``import triton``): that is how the tests check
it against the ``reference`` backend on machines without a GPU.
"""
from __future__ import annotations

import os

import torch

from ._checks import as_grouped, check_scan_inputs

#: steps between saved states (forward) = steps recomputed per chunk (backward)
CHUNK = 64

try:  # triton ships with torch's CUDA wheels; without it this backend reports why
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the installation
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def triton_status() -> tuple[bool, str]:
    """(importable, reason) for the Triton backend."""
    if triton is None:
        return False, f"triton does not import ({_IMPORT_ERROR}); it comes with torch's CUDA wheels"
    return True, f"triton {triton.__version__}" + (" (interpreter)" if interpreter_active() else "")


def triton_supports(u: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``u``'s device and dtype here."""
    if triton is None or u.dtype == torch.float64:
        return False
    return u.is_cuda or (u.device.type == "cpu" and interpreter_active())


if triton is not None:
    @triton.jit
    def _scan_forward_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr,
                             out_ptr, states_ptr, last_ptr,
                             dim, length, groups, heads, state, n_chunks,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                             SOFTPLUS: tl.constexpr, CHUNK_LEN: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_b, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_h = pid_h * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_h < heads
        d = pid_g * heads + offs_h
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + d[:, None] * state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            d_skip = tl.load(d_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        row = (pid_b * dim + d) * length
        bc = (pid_b * groups + pid_g) * state * length + offs_n * length
        saved = ((pid_b * dim + d) * n_chunks)[:, None] * state + offs_n[None, :]
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        for t in range(0, length):
            if t % CHUNK_LEN == 0:
                tl.store(states_ptr + saved + (t // CHUNK_LEN) * state, h, mask=mask_dn)
            u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            b_t = tl.load(b_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            c_t = tl.load(c_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t[None, :]
            y = tl.sum(h * c_t[None, :], axis=1)
            if HAS_D:
                y = y + d_skip * u_t
            if HAS_Z:
                z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z_t * tl.sigmoid(z_t)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        tl.store(last_ptr + ((pid_b * dim + d) * state)[:, None] + offs_n[None, :], h, mask=mask_dn)

    @triton.jit
    def _scan_backward_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr,
                              dout_ptr, states_ptr, dlast_ptr, scratch_ptr,
                              du_ptr, ddelta_ptr, dz_ptr, da_part_ptr, db_part_ptr, dc_part_ptr,
                              dd_part_ptr, dbias_part_ptr,
                              dim, length, groups, heads, state, n_chunks, n_blocks,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, CHUNK_LEN: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_b, pid_g, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_h = pid_h * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_h < heads
        d = pid_g * heads + offs_h
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + d[:, None] * state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        if HAS_D:
            d_skip = tl.load(d_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        row = (pid_b * dim + d) * length
        bc = (pid_b * groups + pid_g) * state * length + offs_n * length
        # partial sums over this program's channels: (batch, groups, n_blocks, state, length)
        part = ((pid_b * groups + pid_g) * n_blocks + pid_h) * state * length + offs_n * length
        dn = ((pid_b * dim + d) * state)[:, None] + offs_n[None, :]
        saved = ((pid_b * dim + d) * n_chunks)[:, None] * state + offs_n[None, :]
        scratch = ((pid_b * dim + d) * (CHUNK_LEN + 1))[:, None] * state + offs_n[None, :]
        if HAS_DLAST:
            carry = tl.load(dlast_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        da_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dd_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for cc in range(0, n_chunks):
            chunk = n_chunks - 1 - cc
            start = chunk * CHUNK_LEN
            # slot 0: the state before the chunk; slot i + 1: the state after step start + i
            h = tl.load(states_ptr + saved + chunk * state, mask=mask_dn, other=0.0)
            tl.store(scratch_ptr + scratch, h, mask=mask_dn)
            for i in range(0, CHUNK_LEN):
                t = start + i
                if t < length:
                    u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                    dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        dt = dt + bias
                    if SOFTPLUS:
                        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
                    b_t = tl.load(b_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
                    h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t[None, :]
                    tl.store(scratch_ptr + scratch + (i + 1) * state, h, mask=mask_dn)
            for j in range(0, CHUNK_LEN):
                i = CHUNK_LEN - 1 - j
                t = start + i
                if t < length:
                    h_t = tl.load(scratch_ptr + scratch + (i + 1) * state, mask=mask_dn, other=0.0)
                    h_prev = tl.load(scratch_ptr + scratch + i * state, mask=mask_dn, other=0.0)
                    u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                    pre = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        pre = pre + bias
                    dt = pre
                    if SOFTPLUS:
                        dt = tl.where(pre <= 20.0, tl.log(1.0 + tl.exp(pre)), pre)
                    b_t = tl.load(b_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
                    c_t = tl.load(c_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
                    g_out = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                    if HAS_Z:
                        z_t = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                        sig = tl.sigmoid(z_t)
                        y = tl.sum(h_t * c_t[None, :], axis=1)
                        if HAS_D:
                            y = y + d_skip * u_t
                        tl.store(dz_ptr + row + t, g_out * y * sig * (1.0 + z_t * (1.0 - sig)), mask=mask_d)
                        g_y = g_out * z_t * sig
                    else:
                        g_y = g_out
                    decay = tl.exp(dt[:, None] * a)
                    g_h = g_y[:, None] * c_t[None, :] + carry       # dL/dh_t
                    tl.store(dc_part_ptr + part + t, tl.sum(g_y[:, None] * h_t, axis=0), mask=mask_n)
                    tl.store(db_part_ptr + part + t, tl.sum(g_h * (dt * u_t)[:, None], axis=0), mask=mask_n)
                    g_u = tl.sum(g_h * b_t[None, :], axis=1) * dt
                    g_decay = g_h * h_prev * decay                  # dL/d(dt * A)
                    g_dt = tl.sum(g_h * b_t[None, :], axis=1) * u_t + tl.sum(g_decay * a, axis=1)
                    da_acc += g_decay * dt[:, None]
                    if HAS_D:
                        g_u += g_y * d_skip
                        dd_acc += g_y * u_t
                    if SOFTPLUS:
                        g_dt = g_dt * tl.sigmoid(pre)
                    dbias_acc += g_dt
                    tl.store(du_ptr + row + t, g_u, mask=mask_d)
                    tl.store(ddelta_ptr + row + t, g_dt, mask=mask_d)
                    carry = g_h * decay
        tl.store(da_part_ptr + dn, da_acc, mask=mask_dn)
        tl.store(dd_part_ptr + pid_b * dim + d, dd_acc, mask=mask_d)
        tl.store(dbias_part_ptr + pid_b * dim + d, dbias_acc, mask=mask_d)


def _launch_shape(dim: int, groups: int, state: int) -> tuple[int, int, int]:
    heads = dim // groups
    block_d = min(32, triton.next_power_of_2(heads))
    block_n = triton.next_power_of_2(state)
    return heads, block_d, block_n


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        B4, C4 = as_grouped(B).contiguous(), as_grouped(C).contiguous()
        groups, state = B4.shape[1], B4.shape[2]
        heads, block_d, block_n = _launch_shape(dim, groups, state)
        n_blocks = triton.cdiv(heads, block_d)
        n_chunks = triton.cdiv(length, CHUNK)
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        A32 = A.float().contiguous()
        D32 = D.float().contiguous() if D is not None else None
        bias32 = delta_bias.float().contiguous() if delta_bias is not None else None
        out = torch.empty_like(u)
        states = u.new_empty(batch, dim, n_chunks, state, dtype=torch.float32)
        last = u.new_empty(batch, dim, state, dtype=torch.float32)
        dummy = A32  # never read: the HAS_* flags switch its loads off
        _scan_forward_kernel[(batch, groups, n_blocks)](
            u, delta, A32, B4, C4, D32 if D32 is not None else dummy, z if z is not None else dummy,
            bias32 if bias32 is not None else dummy, out, states, last,
            dim, length, groups, heads, state, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), CHUNK_LEN=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(u, delta, A32, B4, C4, D32, z, bias32, states)
        ctx.meta = (B.dim(), A.dtype, B.dtype, C.dtype, None if D is None else D.dtype,
                    None if delta_bias is None else delta_bias.dtype, bool(delta_softplus))
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A32, B4, C4, D32, z, bias32, states = ctx.saved_tensors
        b_ndim, a_dtype, b_dtype, c_dtype, d_dtype, bias_dtype, softplus = ctx.meta
        batch, dim, length = u.shape
        groups, state = B4.shape[1], B4.shape[2]
        heads, block_d, block_n = _launch_shape(dim, groups, state)
        n_blocks = triton.cdiv(heads, block_d)
        n_chunks = states.shape[2]
        dout = dout.contiguous()
        f32 = dict(dtype=torch.float32, device=u.device)
        du = torch.empty(batch, dim, length, **f32)
        ddelta = torch.empty(batch, dim, length, **f32)
        dz = torch.empty(batch, dim, length, **f32) if z is not None else None
        da_part = torch.empty(batch, dim, state, **f32)
        db_part = torch.empty(batch, groups, n_blocks, state, length, **f32)
        dc_part = torch.empty(batch, groups, n_blocks, state, length, **f32)
        dd_part = torch.empty(batch, dim, **f32)
        dbias_part = torch.empty(batch, dim, **f32)
        scratch = torch.empty(batch, dim, CHUNK + 1, state, **f32)
        dummy = A32
        _scan_backward_kernel[(batch, groups, n_blocks)](
            u, delta, A32, B4, C4, D32 if D32 is not None else dummy, z if z is not None else dummy,
            bias32 if bias32 is not None else dummy, dout, states,
            dlast.contiguous() if dlast is not None else dummy, scratch,
            du, ddelta, dz if dz is not None else dummy, da_part, db_part, dc_part, dd_part, dbias_part,
            dim, length, groups, heads, state, n_chunks, n_blocks,
            HAS_D=D32 is not None, HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=softplus,
            HAS_DLAST=dlast is not None, CHUNK_LEN=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        dB, dC = db_part.sum(2), dc_part.sum(2)
        if b_ndim == 3:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        return (du.to(u.dtype), ddelta.to(delta.dtype), da_part.sum(0).to(a_dtype), dB.to(b_dtype),
                dC.to(c_dtype), None if D32 is None else dd_part.sum(0).to(d_dtype),
                None if z is None else dz.to(z.dtype),
                None if bias32 is None else dbias_part.sum(0).to(bias_dtype), None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Triton selective scan; same arguments and shapes as :func:`nnunet_logmamba.ssm.selective_scan`.

    Raises:
        RuntimeError: triton does not import, or the tensors are not on a CUDA device (CPU tensors
            only in Triton's interpreter), or they are fp64.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    ok, reason = triton_status()
    if not ok:
        raise RuntimeError(f"the triton selective-scan backend is unavailable: {reason}; use backend='torch'")
    if u.dtype == torch.float64:
        raise RuntimeError("the triton backend computes in fp32 and takes fp16/bf16/fp32 inputs; "
                           "use backend='torch' for fp64")
    if not triton_supports(u):
        raise RuntimeError(f"the triton backend runs on CUDA tensors (got {u.device}); on a CPU use "
                           "backend='torch' (TRITON_INTERPRET=1 runs it in Triton's interpreter, for tests)")
    if u.shape[-1] == 0:
        raise ValueError("the triton backend needs a sequence length of at least 1")
    out, last = _TritonSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, last) if return_last_state else out
