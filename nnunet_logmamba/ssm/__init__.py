"""One selective-scan (S6) core for CPU and GPU, shared by ``nnunet_logmamba`` and ``vemamba_iso``.

    from nnunet_logmamba.ssm import selective_scan
    y = selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False, backend="auto")

Backends: ``reference`` (sequential ground truth), ``torch`` (fast, chunked, pure PyTorch),
``cpu_kernel`` (fused C kernel built on first use by the machine's compiler, CPU),
``triton`` (fused Triton kernels, GPU, no compiler needed), ``mamba_ssm`` (CUDA kernel, optional extra),
``auto`` (fastest available for the tensors' device).
"""
from .chunked import selective_scan_chunked
from .cpu_kernel import cpu_kernel_status, selective_scan_cpu_kernel
from .cuda_kernel import mamba_ssm_status
from .dispatch import BACKENDS, auto_backend_reason, available_backends, resolve_backend, selective_scan
from .reference import selective_scan_reference
from .triton_kernel import selective_scan_triton, triton_status

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_chunked", "resolve_backend",
           "available_backends", "mamba_ssm_status", "BACKENDS", "selective_scan_triton", "triton_status",
           "auto_backend_reason", "cpu_kernel_status", "selective_scan_cpu_kernel"]
