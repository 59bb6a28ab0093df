"""Backend choice for :func:`selective_scan`."""
from __future__ import annotations

import os

import torch

from .chunked import selective_scan_chunked
from .cuda_kernel import kernel_supports, mamba_ssm_status, selective_scan_cuda_kernel
from .reference import selective_scan_reference

BACKENDS = ("auto", "reference", "torch", "mamba_ssm")
_IMPLEMENTATIONS = {
    "reference": selective_scan_reference,
    "torch": selective_scan_chunked,
    "mamba_ssm": selective_scan_cuda_kernel,
}
#: Environment variable that overrides ``backend="auto"`` everywhere (benchmarks, debugging).
BACKEND_ENV = "BIOIMAGE_MAMBA_SCAN_BACKEND"


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` here (``mamba_ssm`` only on CUDA with the extra installed)."""
    names = ["reference", "torch"]
    if torch.device(device).type == "cuda" and mamba_ssm_status()[0]:
        names.append("mamba_ssm")
    return names


def resolve_backend(backend: str, u: torch.Tensor, A: torch.Tensor) -> str:
    """The concrete backend ``backend`` means for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "mamba_ssm" if kernel_supports(u, A) else "torch"
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
        backend: ``auto``, ``reference``, ``torch`` or ``mamba_ssm``.

    The recurrence runs in fp32 (fp64 for fp64 inputs) whatever the input dtype and an outer
    autocast; ``y`` comes back in ``u``'s dtype, the last state in the compute dtype.
    """
    name = resolve_backend(backend, u, A)
    return _IMPLEMENTATIONS[name](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state)
