"""Prediction heads: prompt-token classification, proposal objectness and the CondInst mask head.

Shapes: B = prompts, Q = queries, T = prompt tokens, C = hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BinaryClassifier",
    "MaskFeatureHead",
    "TokenAlignHead",
    "aligned_bilinear",
    "dynamic_mask_logits",
    "dynamic_param_sizes",
]


class TokenAlignHead(nn.Module):
    """Query x prompt-token alignment logits (GLIP's dot-product head, HIPIE's ``VL_Align``).

    ``logit[q, t] = <x_q, W(normalize(e_t) / 2) + b> / exp(log_scale) + <normalize(e_t), bias_lang> + bias0``
    """

    def __init__(self, dim: int, lang_dim: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(lang_dim))
        self.bias0 = nn.Parameter(torch.full((1,), -math.log((1 - prior_prob) / prior_prob)))
        self.dot_product_projection_text = nn.Linear(lang_dim, dim)

    def forward(self, x: Tensor, lang: Tensor) -> Tensor:
        """x: [B, Q, C], lang: [B, T, D] -> logits [B, Q, T]."""
        lang = F.normalize(lang, p=2, dim=-1)
        tokens = self.dot_product_projection_text(lang / 2.0)  # [B, T, C]
        token_bias = lang @ self.bias_lang + self.bias0  # [B, T]
        logits = x @ tokens.transpose(-1, -2) / self.log_scale.exp() + token_bias[:, None, :]
        return logits.clamp(-50000.0, 50000.0)


class BinaryClassifier(nn.Module):
    """Class-agnostic objectness of encoder proposals: [B, S, C] -> [B, S, 1]."""

    def __init__(self, dim: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.body = nn.Linear(dim, 1)
        nn.init.constant_(self.body.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, x: Tensor, lang: Tensor | None = None) -> Tensor:
        return self.body(x)


class MaskFeatureHead(nn.Module):
    """FPN-style head turning the encoder memory into the dynamic mask head's input.

    Levels 2 -> 1 -> 0 of the memory are fused top-down (nearest upsampling, 3x3 convs, ReLU),
    then reduced to ``dim // 32`` channels at level-0 resolution (stride 8).
    Names follow the original (``lay1``..``lay4``, ``jia_dcn``: a plain 3x3 conv).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lay1 = nn.Conv2d(dim, dim // 4, 3, padding=1)
        self.lay2 = nn.Conv2d(dim // 4, dim // 32, 3, padding=1)
        self.lay3 = nn.Conv2d(dim, dim, 3, padding=1)
        self.lay4 = nn.Conv2d(dim, dim, 3, padding=1)
        self.jia_dcn = nn.Conv2d(dim, dim, 3, padding=1)
        for conv in (self.lay1, self.lay2, self.lay3, self.lay4, self.jia_dcn):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, levels: list[Tensor]) -> Tensor:
        """levels: [B, C, H_l, W_l] for l = 0, 1, 2 (strides 8, 16, 32) -> [B, C/32, H_0, W_0]."""
        x = F.relu(self.lay3(levels[2]))
        x = levels[1] + F.interpolate(x, size=levels[1].shape[-2:], mode="nearest")
        x = F.relu(self.lay4(x))
        x = levels[0] + F.interpolate(x, size=levels[0].shape[-2:], mode="nearest")
        x = F.relu(self.jia_dcn(x))
        x = F.relu(self.lay1(x))
        return F.relu(self.lay2(x))


def dynamic_param_sizes(in_channels: int, channels: int, num_layers: int) -> tuple[list[int], list[int]]:
    """Weight and bias counts of each dynamic 1x1 conv layer (input has 2 extra coordinate channels)."""
    weights, biases = [], []
    for layer in range(num_layers):
        c_in = in_channels + 2 if layer == 0 else channels
        c_out = 1 if layer == num_layers - 1 else channels
        weights.append(c_in * c_out)
        biases.append(c_out)
    return weights, biases


def dynamic_mask_logits(
    mask_feats: Tensor, params: Tensor, centres: Tensor, *, stride: int, channels: int, num_layers: int
) -> Tensor:
    """CondInst dynamic mask head: per-query 1x1 conv stack over [rel. coords, mask features].

    Args:
        mask_feats: [B, F, H, W] shared mask features at ``stride``.
        params: [B, Q, P] generated parameters per query (weights of all layers, then biases).
        centres: [B, Q, 2] query centres (x, y) in input pixels.
        stride: pixel stride of ``mask_feats``.
        channels: hidden channels of the dynamic convs.
        num_layers: dynamic conv layers.

    Returns:
        [B, Q, H, W] mask logits at ``stride``.
    """
    b, f, h, w = mask_feats.shape
    q = params.shape[1]
    weight_nums, bias_nums = dynamic_param_sizes(f, channels, num_layers)
    splits = params.split(weight_nums + bias_nums, dim=-1)
    weights, biases = splits[:num_layers], splits[num_layers:]

    ys = torch.arange(0, h * stride, stride, dtype=mask_feats.dtype, device=mask_feats.device) + stride // 2
    xs = torch.arange(0, w * stride, stride, dtype=mask_feats.dtype, device=mask_feats.device) + stride // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    locations = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), 0)  # [2, HW]
    rel = centres[..., None] - locations  # [B, Q, 2, HW]

    feats = mask_feats.flatten(2)  # [B, F, HW]
    x: Tensor | None = None
    for layer in range(num_layers):
        c_out = 1 if layer == num_layers - 1 else channels
        wl = weights[layer].reshape(b, q, c_out, -1)
        bl = biases[layer].reshape(b, q, c_out, 1)
        if layer == 0:
            # The mask features are shared by all queries: apply their weights once per prompt.
            x = wl[..., :2] @ rel + torch.einsum("bqof,bfp->bqop", wl[..., 2:], feats) + bl
        else:
            x = wl @ x + bl
        if layer < num_layers - 1:
            x = F.relu(x)
    assert x is not None
    return x.view(b, q, h, w)


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """CondInst's corner-aligned bilinear upsampling by an integer factor: [B, C, H, W] -> [B, C, fH, fW]."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[..., : factor * h, : factor * w]
