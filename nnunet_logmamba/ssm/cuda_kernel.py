"""The ``mamba_ssm`` backend: mamba-ssm's fused CUDA kernel, when it is installed and importable.

mamba-ssm is an optional extra (``pip install 'bioimage-mamba[cuda]'``). Its package imports its
compiled extension unconditionally, so the import raises on machines without it (no GPU, wrong
CUDA, ``MAMBA_SKIP_CUDA_BUILD`` installs). We therefore import it lazily, once, and remember why it
failed so that ``doctor`` and error messages can say so.
"""
from __future__ import annotations

import functools

import torch

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
MAX_STATE = 256


@functools.lru_cache(maxsize=1)
def _load():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, OSError from a missing/mismatched .so, RuntimeError ...
        return None, f"{type(exc).__name__}: {exc}"
    return selective_scan_fn, None


def mamba_ssm_status() -> tuple[bool, str]:
    """(available, reason): whether mamba-ssm's kernel imports, and why not."""
    fn, err = _load()
    return (fn is not None, "importable" if fn is not None else err)


def kernel_supports(u: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether the CUDA kernel can take these tensors (device, dtype, state size)."""
    return u.is_cuda and u.dtype in _SUPPORTED and A.shape[1] <= MAX_STATE and _load()[0] is not None


def selective_scan_cuda_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                               delta_softplus=False, return_last_state=False):
    """mamba-ssm's kernel with its input contract met (common dtype, fp32 A/D/bias, contiguous)."""
    fn, err = _load()
    if fn is None:
        raise RuntimeError(
            "backend='mamba_ssm' was requested but mamba-ssm cannot be imported "
            f"({err}). Install the CUDA extra: pip install 'bioimage-mamba[cuda]', or use backend='torch'.")
    if not u.is_cuda:
        raise RuntimeError("backend='mamba_ssm' needs CUDA tensors; use backend='torch' on CPU")
    dtype = u.dtype if u.dtype in _SUPPORTED else torch.float32
    with torch.autocast("cuda", enabled=False):
        out = fn(u.to(dtype).contiguous(), delta.to(dtype).contiguous(), A.float().contiguous(),
                 B.to(dtype).contiguous(), C.to(dtype).contiguous(),
                 None if D is None else D.float().contiguous(),
                 None if z is None else z.to(dtype).contiguous(),
                 None if delta_bias is None else delta_bias.float().contiguous(),
                 delta_softplus, return_last_state)
    if return_last_state:
        y, last = out
        return y.to(u.dtype), last
    return out.to(u.dtype)
