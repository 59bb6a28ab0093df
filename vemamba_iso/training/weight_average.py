"""Exponential moving average (EMA) of a network's trained weights.

Image-restoration trainings keep an EMA of the weights and ship it instead of the last weights: with a small
batch the last Adam steps scatter the weights around the minimum, and the average sits nearer its centre.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """EMA of the given parameters, ``average <- d * average + (1 - d) * weight`` after every step.

    The decay warms up as ``d = min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so far, so that an
    average started on fresh or freshly loaded weights follows them at first instead of holding on to its
    starting point for ``1 / (1 - decay)`` steps.

    Args:
        named_parameters: ``(name, parameter)`` pairs to average (the trained ones; frozen weights stay as
            they are in the network).
        decay: the largest decay, in (0, 1): once reached (after about ``9 / (1 - decay)`` updates) the average
            spans about the last ``1 / (1 - decay)`` steps (a thousand for 0.999); before that its weights'
            mean age is about a tenth of the updates so far.
    """

    def __init__(self, named_parameters, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight-average decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.parameters = dict(named_parameters)
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (call after each optimiser step)."""
        weight = 1.0 - self.current_decay()
        for name, p in self.parameters.items():
            self.average[name].lerp_(p.detach(), weight)
        self.updates += 1

    @contextmanager
    def applied(self):
        """Put the averaged weights into the network for the ``with`` block, then restore the trained ones."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(saved[name])

    def state_dict(self) -> dict:
        """The averages, the decay and the update count (for a checkpoint)."""
        return {"decay": self.decay, "updates": self.updates,
                "average": {name: t.detach().clone() for name, t in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the names must be the ones averaged here."""
        missing = set(self.average) ^ set(state["average"])
        if missing:
            raise ValueError(f"the weight average of the checkpoint holds other tensors ({sorted(missing)[:3]} ...)")
        for name, t in state["average"].items():
            self.average[name].copy_(t)
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
