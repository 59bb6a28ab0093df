"""Selective scan as Triton kernels (the ``triton`` backend): a fused GPU scan that needs no compiler.

PyTorch's CUDA wheels bring Triton, so this backend works right after ``pip install``, where the
``mamba-ssm`` kernel needs nvcc matching torch.

The recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` is a first-order linear one, so it is
computed as an associative scan over pairs ``(decay, input)`` and split into chunks of ``CHUNK``
steps that run in parallel (a GPU has far more cores than a (batch, channel) grid fills):

* forward: (1) every chunk writes its summary, the map ``h -> decay h + value`` of its steps: ``decay =
  exp(A sum dt)``, and ``value``, its end state from a zero start, is a sum of its inputs, each decayed by
  ``exp(A x)`` with ``x`` the dt of the steps after it: a cumsum of dt and a sum over the chunk instead of a
  scan of (channels, state, steps) pairs (with ``A < 0`` and ``dt >= 0``, as softplus makes it, every exponent is
  ``<= 0``);
  (2) one short scan over the chunk summaries gives each chunk's start state (and the last state);
  (3) every chunk scans its steps from its start state and writes ``out``. The state lives in registers;
  only the per-chunk start states reach global memory (``state / CHUNK`` of a full state tensor) and
  are kept for backward.
* backward: the adjoint ``lambda_t = exp(dt_{t+1} A) lambda_{t+1} + C_t dy_t`` is the same kind of
  recurrence run backwards; it is scanned from each chunk's end (``reverse=True``), with the same
  three stages (chunk summaries, summed the same way as the forward's; carries between chunks; then per
  chunk the states recomputed from the saved start state and every gradient). Reductions over channels
  (``dB``, ``dC``) are summed per channel block in registers and over blocks in torch, the ones over batch
  and time (``dA``, ``dD``, ``d delta_bias``) per chunk in torch: deterministic, no atomics.

That is the ``parallel`` layout (``LAYOUT``, the default). The ``sequential`` layout runs the same per-chunk
code in one program per (batch x group, channel block) that walks its chunks in order, the state (forward)
or adjoint state (backward) carried in registers from chunk to chunk, as mamba-ssm's kernel does: one launch
each way and no chunk summaries, but only as many programs as channel blocks (it narrows the blocks, down
to one channel, to fill the GPU); its loop over chunks is software-pipelined, the next chunk's loads in flight
while this one is computed. Its ``dB``/``dC`` partial sums are per channel block like the parallel
layout's, so at one channel per program they take ``state`` times the memory of ``u`` (2 x 134 MB at batch 2, 64
channels, state 16, 16k steps; the parallel layout's 4-channel blocks a quarter of that). Both layouts pass the
interpreter tests; the sequential one has not run on a GPU yet, and which is faster where is to be measured there.

Semantics, shapes and dtypes are those of :func:`nnunet_logmamba.ssm.selective_scan` (grouped and
ungrouped ``B``/``C``, ``D``, ``z`` gating, ``delta_bias``, softplus, ``return_last_state`` with its
gradient; fp32 state and accumulation, output in ``u``'s dtype); fp64 is not supported here (the
``torch`` backend has it). On CPU tensors it runs only in Triton's interpreter (``TRITON_INTERPRET=1``
set before ``import triton``): that is how the tests check it against the ``reference`` backend on
machines without a GPU.
"""
from __future__ import annotations

import math
import os

import torch

from ._checks import as_grouped, check_scan_inputs

#: time steps per chunk (a power of two); chunks are scanned in parallel
CHUNK = 64
#: chunk summaries scanned per iteration of the between-chunk stage (a power of two)
CARRY_BLOCK = 128
#: register tile budget (channels x state x steps) of one program
TILE = 4096
#: warps per program (None: 4 up to 2048 tile elements, else 8)
WARPS = None
#: registers per thread the parallel layout's backward gradient kernel may use (ptxas ``maxnreg``; None: the
#: compiler's choice). Its states and adjoint states both live in registers: 151 per thread at the default
#: sizes on sm_90, so one 8-warp program per multiprocessor; 128 fits two, at 24 bytes of spill per thread (none
#: with 16-step chunks; ``benchmarks/results/triton_resources.md``). Not yet timed on a GPU.
GRADIENT_REGISTERS = None
#: "parallel": every chunk its own program, chunks joined by a scan over their summaries (three launches
#: each way); "sequential": one program per channel block walks its chunks in order with the state in
#: registers (one launch each way, as mamba-ssm's kernel does). Not yet timed on a GPU against each other.
LAYOUT = "parallel"
#: upper bound of the chunk length of the sequential layout (the register tile ``TILE`` also bounds it)
SEQUENTIAL_CHUNK = 256
#: CUDA's limit on the second and third grid dimensions: the parallel layout puts its chunks on the third,
#: so a sequence of more chunks than this (over 4M steps at 64 per chunk) runs in the sequential layout
#: (within ``MAX_INDEX`` elements per tensor: at that length, fewer than 512 batch x channels)
MAX_GRID_CHUNKS = 65535
#: the sequential layout narrows its channel blocks (down to one channel) until this many programs run:
#: about four per multiprocessor of a large GPU (132 on an H100/H200), so that one program's memory
#: latency hides behind the others'
SEQUENTIAL_PROGRAMS = 512

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


