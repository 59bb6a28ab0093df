"""A small selective scan run by a backend and by the reference, output and gradients side by side.

The one check behind ``auto``'s probe of a fast backend (:mod:`.dispatch`) and ``nnunet_logmamba
doctor``'s parity report; each judges the pairs by its own rule.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .reference import selective_scan_reference

#: what the pairs hold, in order
NAMES = ("y", "du", "ddelta", "dA", "dB", "dC", "dD")


def scan_and_reference(scan: Callable, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       groups: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(scan's, reference's)]`` output and gradients (``NAMES``) on a tiny problem: batch 2, 4 channels,
    state 3, length 33 (odd, so that it crosses chunk edges), D, z, delta_bias and softplus on; B and C of
    shape (2, 3, 33), or (2, ``groups``, 3, 33) for ``groups`` > 1.

    ``scan`` takes ``selective_scan``'s arguments and gets u, delta, B, C, z in ``dtype`` on ``device`` (A, D,
    delta_bias in fp32); the reference runs in fp32 on CPU from the same values. Autograd runs whatever the
    caller opened (no_grad, inference_mode, autocast), without touching the global random generator.
    Exceptions of ``scan`` propagate; a gradient it does not give comes back as NaN.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 4, 3, 33
    bc_shape = (batch, state, length) if groups == 1 else (batch, groups, state, length)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        def rand(*shape, scale=1.0):
            return torch.randn(*shape, generator=generator, device="cpu") * scale

        inputs = {"u": rand(batch, dim, length), "delta": rand(batch, dim, length, scale=0.5),
                  "A": -torch.rand(dim, state, generator=generator, device="cpu") - 0.5,
                  "B": rand(*bc_shape), "C": rand(*bc_shape), "D": rand(dim), "z": rand(batch, dim, length),
                  "delta_bias": rand(dim, scale=0.1)}
        differentiated = ("u", "delta", "A", "B", "C", "D")
        found = []
        for run, where, cast in ((scan, device, dtype), (selective_scan_reference, torch.device("cpu"), None)):
            xs = {k: (v if cast is None or k in ("A", "D", "delta_bias") else v.to(cast)).to(where).requires_grad_()
                  for k, v in inputs.items()}
            y = run(**xs, delta_softplus=True)
            grads = torch.autograd.grad(y.float().square().sum(), [xs[k] for k in differentiated], allow_unused=True)
            # a gradient the scan does not give is NaN, so that every rule fails it
            grads = [torch.full_like(xs[k], float("nan")) if g is None else g for k, g in zip(differentiated, grads)]
            found.append([y.detach().float().cpu()] + [g.detach().float().cpu() for g in grads])
    return list(zip(*found))
