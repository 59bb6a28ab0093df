"""Backend choice for :func:`selective_scan`."""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .chunked import selective_scan_chunked
from .cpu_kernel import cpu_kernel_status, cpu_kernel_supports, selective_scan_cpu_kernel
from .cuda_kernel import kernel_supports, mamba_ssm_status, selective_scan_cuda_kernel
from .parity import scan_and_reference
from .reference import selective_scan_reference
from .triton_kernel import (MAX_INDEX, interpreter_active, largest_index, selective_scan_triton, triton_status,
                            triton_supports)

BACKENDS = ("auto", "reference", "torch", "cpu_kernel", "triton", "mamba_ssm")
_IMPLEMENTATIONS = {
    "reference": selective_scan_reference,
    "torch": selective_scan_chunked,
    "cpu_kernel": selective_scan_cpu_kernel,
    "triton": selective_scan_triton,
    "mamba_ssm": selective_scan_cuda_kernel,
}
#: Environment variable that overrides ``backend="auto"`` everywhere (benchmarks, debugging).
BACKEND_ENV = "BIOIMAGE_MAMBA_SCAN_BACKEND"
#: the Triton kernel keeps the (channels, state) block in registers; larger states go to ``torch``
MAX_TRITON_STATE = 256


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` here: ``cpu_kernel`` on CPU when it builds or loads, ``triton``
    on CUDA when triton imports (on CPU only in Triton's interpreter), ``mamba_ssm`` only on CUDA with the
    extra installed."""
    names = ["reference", "torch"]
    kind = torch.device(device).type
    if kind == "cpu" and cpu_kernel_status()[0]:
        names.append("cpu_kernel")
    if triton_status()[0] and (kind == "cuda" or (kind == "cpu" and interpreter_active())):
        names.append("triton")
    if kind == "cuda" and mamba_ssm_status()[0]:
        names.append("mamba_ssm")
    return names


def _triton_takes(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor | None = None) -> bool:
    """Whether ``auto`` may give these tensors to the Triton kernels (CUDA, dtype, state size, and tensors
    within the kernels' 32-bit indexing when ``B`` is given)."""
    if not (u.is_cuda and triton_supports(u) and A.shape[1] <= MAX_TRITON_STATE):
        return False
    if B is None:
        return True
    groups = 1 if B.dim() == 3 else B.shape[1]
    return largest_index(*u.shape[:2], groups, A.shape[1], u.shape[2]) <= MAX_INDEX


def auto_backend_reason(u: torch.Tensor, A: torch.Tensor) -> str:
    """Why ``auto`` picks what it picks for these tensors (for ``nnunet_logmamba doctor``)."""
    override = os.environ.get(BACKEND_ENV, "auto")
    if override != "auto":
        return f"{BACKEND_ENV}={override}"
    if not u.is_cuda:
        available, how = cpu_kernel_status()
        if cpu_kernel_supports(u):
            return f"CPU tensors: the compiled C kernel ({how})"
        if not available:
            return f"CPU tensors: the chunked torch scan (the C kernel is unavailable: {how})"
        return f"CPU tensors of dtype {u.dtype}: the chunked torch scan (the C kernel computes in fp32)"
    if kernel_supports(u, A):
        failure = _probe_result("mamba_ssm", u)
        if failure is None:
            return "mamba-ssm's CUDA kernel imports and runs"
        mamba_reason = f"imports but fails here: {failure}"
    elif mamba_ssm_status()[0]:
        mamba_reason = f"imports but does not take {u.dtype} tensors with state size {A.shape[1]}"
    else:
        mamba_reason = f"does not import: {mamba_ssm_status()[1].splitlines()[0][:80]}"
    triton_reason = triton_status()[1]
    if _triton_takes(u, A):
        failure = _probe_result("triton", u)
        if failure is None:
            return f"mamba-ssm {mamba_reason}; {triton_reason} runs"
        triton_reason = f"{triton_reason} fails here: {failure}"
    return f"neither mamba-ssm ({mamba_reason}) nor triton ({triton_reason}) runs here"


def _runs_on_device(backend: str, u: torch.Tensor) -> bool:
    """Whether ``backend`` can take tensors on ``u``'s device at all (not whether it is installed)."""
    if backend == "cpu_kernel":
        return not u.is_cuda
    if backend == "mamba_ssm":
        return u.is_cuda
    if backend == "triton":   # Triton's interpreter runs its kernels on CPU tensors
        return u.is_cuda or interpreter_active()
    return True


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


#: (backend, device, dtype) -> None when a small scan ran and matched the reference, else why not
_PROBES: dict[tuple[str, str, torch.dtype], str | None] = {}


def _probe_failure(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run ``backend`` once on a small scan, forward and backward, against the reference.

    A compiled kernel can import and still fail where it runs: a mamba-ssm wheel built for another GPU
    architecture ("no kernel image is available"), a Triton without a working compiler. ``auto`` must
    not hand a training to such a backend, so it tries each fast backend once per device and dtype.
    """
    try:
        pairs = scan_and_reference(_IMPLEMENTATIONS[backend], device, dtype)
    except Exception as exc:   # a kernel that cannot run here fails in many ways (RuntimeError, CompilationError ...)
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
    (y, expected), gradients = pairs[0], pairs[1:]
    error = (y - expected).abs().max().item()
    tolerance = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
    if not error <= tolerance * max(1.0, expected.abs().max().item()):
        return f"its output differs from the reference scan by {error:.3g}"
    if not all(torch.isfinite(ours).all() for ours, _ in gradients):
        return "its backward pass gave missing or non-finite gradients"
    return None


def _probe_result(backend: str, u: torch.Tensor) -> str | None:
    """Why ``backend`` failed its probe on ``u``'s device and dtype, or None (probed on first use)."""
    key = (backend, str(u.device), u.dtype)
    if key not in _PROBES:
        _run_probe(key, backend, u.device, u.dtype)
    return _PROBES[key]


def _backend_works(backend: str, u: torch.Tensor) -> bool:
    """Whether ``backend`` passed its probe on ``u``'s device and dtype."""
    return _probe_result(backend, u) is None


@torch.compiler.disable   # under an opt-in torch.compile the probe runs eagerly, once, not traced into a graph
def _run_probe(key, backend: str, device: torch.device, dtype: torch.dtype) -> None:
    _PROBES[key] = _probe_failure(backend, device, dtype)
    if _PROBES[key] is not None:
        _warn_once(f"the {backend} selective-scan backend imports but fails on {device} ({_PROBES[key]}); "
                   f"using another backend there. `nnunet_logmamba doctor` shows the choice; set "
                   f"{BACKEND_ENV}={backend} to use it anyway, or reinstall it for this GPU")


def resolve_backend(backend: str, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor | None = None) -> str:
    """The concrete backend ``backend`` means for these tensors (``B`` lets ``auto`` check sizes, too)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r} is not one of {BACKENDS}")
        if not _runs_on_device(backend, u):
            # one environment for GPU training and CPU prediction: the override applies where it can run
            _warn_once(f"{BACKEND_ENV}={backend} cannot run on {u.device.type} tensors; choosing automatically "
                       "for them")
            backend = "auto"
    if backend == "auto":
        if kernel_supports(u, A) and _backend_works("mamba_ssm", u):
            return "mamba_ssm"
        if _triton_takes(u, A, B) and _backend_works("triton", u):
            return "triton"
        if not u.is_cuda and cpu_kernel_supports(u):
            return "cpu_kernel"
        return "torch"
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """Selective scan (S6), the semantics of ``mamba_ssm.selective_scan_fn``.

    Args:
        u, delta: (batch, dim, length).
        A: (dim, state), real (negative for a decaying state).
        B, C: (batch, state, length) or (batch, groups, state, length); channel ``d`` uses group
            ``d // (dim // groups)``.
        D, delta_bias: (dim,) or None. z: (batch, dim, length) or None (output gate ``silu(z)``).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step, (batch, dim, state).
        backend: ``auto``, ``reference``, ``torch``, ``cpu_kernel``, ``triton`` or ``mamba_ssm``.
            ``auto``: on CUDA tensors mamba_ssm when it imports, else triton, else torch; on CPU the
            compiled C kernel when it builds here (fp32/fp16/bf16), else torch.

    The recurrence runs in fp32 (fp64 for fp64 inputs) whatever the input dtype and an outer
    autocast; ``y`` comes back in ``u``'s dtype, the last state in the compute dtype.
    """
    name = resolve_backend(backend, u, A, B)
    return _IMPLEMENTATIONS[name](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state)