#: the kernels index their tensors with 32-bit offsets
MAX_INDEX = 2 ** 31 - 1


def largest_index(batch: int, dim: int, groups: int, state: int, length: int, launch: dict | None = None) -> int:
    """The number of elements of the largest tensor the kernels index for this problem (inputs, B/C, the
    chunk-boundary states kept for backward); must stay within ``MAX_INDEX``. ``launch``: the problem's
    ``_launch_shape`` where the caller has it."""
    s = launch or _launch_shape(batch, dim, groups, state, length, LAYOUT)
    return max(batch * dim * length, batch * groups * state * length, batch * dim * s["n_chunks"] * state)


def triton_supports(u: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``u``'s device and dtype here."""
    if triton is None or u.dtype == torch.float64:
        return False
    return u.is_cuda or (u.device.type == "cpu" and interpreter_active())


if triton is not None:
    @triton.jit
    def _linear_combine(a_left, b_left, a_right, b_right):
        # (a, b) is the map h -> a h + b; applying left then right composes to (a_r a_l, a_r b_l + b_r)
        return a_right * a_left, a_right * b_left + b_right

    @triton.jit
    def _softplus(x):
        # torch's softplus with its default threshold: linear above 20
        return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)

    @triton.jit
    def _first_along_time(x, T: tl.constexpr):
        # x[..., 0] of a (channels, state, T) tile
        is_first = tl.arange(0, T) == 0
        return tl.sum(tl.where(is_first[None, None, :], x, 0.0), axis=2)

    @triton.jit
    def _last_along_time(x, T: tl.constexpr):
        # x[..., T - 1] of a (channels, state, T) tile
        is_last = tl.arange(0, T) == T - 1
        return tl.sum(tl.where(is_last[None, None, :], x, 0.0), axis=2)

    @triton.jit
    def _block_offsets(pid_bg, pid_h, dim, length, groups, heads, state,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        # A (batch x group, channel block)'s offsets: channels (BLOCK_D,), states (BLOCK_N,), the rows of
        # u/delta/z and of B/C. ALIGN (gcd(length, 16)) divides the length: Triton itself marks only a length
        # divisible by 16, the hint replaces what it infers (hence up to 16, not 4: 16-byte loads of bf16), and the
        # rows' alignment decides whether B and C load 4 steps per thread (see _per_channel).
        batch, grp = pid_bg // groups, pid_bg % groups
        offs_h = pid_h * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_h < heads
        chans = grp * heads + offs_h
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < state
        rows = tl.multiple_of((batch * dim + chans) * length, ALIGN)
        bc_rows = tl.multiple_of((pid_bg * state + offs_n) * length, ALIGN)
        return batch, chans, mask_d, offs_n, mask_n, rows, bc_rows

    @triton.jit
    def _chunk_steps(pid_c, batch, chans, offs_n, dim, state, n_chunks, T: tl.constexpr):
        # chunk pid_c's time steps (T,) and where its (channel, state) start state / summaries sit
        t = pid_c * T + tl.arange(0, T)
        summary = ((batch * dim + chans) * n_chunks + pid_c)[:, None] * state + offs_n[None, :]
        return t, summary

    @triton.jit
    def _chunk_program(dim, length, groups, heads, state, n_chunks,
                       T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        # parallel layout: this program's (batch x group, channel block, chunk) and its offsets
        pid_bg, pid_h, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        batch, chans, mask_d, offs_n, mask_n, rows, bc_rows = _block_offsets(
            pid_bg, pid_h, dim, length, groups, heads, state, BLOCK_D, BLOCK_N, ALIGN)
        t, summary = _chunk_steps(pid_c, batch, chans, offs_n, dim, state, n_chunks, T)
        return pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, summary

    @triton.jit
    def _step_dt(delta_ptr, bias_ptr, rows, chans, t, mask_d, length,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # dt at steps t (channels, T): delta (+ delta_bias) (through softplus); 0 past the end
        valid = mask_d[:, None] & (t[None, :] < length)
        dt = tl.load(delta_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + tl.load(bias_ptr + chans, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        return tl.where(valid, dt, 0.0)

    @triton.jit
    def _load_a(a_ptr, chans, mask_d, offs_n, mask_n, state):
        # A of the program's channels (channels, state) in fp32; 0 at masked channels and padded states
        return tl.load(a_ptr + chans[:, None] * state + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _per_channel(ptr, bc_rows, t, mask_d, mask_n, length):
        # B or C at steps t as a (channels, state, T) tile, the same values for every channel, loaded per channel
        # (cache hits). Why: Triton lays out the (channels, state, T) arithmetic like this load, 4 contiguous
        # steps per thread, so the scans over a chunk run 4 steps within each thread and the rest within one
        # warp. Broadcasting a (state, T) tile left the default layout, one step per lane over 32
        # lanes and 2 warps: every scan level a shuffle, the last one a barrier (2-3.5x the shuffles). Loaded as
        # (state, channels, T) and permuted, so that warps split the channels as well as the states and fewer
        # threads repeat the (channels, T) tiles (151 registers instead of 215 in the gradient kernel). That
        # layout needs rows aligned to 16 bytes, which the kernels know when the length is a multiple of 4
        # (ALIGN); other lengths get the default layout (same results). The 4 steps are one 16-byte load where
        # the length is a multiple of 16; otherwise 4 loads (Triton cannot tell that the end-of-sequence mask is
        # the same for all 4). 0 at masked channels, padded states, past the end.
        rows = (bc_rows[:, None] + t[None, :])[:, None, :] + 0 * mask_d.to(tl.int32)[None, :, None]
        inside = (mask_n[:, None] & (t[None, :] < length))[:, None, :] & mask_d[None, :, None]
        return tl.permute(tl.load(ptr + rows, mask=inside, other=0.0).to(tl.float32), (1, 0, 2))

    @triton.jit
    def _step_inputs(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, rows, chans, bc_rows, t, mask_d, mask_n,
                     offs_n, length, state,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # one chunk's dt, u (channels, T), B (channels, state, T) and A (channels, state); zeros past the end
        valid = mask_d[:, None] & (t[None, :] < length)
        dt = _step_dt(delta_ptr, bias_ptr, rows, chans, t, mask_d, length, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
        b = _per_channel(b_ptr, bc_rows, t, mask_d, mask_n, length)
        a = _load_a(a_ptr, chans, mask_d, offs_n, mask_n, state)
        return dt, u, b, a

    @triton.jit
    def _tile_inputs(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, rows, chans, bc_rows, t, mask_d, mask_n,
                     offs_n, length, state,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # the scan pairs (decay, input) of one chunk as (channels, state, T) tiles, plus dt, u, B, A
        dt, u, b, a = _step_inputs(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, rows, chans, bc_rows, t, mask_d,
                                   mask_n, offs_n, length, state, HAS_BIAS, SOFTPLUS)
        decay = tl.exp(dt[:, None, :] * a[:, :, None])
        drive = (dt * u)[:, None, :] * b
        return decay, drive, dt, u, b, a

    @triton.jit
    def _chunk_map(weight_exponent, total_exponent, drive, a):
        # A chunk's whole map h -> total_decay h + value without a scan of (decay, input) pairs: value = sum_t
        # exp(A x_t) drive_t, where x_t (channels, T) is the dt summed over the steps that decay step t's input
        # within the chunk, and total_decay = exp(A x) with x (channels,) the dt of all the steps the map decays
        # over. The callers get x_t from one (channels, T) cumsum of dt; a (channels, state, T) scan of pairs
        # shuffles two values between threads at every level. x_t is summed from those steps' dt alone, never
        # taken as a difference of two running sums: that would carry the rounding of a large sum into the
        # weight of a step whose x_t is small.
        weight = tl.exp(weight_exponent[:, None, :] * a[:, :, None])
        return tl.exp(total_exponent[:, None] * a), tl.sum(weight * drive, axis=2)

    @triton.jit
    def _forward_chunk_summary_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, end_ptr, decay_ptr,
                                      dim, length, groups, heads, state, n_chunks,
                                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                                      T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                      ALIGN: tl.constexpr):
        pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, summary = _chunk_program(
            dim, length, groups, heads, state, n_chunks, T, BLOCK_D, BLOCK_N, ALIGN)
        # the end state from a zero start: each input decays over the dt of the steps after it in the chunk. Those
        # suffix sums are a forward cumsum over the steps read last first (Triton's reverse scans have had wrong
        # results on GPUs, triton-lang/triton#4362), flipped back to step order: the inputs themselves are read
        # first to last, which lets their loads run along the steps (see _per_channel).
        dt, u, b, a = _step_inputs(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, rows, chans, bc_rows, t, mask_d,
                                   mask_n, offs_n, length, state, HAS_BIAS, SOFTPLUS)
        after = pid_c * T + (T - tl.arange(0, T))               # the step after each step, last first
        dt_after = _step_dt(delta_ptr, bias_ptr, rows, chans, after, mask_d, length, HAS_BIAS, SOFTPLUS)
        dt_after = tl.where((tl.arange(0, T) == 0)[None, :], 0.0, dt_after)     # the chunk's last step
        total_decay, end = _chunk_map(tl.flip(tl.cumsum(dt_after, axis=1), 1), tl.sum(dt, axis=1),
                                      (dt * u)[:, None, :] * b, a)
        mask_dn = mask_d[:, None] & mask_n[None, :]
        tl.store(end_ptr + summary, end, mask=mask_dn)
        tl.store(decay_ptr + summary, total_decay, mask=mask_dn)

    @triton.jit
    def _chunk_carry_kernel(decay_ptr, value_ptr, init_ptr, carry_ptr, last_ptr, n_chunks, state,
                            REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
                            CB: tl.constexpr, BLOCK_N: tl.constexpr):
        # One (batch, channel) per program: carry_c = the state entering chunk c (forward: from the left,
        # REVERSE: from the right), from carry_{c+1} = decay_c carry_c + value_c, scanned CB chunks at a time.
        pid = tl.program_id(0)
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < state
        base = pid * n_chunks * state
        if HAS_INIT:
            carry = tl.load(init_ptr + pid * state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = n_chunks - 1 if REVERSE else 0
        tl.store(carry_ptr + base + first * state + offs_n, carry, mask=mask_n)
        is_last = tl.arange(0, CB) == CB - 1
        for start in range(0, n_chunks, CB):
            j = start + tl.arange(0, CB)
            c = n_chunks - 1 - j if REVERSE else j
            inside = j < n_chunks
            m = mask_n[:, None] & inside[None, :]
            where = base + c[None, :] * state + offs_n[:, None]
            a = tl.load(decay_ptr + where, mask=m, other=1.0)
            v = tl.load(value_ptr + where, mask=m, other=0.0)
            pa, pv = tl.associative_scan((a, v), 1, _linear_combine)
            h = pv + pa * carry[:, None]                      # the carry leaving chunk c
            nxt = c - 1 if REVERSE else c + 1
            ok = m & (j + 1 < n_chunks)
            tl.store(carry_ptr + base + nxt[None, :] * state + offs_n[:, None], h, mask=ok)
            carry = tl.sum(tl.where(is_last[None, :], h, 0.0), axis=1)
        if not REVERSE:
            tl.store(last_ptr + pid * state + offs_n, carry, mask=mask_n)

    @triton.jit
    def _chunk_output(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, h0,
                      batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, length, state,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      T: tl.constexpr):
        # one chunk's states from its start state h0 (channels, state), its output written; returns the end state
        decay, drive, dt, u, b, a = _tile_inputs(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, rows, chans, bc_rows,
                                                 t, mask_d, mask_n, offs_n, length, state, HAS_BIAS, SOFTPLUS)
        cum_decay, h = tl.associative_scan((decay, drive), 2, _linear_combine)
        h = h + cum_decay * h0[:, :, None]
        valid_t = t < length
        y = tl.sum(h * _per_channel(c_ptr, bc_rows, t, mask_d, mask_n, length), axis=1)
        if HAS_D:
            y = y + tl.load(d_ptr + chans, mask=mask_d, other=0.0).to(tl.float32)[:, None] * u
        valid = mask_d[:, None] & valid_t[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + rows[:, None] + t[None, :], y.to(out_ptr.dtype.element_ty), mask=valid)
        return _last_along_time(h, T)

    @triton.jit
    def _forward_output_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, start_ptr, out_ptr,
                               dim, length, groups, heads, state, n_chunks,
                               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                               SOFTPLUS: tl.constexpr,
                               T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, summary = _chunk_program(
            dim, length, groups, heads, state, n_chunks, T, BLOCK_D, BLOCK_N, ALIGN)
        h0 = tl.load(start_ptr + summary, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        _chunk_output(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, h0,
                      batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, length, state,
                      HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, T)

    @triton.jit
    def _sequential_forward_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, start_ptr,
                                   out_ptr, last_ptr, dim, length, groups, heads, state, n_chunks,
                                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                                   SOFTPLUS: tl.constexpr,
                                   T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        # sequential layout: one program walks its channels' chunks in order, the state carried in registers;
        # each chunk's start state is written for the backward
        pid_bg, pid_h = tl.program_id(0), tl.program_id(1)
        batch, chans, mask_d, offs_n, mask_n, rows, bc_rows = _block_offsets(
            pid_bg, pid_h, dim, length, groups, heads, state, BLOCK_D, BLOCK_N, ALIGN)
        mask_dn = mask_d[:, None] & mask_n[None, :]
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        # Software-pipelined (num_stages=2): the next chunk's loads are in flight while this one is scanned.
        # A plain range leaves every iteration waiting on its own loads, and with one program per channel
        # block (128 at batch 2 x 64 channels, about one per multiprocessor) no other program hides that wait.
        for pid_c in tl.range(0, n_chunks, num_stages=2):
            t, summary = _chunk_steps(pid_c, batch, chans, offs_n, dim, state, n_chunks, T)
            tl.store(start_ptr + summary, h, mask=mask_dn)
            h = _chunk_output(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, h,
                              batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, length, state,
                              HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, T)
        # padded steps past the end are identity pairs, so h is the state after the last real step
        tl.store(last_ptr + (batch * dim + chans)[:, None] * state + offs_n[None, :], h, mask=mask_dn)

    @triton.jit
    def _adjoint_decay(delta_ptr, bias_ptr, a, rows, chans, t, mask_d, length,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # the adjoint's decays exp(dt_{t+1} A) as a (channels, state, T) tile: 1 at the last step
        # (lambda_{L-1} = C dy + d last) and beyond it
        dt_next = _step_dt(delta_ptr, bias_ptr, rows, chans, t + 1, mask_d, length, HAS_BIAS, SOFTPLUS)
        return tl.exp(dt_next[:, None, :] * a[:, :, None])

    @triton.jit
    def _adjoint_drive(c_ptr, z_ptr, dout_ptr, rows, bc_rows, t, mask_d, mask_n, length, HAS_Z: tl.constexpr):
        # the adjoint's inputs C_t dy_t (channels, state, T), dy the gradient reaching the scan's output
        valid_t = t < length
        valid = mask_d[:, None] & valid_t[None, :]
        dy = tl.load(dout_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
            dy = dy * z * tl.sigmoid(z)
        return dy[:, None, :] * _per_channel(c_ptr, bc_rows, t, mask_d, mask_n, length)

    @triton.jit
    def _backward_chunk_summary_kernel(delta_ptr, a_ptr, c_ptr, z_ptr, bias_ptr, dout_ptr, end_ptr, decay_ptr,
                                       dim, length, groups, heads, state, n_chunks,
                                       HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                                       T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                       ALIGN: tl.constexpr):
        pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, summary = _chunk_program(
            dim, length, groups, heads, state, n_chunks, T, BLOCK_D, BLOCK_N, ALIGN)
        a = _load_a(a_ptr, chans, mask_d, offs_n, mask_n, state)
        # the adjoint at the chunk's first step from a zero adjoint entering at its end: step t's input decays
        # over the dt of the chunk's steps from its second one to t (the adjoint runs backwards in time), the
        # whole chunk's map over those and the first step of the next chunk (0 past the end)
        dt_later = _step_dt(delta_ptr, bias_ptr, rows, chans, t, mask_d, length, HAS_BIAS, SOFTPLUS)
        dt_later = tl.where((tl.arange(0, T) == 0)[None, :], 0.0, dt_later)
        next_first = _step_dt(delta_ptr, bias_ptr, rows, chans, (pid_c + 1) * T + tl.arange(0, 1), mask_d, length,
                              HAS_BIAS, SOFTPLUS)
        # steps past the end have no input; a zero exponent there keeps an overflowing one from making 0 x inf
        exponent = tl.where((t < length)[None, :], tl.cumsum(dt_later, axis=1), 0.0)
        total_decay, first = _chunk_map(exponent, tl.sum(dt_later, axis=1) + tl.sum(next_first, axis=1),
                                        _adjoint_drive(c_ptr, z_ptr, dout_ptr, rows, bc_rows, t, mask_d, mask_n,
                                                       length, HAS_Z), a)
        mask_dn = mask_d[:, None] & mask_n[None, :]
        tl.store(end_ptr + summary, first, mask=mask_dn)
        tl.store(decay_ptr + summary, total_decay, mask=mask_dn)

    @triton.jit
    def _chunk_gradients(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr, h0, lam_end,
                         du_ptr, ddelta_ptr, dz_ptr, db_part_ptr, dc_part_ptr,
                         pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows,
                         length, state, n_blocks,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                         T: tl.constexpr, BLOCK_D: tl.constexpr):
        # One chunk's gradients from its start state h0 and the adjoint state lam_end entering it from the right
        # (both (channels, state)). Writes du, d delta, dz and the channel-block partial sums of dB, dC; returns
        # the chunk's sums of dA (channels, state), dD and d delta_bias (channels) and the adjoint state at its
        # first step (what enters the chunk before it).
        valid_t = t < length
        valid = mask_d[:, None] & valid_t[None, :]
        # states of the chunk, recomputed from its start state
        decay, drive, dt, u, b, a = _tile_inputs(u_ptr, delta_ptr, a_ptr, b_ptr, bias_ptr, rows, chans, bc_rows,
                                                 t, mask_d, mask_n, offs_n, length, state, HAS_BIAS, SOFTPLUS)
        cum_decay, h = tl.associative_scan((decay, drive), 2, _linear_combine)
        h = h + cum_decay * h0[:, :, None]
        # Everything that needs the states themselves first, so that h_t - dt u B is the only
        # (channels, state, T) tile of the forward that stays live (in registers) through the adjoint scan:
        # fewer registers per thread, more warps per multiprocessor.
        c = _per_channel(c_ptr, bc_rows, t, mask_d, mask_n, length)
        dout = tl.load(dout_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
        if HAS_D:
            d_skip = tl.load(d_ptr + chans, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            y = tl.sum(h * c, axis=1)
            if HAS_D:
                y = y + d_skip[:, None] * u
            tl.store(dz_ptr + rows[:, None] + t[None, :], dout * y * sig * (1.0 + z * (1.0 - sig)), mask=valid)
            dy = dout * z * sig
        else:
            dy = dout
        # channel-block partial sums of dB_t = sum_d lambda dt u and dC_t = sum_d dy h, (batch, groups, blocks, N, L)
        # int64: with one channel per program this buffer has state x the elements of u
        part = (((pid_bg * n_blocks + pid_h) * state).to(tl.int64) + offs_n)[:, None] * length + t[None, :]
        mask_nt = mask_n[:, None] & valid_t[None, :]
        tl.store(dc_part_ptr + part, tl.sum(h * dy[:, None, :], axis=0), mask=mask_nt)
        # exp(dt A) h_{t-1} = h_t - dt u B: the gradient of the decay's exponent needs no shifted state
        decayed = h - drive
        # adjoint states lambda_t = dL/dh_t, scanned from the chunk's end, from the C and dy in hand
        adj_decay = _adjoint_decay(delta_ptr, bias_ptr, a, rows, chans, t, mask_d, length, HAS_BIAS, SOFTPLUS)
        cum_adj, lam = tl.associative_scan((adj_decay, dy[:, None, :] * c), 2, _linear_combine,
                                           reverse=True)
        lam = lam + cum_adj * lam_end[:, :, None]
        lam_first = _first_along_time(lam, T)
        lam = tl.where(valid_t[None, None, :], lam, 0.0)
        g_exponent = lam * decayed                            # dL/d(dt_t A)
        lam_b = tl.sum(lam * b, axis=1)                       # sum_n lambda B
        tl.store(db_part_ptr + part, tl.sum(lam * (dt * u)[:, None, :], axis=0), mask=mask_nt)
        g_u = lam_b * dt
        g_dt = lam_b * u + tl.sum(g_exponent * a[:, :, None], axis=1)
        d_d = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            g_u = g_u + dy * d_skip[:, None]
            d_d = tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            pre = tl.load(delta_ptr + rows[:, None] + t[None, :], mask=valid, other=0.0).to(tl.float32)
            if HAS_BIAS:
                pre = pre + tl.load(bias_ptr + chans, mask=mask_d, other=0.0).to(tl.float32)[:, None]
            g_dt = g_dt * tl.sigmoid(pre)
        g_dt = tl.where(valid, g_dt, 0.0)
        tl.store(du_ptr + rows[:, None] + t[None, :], g_u, mask=valid)
        tl.store(ddelta_ptr + rows[:, None] + t[None, :], g_dt, mask=valid)
        return tl.sum(g_exponent * dt[:, None, :], axis=2), d_d, tl.sum(g_dt, axis=1), lam_first

    @triton.jit
    def _store_parameter_sums(part_ptr, d_a, d_d, d_bias, chans, mask_d, offs_n, mask_n, dim, state,
                              HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
        # one row of the partial sums: dA (dim x state), then dD (dim), then d delta_bias (dim)
        tl.store(part_ptr + chans[:, None] * state + offs_n[None, :], d_a, mask=mask_d[:, None] & mask_n[None, :])
        if HAS_D:
            tl.store(part_ptr + dim * state + chans, d_d, mask=mask_d)
        if HAS_BIAS:
            tl.store(part_ptr + dim * (state + 1) + chans, d_bias, mask=mask_d)

    @triton.jit
    def _backward_gradient_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr,
                                  start_ptr, lam_ptr,
                                  du_ptr, ddelta_ptr, dz_ptr, chunk_part_ptr, db_part_ptr, dc_part_ptr,
                                  dim, length, groups, heads, state, n_chunks, n_blocks,
                                  HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  SOFTPLUS: tl.constexpr,
                                  T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, summary = _chunk_program(
            dim, length, groups, heads, state, n_chunks, T, BLOCK_D, BLOCK_N, ALIGN)
        mask_dn = mask_d[:, None] & mask_n[None, :]
        h0 = tl.load(start_ptr + summary, mask=mask_dn, other=0.0)
        lam_end = tl.load(lam_ptr + summary, mask=mask_dn, other=0.0)
        d_a, d_d, d_bias, lam_first = _chunk_gradients(
            u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr, h0, lam_end,
            du_ptr, ddelta_ptr, dz_ptr, db_part_ptr, dc_part_ptr,
            pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, length, state, n_blocks,
            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, T, BLOCK_D)
        # this chunk's row of the (batch, chunk) partial sums
        _store_parameter_sums(chunk_part_ptr + (batch * n_chunks + pid_c) * dim * (state + 2), d_a, d_d, d_bias,
                              chans, mask_d, offs_n, mask_n, dim, state, HAS_D, HAS_BIAS)

    @triton.jit
    def _sequential_backward_kernel(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr,
                                    start_ptr, init_ptr,
                                    du_ptr, ddelta_ptr, dz_ptr, param_part_ptr, db_part_ptr, dc_part_ptr,
                                    dim, length, groups, heads, state, n_chunks, n_blocks,
                                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                                    SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr,
                                    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
        # sequential layout: one program walks its channels' chunks from the last to the first, the adjoint
        # state carried in registers, the parameter gradients summed in registers
        pid_bg, pid_h = tl.program_id(0), tl.program_id(1)
        batch, chans, mask_d, offs_n, mask_n, rows, bc_rows = _block_offsets(
            pid_bg, pid_h, dim, length, groups, heads, state, BLOCK_D, BLOCK_N, ALIGN)
        mask_dn = mask_d[:, None] & mask_n[None, :]
        if HAS_INIT:  # the gradient of the last state enters after the last step
            lam = tl.load(init_ptr + (batch * dim + chans)[:, None] * state + offs_n[None, :], mask=mask_dn,
                          other=0.0).to(tl.float32)
        else:
            lam = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        sum_a = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        sum_d = tl.zeros([BLOCK_D], dtype=tl.float32)
        sum_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.range(0, n_chunks, num_stages=2):    # pipelined, as in the forward
            pid_c = n_chunks - 1 - i
            t, summary = _chunk_steps(pid_c, batch, chans, offs_n, dim, state, n_chunks, T)
            h0 = tl.load(start_ptr + summary, mask=mask_dn, other=0.0)
            d_a, d_d, d_bias, lam = _chunk_gradients(
                u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr, h0, lam,
                du_ptr, ddelta_ptr, dz_ptr, db_part_ptr, dc_part_ptr,
                pid_bg, pid_h, pid_c, batch, chans, mask_d, offs_n, mask_n, t, rows, bc_rows, length, state,
                n_blocks, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, T, BLOCK_D)
            sum_a += d_a
            sum_d += d_d
            sum_bias += d_bias
        _store_parameter_sums(param_part_ptr + batch * dim * (state + 2), sum_a, sum_d, sum_bias,
                              chans, mask_d, offs_n, mask_n, dim, state, HAS_D, HAS_BIAS)


def _next_power_of_2(n: int) -> int:
    # plain integers: triton.next_power_of_2 and triton.cdiv are constexpr-function wrappers (in Triton 3.9), whose
    # host calls cost about 1 us each; ten per scan
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_shape(batch: int, dim: int, groups: int, state: int, length: int, layout: str) -> dict:
    """Tile sizes: channels per program, padded state, chunk length (powers of two within ``TILE``), and the
    layout (``layout``, or sequential where the parallel one would launch more chunks than a grid holds)."""
    if layout not in ("parallel", "sequential"):
        raise ValueError(f"unknown Triton scan layout {layout!r}; use 'parallel' or 'sequential'")
    heads = dim // groups
    block_n = _next_power_of_2(state)
    if layout == "parallel":
        chunk = max(2, min(CHUNK, TILE // block_n, _next_power_of_2(length)))
        block_d = max(1, min(_next_power_of_2(heads), TILE // (block_n * chunk)))
    else:  # programs are (batch x group, channel block) only: narrow blocks keep the GPU busy
        block_d = max(1, min(_next_power_of_2(heads), TILE // (2 * block_n)))
        while block_d > 1 and batch * groups * _cdiv(heads, block_d) < SEQUENTIAL_PROGRAMS:
            block_d //= 2
        chunk = max(2, min(SEQUENTIAL_CHUNK, TILE // (block_n * block_d), _next_power_of_2(length)))
    if layout == "parallel" and _cdiv(length, chunk) > MAX_GRID_CHUNKS:
        return _launch_shape(batch, dim, groups, state, length, "sequential")
    warps = WARPS or (4 if block_d * block_n * chunk <= 2048 else 8)
    return dict(heads=heads, block_d=block_d, block_n=block_n, chunk=chunk, warps=warps, layout=layout,
                n_blocks=_cdiv(heads, block_d), n_chunks=_cdiv(length, chunk),
                gradient_registers=GRADIENT_REGISTERS if layout == "parallel" else None,
                align=math.gcd(length, 16))


def _carry(decay, value, init, reverse: bool, block_n: int):
    """Carries between chunks: (batch, dim, n_chunks, state) in fp32, and the last state (forward; None
    in reverse)."""
    batch, dim, n_chunks, state = decay.shape
    carry = torch.empty_like(decay)
    last = carry if reverse else decay.new_empty(batch, dim, state)  # reverse never writes it
    cb = max(2, min(CARRY_BLOCK, _next_power_of_2(n_chunks)))
    _chunk_carry_kernel[(batch * dim,)](decay, value, init if init is not None else decay, carry, last,
                                        n_chunks, state, REVERSE=reverse, HAS_INIT=init is not None,
                                        CB=cb, BLOCK_N=block_n)
    return carry, (None if reverse else last)


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, length = u.shape
        B4, C4 = as_grouped(B).contiguous(), as_grouped(C).contiguous()
        groups, state = B4.shape[1], B4.shape[2]
        s = _launch_shape(batch, dim, groups, state, length, LAYOUT)
        size = largest_index(batch, dim, groups, state, length, s)
        if size > MAX_INDEX:
            raise RuntimeError(f"the triton backend indexes with 32 bits and this scan needs {size} elements in "
                               f"one tensor (batch {batch} x channels {dim} x length {length}); split the batch or "
                               "use backend='torch'")
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        A32 = A.float().contiguous()
        D32 = D.float().contiguous() if D is not None else None
        bias32 = delta_bias.float().contiguous() if delta_bias is not None else None
        dummy = A32  # never read: the HAS_* flags switch its loads off
        common = dict(HAS_BIAS=bias32 is not None, SOFTPLUS=bool(delta_softplus), T=s["chunk"],
                      BLOCK_D=s["block_d"], BLOCK_N=s["block_n"], ALIGN=s["align"], num_warps=s["warps"])
        f32 = dict(dtype=torch.float32, device=u.device)
        bias_arg = bias32 if bias32 is not None else dummy
        out = torch.empty_like(u)
        operands = (u, delta, A32, B4, C4, D32 if D32 is not None else dummy, z if z is not None else dummy,
                    bias_arg)
        flags = dict(HAS_D=D32 is not None, HAS_Z=z is not None, **common)
        if s["layout"] == "sequential":
            starts = torch.empty(batch, dim, s["n_chunks"], state, **f32)
            last = torch.empty(batch, dim, state, **f32)
            _sequential_forward_kernel[(batch * groups, s["n_blocks"])](
                *operands, starts, out, last, dim, length, groups, s["heads"], state, s["n_chunks"], **flags)
        else:
            grid = (batch * groups, s["n_blocks"], s["n_chunks"])
            ends, decays = torch.empty(2, batch, dim, s["n_chunks"], state, **f32)  # one allocation, two views
            _forward_chunk_summary_kernel[grid](u, delta, A32, B4, bias_arg, ends, decays,
                                                dim, length, groups, s["heads"], state, s["n_chunks"], **common)
            starts, last = _carry(decays, ends, None, False, s["block_n"])
            _forward_output_kernel[grid](*operands, starts, out,
                                         dim, length, groups, s["heads"], state, s["n_chunks"], **flags)
        ctx.save_for_backward(u, delta, A32, B4, C4, D32, z, bias32, starts)
        ctx.set_materialize_grads(False)  # an unused last state then costs no zero tensor in backward
        ctx.meta = (B.dim(), A.dtype, B.dtype, C.dtype, None if D is None else D.dtype,
                    None if delta_bias is None else delta_bias.dtype, bool(delta_softplus), s)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A32, B4, C4, D32, z, bias32, starts = ctx.saved_tensors
        b_ndim, a_dtype, b_dtype, c_dtype, d_dtype, bias_dtype, softplus, s = ctx.meta
        batch, dim, length = u.shape
        groups, state = B4.shape[1], B4.shape[2]
        n_chunks, n_blocks = s["n_chunks"], s["n_blocks"]
        dout = dout.contiguous() if dout is not None else torch.zeros_like(u)
        dummy = A32
        f32 = dict(dtype=torch.float32, device=u.device)
        flags = dict(HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=softplus, T=s["chunk"],
                     BLOCK_D=s["block_d"], BLOCK_N=s["block_n"], ALIGN=s["align"], num_warps=s["warps"])
        z_arg, bias_arg = (z if z is not None else dummy), (bias32 if bias32 is not None else dummy)
        init = dlast.float().contiguous() if dlast is not None else None
        # Few host-side operations: at 16k steps the GPU work is short enough for launch overhead to
        # count, so the outputs share allocations and the partial sums share reductions.
        grads = torch.empty(2 if z is None else 3, batch, dim, length, **f32)
        du, ddelta, dz = grads[0], grads[1], (None if z is None else grads[2])
        # per channel block: dB and dC, summed over blocks at once
        db_part, dc_part = bc_part = torch.empty(2, batch, groups, n_blocks, state, length, **f32)
        operands = (u, delta, A32, B4, C4, D32 if D32 is not None else dummy, z_arg, bias_arg, dout, starts)
        outputs = (du, ddelta, dz if dz is not None else dummy)
        sizes = (dim, length, groups, s["heads"], state, n_chunks, n_blocks)
        if s["layout"] == "sequential":
            # per batch element: dA (dim x state), dD (dim), d delta_bias (dim), summed over the batch at once
            param_part = torch.empty(batch, 1, dim * (state + 2), **f32)
            _sequential_backward_kernel[(batch * groups, n_blocks)](
                *operands, init if init is not None else dummy, *outputs, param_part, db_part, dc_part, *sizes,
                HAS_D=D32 is not None, HAS_INIT=init is not None, **flags)
        else:
            grid = (batch * groups, n_blocks, n_chunks)
            ends, decays = torch.empty(2, batch, dim, n_chunks, state, **f32)
            _backward_chunk_summary_kernel[grid](delta, A32, C4, z_arg, bias_arg, dout, ends, decays,
                                                 dim, length, groups, s["heads"], state, n_chunks, **flags)
            lam_ends, _ = _carry(decays, ends, init, True, s["block_n"])
            # per (batch, chunk): dA (dim x state), dD (dim), d delta_bias (dim), summed over batch and chunks
            param_part = torch.empty(batch, n_chunks, dim * (state + 2), **f32)
            cap = {} if s["gradient_registers"] is None else {"maxnreg": s["gradient_registers"]}
            _backward_gradient_kernel[grid](*operands, lam_ends, *outputs, param_part, db_part, dc_part, *sizes,
                                            HAS_D=D32 is not None, **flags, **cap)
        dB, dC = bc_part.sum(3)
        if b_ndim == 3:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        chunk_sums = param_part.sum((0, 1))
        dA = chunk_sums[:dim * state].view(dim, state)
        dD, dbias = chunk_sums[dim * state:dim * (state + 1)], chunk_sums[dim * (state + 1):]
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(a_dtype), dB.to(b_dtype), dC.to(c_dtype),
                None if D32 is None else dD.to(d_dtype), None if z is None else dz.to(z.dtype),
                None if bias32 is None else dbias.to(bias_dtype), None)


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
