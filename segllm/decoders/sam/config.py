"""Hyperparameters of the SAM-style mask decoder (light: no torch, so configs read fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SamDecoderConfig"]


@dataclass
class SamDecoderConfig:
    """A SAM-style promptable decoder with its own small ViT image encoder (pure PyTorch).

    Attributes:
        image_size: side of the square input, pixels (image resized longest side + padded).
        patch_size: ViT patch size; the feature map is image_size / patch_size per side.
        encoder_dim, encoder_depth, encoder_heads: the image encoder ViT.
        dim: the decoder's width (= the prompt width).
        depth, heads, mlp_dim: the two-way transformer.
        mean, std: normalisation on [0, 1] pixel values.
        box_head: also regress each mask's box from its output token.
        encoder: "vit" (a plain ViT with patches of ``patch_size``) or "conv" (a convolutional
            backbone, :class:`segllm.decoders.convnet.ConvBackbone`, of stride ``patch_size``,
            width ``encoder_dim`` and ``encoder_depth`` residual blocks per resolution;
            ``encoder_heads`` unused).
    """

    kind: Literal["sam"] = "sam"
    image_size: int = 256
    patch_size: int = 16
    encoder_dim: int = 192
    encoder_depth: int = 4
    encoder_heads: int = 3
    dim: int = 256
    depth: int = 2
    heads: int = 8
    mlp_dim: int = 1024
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    box_head: bool = False
    encoder: Literal["vit", "conv"] = "vit"
