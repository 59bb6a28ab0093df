"""Degradation encoder learned with MoCo (InfoNCE, momentum key encoder, queue of negatives).

Positives are two sub-volumes of the same degraded volume (same content statistics and same
degradation); negatives are the queue of keys from other volumes / other degradations.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class DegradationEncoder(nn.Module):
    """Small 3D CNN: degraded patch (batch, 1, D, H, W) -> representation (batch, representation_dim)."""

    def __init__(self, representation_dim: int = 64, width: int = 16):
        super().__init__()
        self.representation_dim = representation_dim
        self.features = nn.Sequential(
            nn.Conv3d(1, width, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.1),
            nn.Conv3d(2 * width, representation_dim, 3, stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3, 4))


class MoCoDegradationLearner(nn.Module):
    """MoCo v1/v2 wrapper around :class:`DegradationEncoder` for contrastive pre-training."""

    def __init__(self, encoder: DegradationEncoder, projection_dim: int = 64, queue_size: int = 1024,
                 momentum: float = 0.99, temperature: float = 0.07):
        super().__init__()
        rep = encoder.representation_dim
        self.query_encoder = encoder
        self.query_head = nn.Sequential(nn.Linear(rep, rep), nn.LeakyReLU(0.1), nn.Linear(rep, projection_dim))
        self.key_encoder = copy.deepcopy(encoder)
        self.key_head = copy.deepcopy(self.query_head)
        for p in list(self.key_encoder.parameters()) + list(self.key_head.parameters()):
            p.requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for online, target in ((self.query_encoder, self.key_encoder), (self.query_head, self.key_head)):
            for p_q, p_k in zip(online.parameters(), target.parameters()):
                p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[0]
        idx = (self.queue_pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_pointer.copy_((self.queue_pointer + keys.shape[0]) % size)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        """InfoNCE loss for two views (batch, 1, D, H, W) whose rows are positive pairs."""
        q = F.normalize(self.query_head(self.query_encoder(view_a)), dim=1)
        with torch.no_grad():
            self._momentum_update()
            k = F.normalize(self.key_head(self.key_encoder(view_b)), dim=1)
        positives = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ self.queue.clone().t()
        logits = torch.cat([positives, negatives], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        self._enqueue(k)
        return loss
