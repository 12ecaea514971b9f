"""Hyperparameters of the HIPIE-R50 mask decoder used by the released SegLLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from segllm.errors import ConfigError

__all__ = ["HipieDecoderConfig"]


@dataclass
class HipieDecoderConfig:
    """HIPIE with a ResNet-50 backbone, as SegLLM builds it.

    The defaults are the full released configuration; :meth:`reduced` gives the small
    configuration of the golden fixture (same module tree and parameter names, fewer channels,
    layers and queries).

    Attributes:
        depth: ResNet depth (only 50 is supported: blocks 3, 4, 6, 3).
        num_groups: groups of the 3x3 bottleneck convolutions.
        width_per_group: bottleneck width of res2 per group (doubles every stage).
        stem_out_channels: channels of the 7x7 stem convolution.
        res2_out_channels: output channels of res2 (doubles every stage).
        hidden_dim: transformer width.
        num_heads: attention heads (deformable attention, decoder self-attention, VL fusion).
        num_levels: feature levels (res3, res4, res5 and one extra stride-2 conv on res5).
        enc_points, dec_points: sampling points per head and level of the deformable attention.
        enc_layers, dec_layers: transformer encoder / decoder layers.
        num_vl_layers: encoder layers preceded by the vision-language fusion block.
        dim_feedforward: FFN width of encoder and decoder layers.
        vl_hidden_dim: inner width of the bidirectional VL attention.
        vl_dropout: dropout on the VL attention probabilities (training only).
        num_queries: foreground queries (= two-stage proposals).
        num_bg_queries: learned background queries, placed before the foreground ones.
        lang_dim: width of the "language" tokens (the LLM's prompt tokens).
        num_prompt_tokens, num_ref_tokens: prompt tokens per prompt; the first ``num_ref_tokens``
            form class 1 ([REF]) and the rest class 2 ([SEG], the target).
        controller_layers: layers of the MLP producing the dynamic mask-head parameters.
        dynamic_mask_channels: channels of the dynamic (CondInst) mask head.
        mask_out_stride: stride of the predicted mask logits (4: 256x256 for a 1024 input).
        image_size: side of the square input frame.
        pixel_mean, pixel_std: normalisation of 0..255 RGB values (applied after padding).
        nms_threshold: IoU threshold of the class-wise NMS in post-processing.
        max_instances: most instances kept by post-processing.
        mask_threshold: probability threshold for binary masks.
    """

    kind: Literal["hipie"] = "hipie"
    depth: int = 50
    num_groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    hidden_dim: int = 256
    num_heads: int = 8
    num_levels: int = 4
    enc_points: int = 4
    dec_points: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    num_vl_layers: int = 1
    dim_feedforward: int = 2048
    vl_hidden_dim: int = 2048
    vl_dropout: float = 0.1
    num_queries: int = 100
    num_bg_queries: int = 10
    lang_dim: int = 768
    num_prompt_tokens: int = 8
    num_ref_tokens: int = 4
    controller_layers: int = 3
    dynamic_mask_channels: int = 8
    mask_out_stride: int = 4
    image_size: int = 1024
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    nms_threshold: float = 0.7
    max_instances: int = 100
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.depth != 50:
            raise ConfigError(f"only ResNet-50 is supported, got depth {self.depth}")
        if self.num_groups != 1:
            raise ConfigError("grouped bottleneck convolutions (ResNeXt) are not supported")
        if self.hidden_dim % self.num_heads or self.vl_hidden_dim % self.num_heads:
            raise ConfigError("hidden_dim and vl_hidden_dim must be divisible by num_heads")
        if self.hidden_dim % 32:
            raise ConfigError("hidden_dim must be a multiple of 32 (GroupNorm(32) and the mask head)")
        if not 0 < self.num_ref_tokens < self.num_prompt_tokens:
            raise ConfigError("num_ref_tokens must be in (0, num_prompt_tokens)")
        if not 1 <= self.num_vl_layers <= self.enc_layers:
            raise ConfigError("num_vl_layers must be in [1, enc_layers]")
        if self.num_levels != 4:
            raise ConfigError("the mask head and the input projections assume 4 feature levels")
        if self.image_size % 32:
            raise ConfigError("image_size must be a multiple of 32")

    @property
    def block_counts(self) -> tuple[int, int, int, int]:
        """Bottleneck blocks of res2..res5."""
        return (3, 4, 6, 3)

    @property
    def backbone_channels(self) -> tuple[int, int, int]:
        """Output channels of res3, res4, res5."""
        return (self.res2_out_channels * 2, self.res2_out_channels * 4, self.res2_out_channels * 8)

    @property
    def num_classes(self) -> int:
        """Classes the prompt tokens define: 1 = [REF], 2 = [SEG]."""
        return 2

    @property
    def vl_gamma_init(self) -> float:
        """The constructor value of the fusion layer scales ``gamma_v`` / ``gamma_l``.

        The released loader drops the stored scales and keeps this value (see
        :func:`segllm.decoders.hipie.decoder.load_released_hipie`).
        """
        return 1.0 / self.enc_layers

    @classmethod
    def reduced(cls) -> HipieDecoderConfig:
        """The reduced configuration of the golden fixture (``hipie/config.json``)."""
        return cls(
            width_per_group=8,
            res2_out_channels=32,
            stem_out_channels=16,
            enc_layers=2,
            dec_layers=2,
            num_queries=20,
            num_bg_queries=2,
            dim_feedforward=256,
            vl_hidden_dim=256,
        )
