"""Mask refinement for the direct decoder: coarse masks on the feature grid -> finer masks that
follow the image's edges.

Why (issue 13): the direct decoder reads its masks off a stride-4 grid (32 x 32 for a 128-pixel
image). The bundled world's targets are small (median ~17 pixels across), so a cell is a quarter
of an object and a mask that is one cell off at each side loses half its IoU: even a perfect
stride-4 probability map, upsampled and thresholded, scores only ~93 cIoU on the test split
(~98 at stride 2), and the trained model's masks on the right object scored ~60 IoU. Deciding
*which* object is the coarse decoder's job; where the object's edge lies is a local question that
a few convolutions over the full-resolution image answer (the world's objects are flat-coloured
shapes with sharp edges). The refiner therefore adds a residual to the upsampled coarse logits,
read from full-resolution image features, the upsampled coarse logits themselves and the
referenced earlier mask (parts and neighbours of a referent share its edges). Its last layer
starts at zero, so switching it on for a trained model keeps that model's masks (upsampled).

Shapes: B images, N prompts, g coarse grid side (image_size / stride), G output side
(image_size / out_stride), k = G / g, W ``width``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskRefiner"]


class MaskRefiner(nn.Module):
    """Full-resolution image features, computed once per image, and the per-prompt refinement.

    Args:
        image_size: S, side of the decoder's square input in pixels.
        stride: the coarse decoder's stride (g = S / stride).
        out_stride: the refined masks' stride (1 or 2; G = S / out_stride).
        width: W, channels of the full-resolution features and of the refinement convolutions.
    """

    def __init__(self, image_size: int, stride: int, out_stride: int, width: int) -> None:
        super().__init__()
        if out_stride not in (1, 2) or stride % out_stride or stride <= out_stride:
            raise ValueError(f"out_stride must be 1 or 2 and finer than the coarse stride {stride}, got {out_stride}")
        self.out_size = image_size // out_stride
        self.factor = stride // out_stride  # k
        self.width = width
        # no coordinate channels: the coarse logits already say where; the stem finds colour edges
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=out_stride, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        )
        # input: W image channels, the 2 upsampled coarse logits ([REF], [SEG]) and the referent
        self.body = nn.Sequential(
            nn.Conv2d(width + 3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),  # wider reach: a cell and a half
            nn.GELU(),
        )
        self.out = nn.Conv2d(width, 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as plain upsampling of the coarse masks
        nn.init.zeros_(self.out.bias)

    @property
    def packed_channels(self) -> int:
        """Channels the full-resolution features take on the coarse grid: W * k * k."""
        return self.width * self.factor**2

    def encode(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed images -> [B, W * k * k, g, g]: the full-resolution
        features folded onto the coarse grid (pixel unshuffle), so that they travel with the
        decoder's image features (one tensor per image, cached per session like them)."""
        return F.pixel_unshuffle(self.stem(pixels), self.factor)

    def forward(self, packed: Tensor, coarse: Tensor, ref_masks: Tensor | None) -> Tensor:
        """Refine N prompts' masks.

        Args:
            packed: [N, W * k * k, g, g] each prompt's image's :meth:`encode` output.
            coarse: [N, 2, g, g] coarse mask logits ([REF], [SEG]).
            ref_masks: [N, G, G] float in [0, 1], each prompt's referenced earlier mask in the
                output frame (zeros or ``None``: none).

        Returns:
            [N, 2, G, G] logits: the coarse logits upsampled (bilinear) plus the learned residual.
        """
        g_out = self.out_size
        up = F.interpolate(coarse, size=(g_out, g_out), mode="bilinear", align_corners=False)
        image = F.pixel_shuffle(packed, self.factor)  # [N, W, G, G]
        ref = ref_masks[:, None].to(up.dtype) if ref_masks is not None else up.new_zeros(up.shape[0], 1, g_out, g_out)
        # the coarse masks enter as probabilities: bounded, whatever the logits' scale
        x = torch.cat([image.to(up.dtype), up.sigmoid(), ref], dim=1)
        # channels-last: oneDNN's layout for these convolutions; with the odd channel count
        # (W + 3) the default layout is reordered on every call (about 3x slower on the CPU)
        x = x.contiguous(memory_format=torch.channels_last)
        return up + self.out(self.body(x))
