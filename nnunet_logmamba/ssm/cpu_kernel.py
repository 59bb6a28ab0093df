"""The ``cpu_kernel`` backend: a fused C selective scan, compiled on first use, for CPU tensors.

Why: on a CPU the ``torch`` backend is memory-bound. It materialises (batch, dim, length, state)
tensors and streams them through memory a dozen times per forward and backward. The C kernel keeps
the state of one channel in vector registers (the state axis is the vector axis; ``expf`` vectorises
through glibc's libmvec) and touches each input once per pass, as mamba-ssm's CUDA kernel does on a
GPU.

How: ``cpu_scan.c`` ships with the package and is compiled by the machine's C compiler (``$CC``, else
``cc``, ``gcc`` or ``clang``) the first time a scan runs on CPU, into a per-user cache
(``$BIOIMAGE_MAMBA_CACHE``, else ``$XDG_CACHE_HOME/bioimage_mamba``, else ``~/.cache/bioimage_mamba``),
keyed by the source, the compiler and the CPU, so later processes load it at once. Nothing is built at
install time: without a compiler (or when the build fails) ``auto`` uses the ``torch`` backend and
``nnunet_logmamba doctor`` says why. ``BIOIMAGE_MAMBA_SCAN_BACKEND=torch`` skips the kernel.

The kernel computes in fp32 (fp16/bf16 inputs are cast; fp64 goes to the ``torch`` backend). It is
tested against the ``reference`` backend, forward and every gradient (``tests/test_selective_scan.py``).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import as_grouped, check_scan_inputs

SOURCE = Path(__file__).with_name("cpu_scan.c")
ABI_VERSION = 3
#: positions between the states the forward keeps for backward (the backward recomputes one such chunk
#: at a time in a buffer of chunk x state floats that stays in the L1/L2 cache)
CHUNK = 64
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
# -ffast-math lets the compiler vectorise expf (libmvec) and reorder the state-axis sums; it is given
# to the compile step only, never to the link step, where GCC would add crtfastmath.o and switch the
# whole process to flush-denormals-to-zero.
_COMPILE_FLAGS = ("-O3", "-ffast-math", "-fPIC", "-std=c99")
_OPTIONAL_FLAGS = (("-march=native",), ("-fopenmp",))


def cache_dir() -> Path:
    """Folder for the compiled kernel (created on demand)."""
    if os.environ.get("BIOIMAGE_MAMBA_CACHE"):
        return Path(os.environ["BIOIMAGE_MAMBA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bioimage_mamba"


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC``, else the first of cc, gcc, clang on the PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name.split()[0])
        if path:
            return path
    return None


def _cpu_signature() -> str:
    # -march=native code is only valid on a CPU with the same instruction sets
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


class _FolderUnusable(OSError):
    """The library's folder cannot be created or written: no compiler flag changes that."""


def _try_build(cc: str, flags: list[str], workdir: Path, target: Path) -> str | None:
    """Compile and link into ``target`` (written under a temporary name beside it, then renamed: a rename
    across file systems, from a tmpfs to an NFS home, would fail); the compiler's error or None.
    Raises :class:`_FolderUnusable` when ``target``'s folder cannot take the library."""
    obj = workdir / "cpu_scan.o"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _FolderUnusable(f"cannot create {target.parent}: {exc}") from exc
    tmp = target.parent / f".{target.name}.{os.getpid()}.partial"
    compile_cmd = [cc, *_COMPILE_FLAGS, *flags, "-c", str(SOURCE), "-o", str(obj)]
    link_cmd = [cc, "-shared", *[f for f in flags if f == "-fopenmp"], str(obj), "-o", str(tmp), "-lm"]
    try:
        for cmd in (compile_cmd, link_cmd):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"{' '.join(cmd)}: {exc}"
            if done.returncode != 0:
                return f"{' '.join(cmd)}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _FolderUnusable(f"cannot write {target}: {exc}") from exc
    finally:   # no partial library left beside the cache (gone already after the rename)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, how it was obtained) or (None, why not); built at most once per process."""
    if not SOURCE.is_file():
        return None, f"{SOURCE.name} is missing from the installed package"
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang); the kernel is built on first use"
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(_COMPILE_FLAGS), _compiler_version(cc),
                                    _cpu_signature(), platform.machine()]).encode()).hexdigest()[:16]
    # the cache, else (a read-only or full home) the temporary folder
    name = f"cpu_scan-{key}.so"
    candidates = [cache_dir() / name, Path(tempfile.gettempdir()) / "bioimage_mamba" / name]
    target = next((c for c in candidates if c.is_file()), None)
    how = f"loaded from {target}"
    if target is None:
        errors = []
        with tempfile.TemporaryDirectory(prefix="bioimage_mamba_build_") as workdir:
            # every optional flag first, then without OpenMP, without -march=native, with neither
            variants = [[f for group in _OPTIONAL_FLAGS for f in group], ["-march=native"], ["-fopenmp"], []]
            for candidate in candidates:
                for flags in variants:
                    try:
                        error = _try_build(cc, flags, Path(workdir), candidate)
                    except _FolderUnusable as exc:   # the folder, not the flags: try the next folder
                        errors.append(str(exc))
                        break
                    if error is None:
                        target, how = candidate, f"built with {cc} {' '.join(flags)} into {candidate}"
                        break
                    errors.append(error)
                if target is not None:
                    break
            else:
                return None, f"building the kernel with {cc} failed: {errors[-1]}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"loading {target} failed: {exc}"
    if lib.scan_abi_version() != ABI_VERSION:
        return None, f"{target} has ABI {lib.scan_abi_version()}, expected {ABI_VERSION}"
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.scan_forward.argtypes = [i64] * 6 + [ptr, ptr, ptr, cint] + [ptr] * 7 + [cint, cint]
    lib.scan_forward.restype = None
    lib.scan_backward.argtypes = [i64] * 6 + [ptr, ptr, ptr, cint] + [ptr] * 14 + [cint, cint]
    lib.scan_backward.restype = None
    return lib, how


