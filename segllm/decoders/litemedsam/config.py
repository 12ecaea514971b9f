"""Hyperparameters of the LiteMedSAM mask decoder (light: no torch, so configs read fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["LiteMedSamDecoderConfig"]


@dataclass
class LiteMedSamDecoderConfig:
    """LiteMedSAM (SAM's prompt encoder and mask decoder on a TinyViT-5M image encoder) as the
    mask decoder; see :mod:`segllm.decoders.litemedsam.decoder`. The defaults are LiteMedSAM's sizes, the
    only ones its pretrained weights fit.

    Attributes:
        pretrained_path: a LiteMedSAM checkpoint read when a model is *built* (a SegLLM checkpoint
            stores the weights itself): a ``.pth`` (read with ``torch.load(weights_only=True)``)
            or the ``.safetensors`` copy that ``segllm parts`` writes. None: random weights.
        image_size: side of the square input, pixels (image resized longest side + padded).
        embed_dims, depths, num_heads, window_sizes: the four TinyViT stages (stage 0 is
            convolutional; its ``num_heads`` and ``window_sizes`` entries are unused).
        mlp_ratio, mbconv_expand_ratio, local_conv_size: TinyViT block widths and its depthwise
            convolution's kernel.
        dim: the SAM decoder's width (= the prompt width, 256 for the pretrained weights).
        depth, heads, mlp_dim: SAM's two-way transformer.
        num_multimask_outputs: SAM's extra mask tokens (they take part in attention; only mask
            token 0, the single-mask output, is decoded).
        iou_head_depth, iou_head_hidden_dim: SAM's IoU prediction MLP.
        normalize: "minmax" (the resized image scaled to [0, 1] by its own minimum and maximum,
            as LiteMedSAM's inference does) or "unit" (pixel / 255).
    """

    kind: Literal["litemedsam"] = "litemedsam"
    pretrained_path: str | None = None
    image_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    dim: int = 256
    depth: int = 2
    heads: int = 8
    mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    normalize: Literal["minmax", "unit"] = "minmax"
