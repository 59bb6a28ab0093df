"""nnU-Net v2 trainers with LoG-VMamba blocks (see :mod:`.trainers`)."""
from .trainers import *  # noqa: F401,F403  (every trainer class, listed in TRAINERS)
from .trainers import TRAINERS, network_builder, set_budget

__all__ = sorted(TRAINERS) + ["TRAINERS", "network_builder", "set_budget"]
