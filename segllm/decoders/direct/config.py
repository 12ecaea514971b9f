"""Hyperparameters of the direct mask decoder (light: no torch, so configs read fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DirectDecoderConfig"]


@dataclass
class DirectDecoderConfig:
    """A mask decoder whose masks are a dot product between the prompt and per-pixel features.

    Attributes:
        image_size: side of the square input, pixels (image resized longest side + padded).
        stride: input pixels per feature cell (4, 8 or 16); masks come out at
            ``image_size / stride`` per side.
        encoder_width, encoder_depth: the convolutional image encoder
            (:class:`segllm.decoders.convnet.ConvBackbone`: channels at stride 4, residual blocks
            per resolution).
        dim: width of the prompt tokens and of the encoder's output features.
        fuse_dim: width of the prompt-modulated features the masks are read from.
        fuse_depth: residual 3x3 convolution blocks after the prompt's modulation (local context:
            the pixels around a pixel).
        context_grid: side of the pooled grid that one self-attention block mixes (global
            context: "left-most", "largest", "left of instance 1"); 0 turns it off. Must divide
            the feature grid.
        heads: attention heads of that block.
        context_depth: self-attention blocks in that global branch (1: one, as the bundled model).
            The blocks after the first start as the identity (their attention and MLP outputs at
            zero), so raising it on a trained model (``model.decoder`` with ``model.init``)
            changes nothing until they train: more room for relations over the whole image
            ("the second red star from the left").
        attributes: attribute matching (empty: off): label groups and their class counts (class
            0: background, or "not named" for a prompt), the same as ``SegLLMConfig.dense.groups``.
            Each pixel's classes are predicted from the encoder's features and each prompt's
            named classes from its [SEG] tokens (both supervised by the model's dense labels),
            and the [SEG] mask gains, per group, the expected log-probability of the prompt's
            named class at each pixel: "the red star" marks the pixels that are both red and
            star-shaped, by construction, as soon as the two classifiers have learned.
        ref_prior: the mask each prompt's round refers to (mask memory: "left of instance 1")
            also enters the decoder, in the decoder's output frame: as a map added to the
            modulated features before the local and global context (where the referent is), and
            as the mean of the encoder's features under it, which modulates the features and
            shifts the [SEG] query (what the referent looks like: "coloured like instance 3").
            Its layers start at zero, so switching it on for a trained model changes nothing
            until it trains. The model passes the map only with mask memory on.
        refine_stride: 0 (off): masks come out on the feature grid (``image_size / stride``
            per side). 1 or 2: a refinement stage (:mod:`segllm.decoders.direct.refine`) brings
            them to ``image_size / refine_stride`` per side, adding a residual read from
            full-resolution image features to the upsampled coarse masks (its last layer starts
            at zero: switching it on for a trained model keeps that model's masks, upsampled).
        refine_width: channels of the refinement stage.
        mean, std: normalisation of [0, 1] pixel values.
    """

    kind: Literal["direct"] = "direct"
    image_size: int = 128
    stride: int = 4
    encoder_width: int = 64
    encoder_depth: int = 2
    dim: int = 128
    fuse_dim: int = 64
    fuse_depth: int = 1
    context_grid: int = 8
    heads: int = 4
    context_depth: int = 1
    attributes: dict[str, int] = field(default_factory=dict)
    ref_prior: bool = False
    refine_stride: int = 0
    refine_width: int = 16
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
