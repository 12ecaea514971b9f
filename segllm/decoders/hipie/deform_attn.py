"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query looks at ``P`` points per head and feature level around its reference point (or
inside its reference box) and returns the attention-weighted sum of the bilinearly sampled
values. Sampling uses :func:`torch.nn.functional.grid_sample` (``align_corners=False``, zeros
outside the map), one call per feature level with every head, query and point batched
together, so no compiled extension is needed and any device/dtype works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_sample"]


def multi_scale_deformable_sample(
    value: Tensor, spatial_shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Attention-weighted bilinear sampling of several feature levels.

    Args:
        value: [B, S, M, Dh] values of all levels, level-major and row-major
            (S = sum of H_l * W_l, M heads of width Dh).
        spatial_shapes: (H_l, W_l) of the L levels.
        locations: [B, Q, M, L, P, 2] sampling points as (x, y) in [0, 1] of each level
            (points outside sample zeros).
        weights: [B, Q, M, L, P] attention weights.

    Returns:
        [B, Q, M * Dh].
    """
    dtype = value.dtype
    if value.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # CPU grid_sample in reduced precision returns NaN here; sample in float32 instead
        value, locations, weights = value.float(), locations.float(), weights.float()
    b, _, m, dh = value.shape
    q = locations.shape[1]
    grids = 2 * locations - 1  # grid_sample's [-1, 1] convention
    # [B, Q, M, L, P] -> [B*M, 1, Q, L, P]
    attn = weights.transpose(1, 2).reshape(b * m, 1, q, *weights.shape[-2:])
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    out = value.new_zeros(b * m, dh, q)
    for level, (h, w) in enumerate(spatial_shapes):
        # [B, HW, M, Dh] -> [B*M, Dh, H, W]
        v = per_level[level].flatten(2).transpose(1, 2).reshape(b * m, dh, h, w)
        # [B, Q, M, P, 2] -> [B*M, Q, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*M, Dh, Q, P]
        out = out + torch.einsum("bdqp,bxqp->bdq", sampled, attn[..., level, :])
    out = out.view(b, m * dh, q)
    return out.transpose(1, 2).to(dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``num_levels`` feature maps.

    Parameter names match Deformable DETR's ``MSDeformAttn`` (``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``).
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_levels, self.num_heads, self.num_points = dim, num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: Tensor, reference: Tensor, value_input: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Attend from ``query`` to the multi-level ``value_input``.

        Args:
            query: [B, Q, C].
            reference: [B, Q, L, 2] reference points (x, y) or [B, Q, L, 4] reference boxes
                (cx, cy, w, h), normalised to [0, 1] per level.
            value_input: [B, S, C] flattened features of all levels.
            spatial_shapes: (H_l, W_l) per level.

        Returns:
            [B, Q, C].
        """
        b, q, _ = query.shape
        m, nl, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(b, value_input.shape[1], m, self.dim // m)
        offsets = self.sampling_offsets(query).view(b, q, m, nl, p, 2)
        weights = self.attention_weights(query).view(b, q, m, nl * p).softmax(-1).view(b, q, m, nl, p)
        if reference.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference.shape[-1] == 4:
            locations = reference[:, :, None, :, None, :2] + offsets / p * reference[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"reference must end in 2 or 4 values, got {reference.shape[-1]}")
        out = multi_scale_deformable_sample(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
