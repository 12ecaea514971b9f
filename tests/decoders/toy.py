"""A toy mask decoder registered from outside the package, to test the decoder registry.

Image features: one 1x1 convolution on 4x4-pooled pixels, [B, dim, S/4, S/4]. Masks: each
channel's logits are the dot product of the features with the mean of its half of the prompt
tokens ([REF] = the first ``num_ref_tokens``, [SEG] = the rest), [N, 2, S/4, S/4].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.config import PromptHeadConfig
from segllm.decoders.base import REF, SEG, DecoderOutput, Frame, MaskDecoder, check_image, resize_and_pad
from segllm.errors import ConfigError


@dataclass
class ToyDecoderConfig:
    kind: Literal["toy"] = "toy"
    image_size: int = 32
    dim: int = 32


class ToyDecoder(MaskDecoder):
    def __init__(self, config: ToyDecoderConfig, *, num_prompt_tokens: int, num_ref_tokens: int) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.num_prompt_tokens = num_prompt_tokens
        self.num_ref_tokens = num_ref_tokens
        self.prompt_dim = config.dim
        self.image_encoder = nn.Conv2d(3, config.dim, 1)
        self.iou_head = nn.Linear(config.dim, 1)

    @property
    def output_size(self) -> int:
        return self.image_size // 4

    def preprocess(self, image: Tensor) -> tuple[Tensor, Frame]:
        height, width = check_image(image)
        frame = Frame.fit(height, width, self.image_size)
        return resize_and_pad(image.float()[None] / 255.0, frame)[0], frame

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.image_encoder(F.avg_pool2d(pixels, 4))  # [B, dim, S/4, S/4]

    def forward(self, image_features: Tensor, prompts: Tensor, batch_index: Tensor) -> DecoderOutput:
        halves = torch.zeros(prompts.shape[0], 2, prompts.shape[2], dtype=prompts.dtype, device=prompts.device)
        if self.num_ref_tokens:
            halves[:, REF] = prompts[:, : self.num_ref_tokens].mean(1)
        halves[:, SEG] = prompts[:, self.num_ref_tokens :].mean(1)
        feats = image_features[batch_index]  # [N, dim, h, w]
        masks = torch.einsum("nkc,nchw->nkhw", halves, feats)
        return DecoderOutput(mask_logits=masks, iou_scores=self.iou_head(halves)[..., 0])


def build_toy(config: ToyDecoderConfig, prompt_head: PromptHeadConfig, *, load_weights: bool = True) -> ToyDecoder:
    if prompt_head.dim != config.dim:
        raise ConfigError(f"prompt_head.dim ({prompt_head.dim}) must equal decoder.dim ({config.dim})")
    return ToyDecoder(config, num_prompt_tokens=prompt_head.num_tokens, num_ref_tokens=prompt_head.num_ref_tokens)
