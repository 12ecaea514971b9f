"""Small building blocks shared by the HIPIE modules."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from segllm.decoders.layers import MLP

__all__ = ["MLP", "FeatureResizer", "box_cxcywh_to_xyxy", "inverse_sigmoid", "sine_box_embedding"]


class FeatureResizer(nn.Module):
    """Linear projection and LayerNorm (eps 1e-12): [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_norm(self.fc(x))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x clamped below at ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def sine_box_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of reference boxes (DAB/DINO style): [B, Q, 4] (cx, cy, w, h) -> [B, Q, 4 * F].

    Each coordinate is scaled by 2*pi and divided by geometric frequencies; sin/cos are
    interleaved. The blocks come out in the order (cy, cx, w, h).
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = boxes[..., None] * (2 * math.pi) / dim_t  # [B, Q, 4, F]
    emb = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    emb = emb[..., [1, 0, 2, 3], :]
    return emb.flatten(-2).to(boxes.dtype)