def cpu_kernel_status() -> tuple[bool, str]:
    """(available, reason): whether the compiled CPU kernel loads here, how, or why not."""
    lib, how = _load()
    return lib is not None, how


def cpu_kernel_supports(u: torch.Tensor) -> bool:
    """Whether ``auto`` may give these tensors to the kernel (CPU, fp32/fp16/bf16, kernel available)."""
    return u.device.type == "cpu" and u.dtype in _SUPPORTED and _load()[0] is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def is_channels_last(u: torch.Tensor) -> bool:
    """Whether ``u`` (batch, dim, length) is stored as (batch, length, dim), as tokens that come out of a
    linear layer and are transposed to the scan's axis order are."""
    return u.dim() == 3 and not u.is_contiguous() and u.transpose(1, 2).is_contiguous()


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (batch, dim, length) stored contiguously in the kernel's layout (a copy only when it is not)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else t.contiguous()


def empty_in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialised tensor of ``t``'s shape and dtype in the kernel's layout."""
    if channels_last:
        return t.new_empty(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2)
    return t.new_empty(t.shape)


class _CpuScan(torch.autograd.Function):
    """y, last = scan(u, delta, A, B, C, D, delta_bias) on fp32 tensors, B and C as contiguous
    (batch, groups, length, state), u and delta (batch, dim, length) stored in the layout ``channels_last``
    says (see :func:`in_layout`); y comes out in that layout too. Softplus of ``delta + delta_bias``
    inside the kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, D, bias, softplus, channels_last):
        lib = _load()[0]
        batch, dim, length = u.shape
        groups, state = Bt.shape[1], Bt.shape[3]
        nchunks = -(-length // CHUNK)
        y = empty_in_layout(u, channels_last)
        states = u.new_empty(batch, dim, nchunks, state)
        last = u.new_empty(batch, dim, state)
        lib.scan_forward(batch, dim, length, state, groups, CHUNK, _ptr(u), _ptr(delta), _ptr(bias), int(softplus),
                         _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(y), _ptr(states), _ptr(last),
                         int(channels_last), torch.get_num_threads())
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, bias, states)
        ctx.softplus, ctx.channels_last = softplus, channels_last
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dlast):
        lib = _load()[0]
        u, delta, A, Bt, Ct, D, bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, state = Bt.shape[1], Bt.shape[3]
        layout = ctx.channels_last
        dy = torch.zeros_like(u) if dy is None else in_layout(dy.float(), layout)
        dlast = None if dlast is None else dlast.float().contiguous()
        du, ddelta = empty_in_layout(u, layout), empty_in_layout(delta, layout)
        dA = torch.zeros_like(A)
        dB, dC = torch.zeros_like(Bt), torch.zeros_like(Ct)
        dD = None if D is None else torch.zeros_like(D)
        dbias = None if bias is None else torch.zeros_like(bias)
        lib.scan_backward(batch, dim, length, state, groups, CHUNK, _ptr(u), _ptr(delta), _ptr(bias),
                          int(ctx.softplus), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(D), _ptr(dy), _ptr(dlast),
                          _ptr(states), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB), _ptr(dC), _ptr(dD), _ptr(dbias),
                          int(layout), torch.get_num_threads())
        return du, ddelta, dA, dB, dC, dD, dbias, None, None


def selective_scan_cpu_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, return_last_state=False):
    """The compiled CPU kernel; same arguments and shapes as :func:`nnunet_logmamba.ssm.selective_scan`."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"backend='cpu_kernel' is not available here ({why}); use backend='torch'")
    if u.device.type != "cpu":
        raise RuntimeError(f"backend='cpu_kernel' needs CPU tensors, got {u.device}; use backend='auto'")
    if u.dtype not in _SUPPORTED:
        raise ValueError(f"backend='cpu_kernel' computes in fp32 and takes fp32/fp16/bf16 inputs, got {u.dtype}; "
                         "use backend='torch' for fp64")
    with torch.autocast("cpu", enabled=False):
        # the state axis last: it is the kernel's vector axis
        Bt = as_grouped(B).float().transpose(-1, -2).contiguous()
        Ct = as_grouped(C).float().transpose(-1, -2).contiguous()
        # tokens stored channels last (from a linear layer) are scanned in place, without transposed copies
        channels_last = is_channels_last(u)
        y, last = _CpuScan.apply(in_layout(u.float(), channels_last), in_layout(delta.float(), channels_last),
                                 A.float().contiguous(), Bt, Ct, None if D is None else D.float().contiguous(),
                                 None if delta_bias is None else delta_bias.float().contiguous(), bool(delta_softplus),
                                 channels_last)
        out = y * F.silu(z.float()) if z is not None else y
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out
