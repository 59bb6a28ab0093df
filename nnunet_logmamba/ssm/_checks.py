"""Shape and dtype checks shared by every selective-scan backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ScanShape:
    """Sizes of one selective-scan call.

    batch, dim, length: of ``u``; state: of ``A``; groups: of ``B``/``C`` (1 when they are 3D).
    """

    batch: int
    dim: int
    length: int
    state: int
    groups: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence runs in: fp32 for half types and fp32, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> ScanShape:
    """Validate the shapes of a selective-scan call and return its sizes.

    Raises ``ValueError`` naming the offending argument and the expected shape.
    """
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, state), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported; use a real (negative) A")
    state = A.shape[1]
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            g = 1
            expected = (batch, state, length)
            ok = tuple(t.shape) == expected
        elif t.dim() == 4:
            g = t.shape[1]
            expected = (batch, g, state, length)
            ok = tuple(t.shape) == expected and g > 0 and dim % g == 0
        else:
            ok, g, expected = False, 1, (batch, state, length)
        if not ok:
            raise ValueError(
                f"{name} must be (batch={batch}, state={state}, length={length}) or "
                f"(batch, groups, state, length) with groups dividing dim={dim}; got {tuple(t.shape)}"
            )
        if groups is not None and g != groups:
            raise ValueError(f"B and C must have the same number of groups, got {groups} and {g}")
        groups = g
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got shape {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all selective-scan tensors must be on one device, got {sorted(map(str, devices))}")
    return ScanShape(batch, dim, length, state, groups)


def as_grouped(t: torch.Tensor) -> torch.Tensor:
    """B or C as (batch, groups, state, length)."""
    return t.unsqueeze(1) if t.dim() == 3 else t
