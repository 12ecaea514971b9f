"""A small convolutional image backbone, usable as a mask decoder's image encoder and (wrapped by
:class:`segllm.model.vision.ConvVisionModel`) as the LLM's vision tower.

Why a convnet: the bundled model's targets are small (median ~300 pixels, ~17 pixels across in a
128-pixel image), and from-scratch ViTs with 8-16 pixel patches learned them more slowly than a
convolutional stem in the project's experiments (issue 13). Coordinate channels are appended to
the input so that features know where they are (positional questions need that).

Shapes: B images, S input side, g = S / stride feature grid side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where the width allows, else the largest divisor <= 8."""
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResidualBlock(nn.Module):
    """Pre-norm residual block of two 3x3 convolutions: [B, C, h, w] -> [B, C, h, w]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.gelu(self.norm1(x)))
        return x + self.conv2(F.gelu(self.norm2(h)))


def coordinate_channels(b: int, h: int, w: int, *, device, dtype) -> Tensor:
    """[B, 2, h, w]: x and y of each pixel centre, in [-1, 1]."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, h, w]: x, y
    return grid[None].expand(b, 2, h, w)


class ConvBackbone(nn.Module):
    """pixels [B, 3, S, S] -> features [B, out_dim, S / stride, S / stride].

    A stride-4 stem (two 3x3 stride-2 convolutions), ``depth`` residual blocks at stride 4, then
    one stride-2 convolution and ``depth`` blocks per further halving until ``stride``, and a
    1x1 projection to ``out_dim`` followed by a channel LayerNorm.

    Args:
        image_size: S, side of the square input in pixels (a multiple of ``stride``).
        stride: 4, 8 or 16: input pixels per feature cell.
        width: channels at stride 4 (doubled at each further halving, capped at ``2 * width``).
        depth: residual blocks per resolution.
        out_dim: output channels.
    """

    def __init__(self, image_size: int, stride: int, width: int, depth: int, out_dim: int) -> None:
        super().__init__()
        if stride not in (4, 8, 16):
            raise ValueError(f"stride must be 4, 8 or 16, got {stride}")
        if image_size % stride:
            raise ValueError(f"image_size {image_size} is not a multiple of stride {stride}")
        self.image_size = image_size
        self.stride = stride
        self.grid_size = image_size // stride
        half = max(8, width // 2)
        self.stem = nn.Sequential(
            nn.Conv2d(3 + 2, half, 3, stride=2, padding=1),
            nn.GroupNorm(_groups(half), half),
            nn.GELU(),
            nn.Conv2d(half, width, 3, stride=2, padding=1),
        )
        stages: list[nn.Module] = [nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))]
        c = width
        for _ in range(int(math.log2(stride // 4))):
            nxt = min(2 * width, c * 2)
            stages.append(nn.Sequential(nn.GroupNorm(_groups(c), c), nn.GELU(), nn.Conv2d(c, nxt, 3, stride=2, padding=1),
                                        *(ResidualBlock(nxt) for _ in range(depth))))
            c = nxt
        self.stages = nn.Sequential(*stages)
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.proj = nn.Conv2d(c, out_dim, 1)
        self.out_dim = out_dim

    def forward(self, pixels: Tensor) -> Tensor:
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels must be [B, 3, {s}, {s}], got {list(pixels.shape)}")
        x = pixels.to(self.proj.weight.dtype)
        x = torch.cat([x, coordinate_channels(x.shape[0], s, s, device=x.device, dtype=x.dtype)], dim=1)
        x = self.stages(self.stem(x))
        return self.proj(F.gelu(self.out_norm(x)))
