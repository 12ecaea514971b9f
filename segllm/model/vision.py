"""The vision tower: any transformers vision model (CLIP, SigLIP, DINOv2, ...) plus its preprocessing.

It turns an image into patch tokens for the LLM (``forward``) and an image crop into one
pooled token for mask memory (``pool``). Preprocessing runs in torch (no torchvision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, CLIPImageProcessor, CLIPVisionModel, PreTrainedModel

from segllm.config import VisionConfig
from segllm.decoders.convnet import ConvBackbone
from segllm.errors import ConfigError, ImageError
from segllm.hub import WEIGHT_PATTERNS, resolve_folder

CONV_MODEL_TYPE = "segllm_conv"


class ConvVisionModel(nn.Module):
    """A convolutional vision tower (:class:`~segllm.decoders.convnet.ConvBackbone`) with a learned
    position embedding per grid cell, producing tokens like a ViT: [B, 1 + g*g, hidden_size],
    the first token the mean of the others (it stands in for CLS, so ``pool = "cls"`` works).

    Built from ``vision.hf_config = {"model_type": "segllm_conv", "image_size": S,
    "stride": 8, "width": 64, "depth": 1, "hidden_size": 128}``.
    """

    def __init__(self, *, image_size: int, stride: int = 8, width: int = 64, depth: int = 1, hidden_size: int = 128) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.backbone = ConvBackbone(image_size, stride, width, depth, hidden_size)
        g = self.backbone.grid_size
        self.pos_embed = nn.Parameter(torch.randn(1, g * g, hidden_size) * 0.02)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] -> [B, 1 + g*g, hidden_size] (pooled token first)."""
        x = self.backbone(pixels).flatten(2).transpose(1, 2)  # [B, g*g, D]
        x = self.norm(x + self.pos_embed)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def build_vision_model(config: VisionConfig, *, load_weights: bool = True) -> nn.Module:
    """A transformers vision model from ``config.hf_config`` (random weights) or, when
    ``load_weights`` and ``config.pretrained_path`` is set, from that folder (or hub id, fetched
    into the hub cache by :func:`segllm.hub.resolve_folder`)."""
    if load_weights and config.pretrained_path:
        folder = str(resolve_folder(config.pretrained_path, patterns=WEIGHT_PATTERNS, what="vision tower"))
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        if cfg.model_type == "clip" or "WithProjection" in str(getattr(cfg, "architectures", None)):
            # a whole CLIP, or CLIP with its contrastive projection: only the vision encoder is used
            return CLIPVisionModel.from_pretrained(folder, local_files_only=True)
        return AutoModel.from_pretrained(folder, local_files_only=True)
    hf = dict(config.hf_config)
    model_type = hf.pop("model_type", None)
    if not model_type:
        raise ConfigError("vision.hf_config needs a model_type (e.g. 'clip_vision_model', 'dinov2')")
    if model_type == CONV_MODEL_TYPE:
        try:
            return ConvVisionModel(**hf)
        except TypeError as e:
            raise ConfigError(f"vision.hf_config for {CONV_MODEL_TYPE!r}: {e}") from e
    return AutoModel.from_config(AutoConfig.for_model(model_type, **hf))


class VisionTower(nn.Module):
    """Wraps a transformers vision model.

    Args:
        model: the transformers model (its hidden states are read at ``config.select_layer``).
        config: preprocessing and feature selection.
    """

    def __init__(self, model: PreTrainedModel, config: VisionConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self._num_tokens: int | None = None
        self._processor = None  # transformers' CLIPImageProcessor, built on first use (resample "pil")

    @property
    def hidden_size(self) -> int:
        if isinstance(self.model, ConvVisionModel):
            return self.model.hidden_size
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.vision_config.hidden_size)

    @property
    def num_tokens(self) -> int:
        """Number of patch tokens per image (found once by a forward pass on a blank image)."""
        if self._num_tokens is None:
            with torch.no_grad():
                p = next(self.model.parameters())
                blank = torch.zeros(1, 3, self.config.image_size, self.config.image_size, device=p.device, dtype=p.dtype)
                self._num_tokens = int(self.forward(blank).shape[1])
        return self._num_tokens

    def preprocess(self, image: Tensor) -> Tensor:
        """uint8 image [3, H, W] -> normalised float input [3, S, S] (S = config.image_size)."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ImageError(f"vision tower expects a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
        s = self.config.image_size
        if self._clip_path:
            return self._clip_processor(image)
        # each step below makes a new tensor, so the arithmetic can go in place
        x = image[None].float().div_(255.0)
        h, w = x.shape[-2:]
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if self.config.resize == "squash":
            return _resize(x, s, s).sub_(mean).div_(std)[0]
        if self.config.resize == "center_crop":
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = _resize(x, nh, nw)
            top, left = (nh - s) // 2, (nw - s) // 2
            return ((x[..., top : top + s, left : left + s] - mean) / std)[0]  # a contiguous copy of the crop
        # pad: longest side to s, pad bottom/right with the mean colour (zero after normalising)
        scale = s / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = _resize(x, nh, nw).sub_(mean).div_(std)
        return F.pad(x, (0, s - nw, 0, s - nh))[0]

    @property
    def _clip_path(self) -> bool:
        """Preprocessing as transformers' CLIP processor does it (PIL on the host, centre crop)."""
        return self.config.resample == "pil" and self.config.resize == "center_crop"

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) per channel when :meth:`preprocess` of an S x S image is only
        ``(image / 255 - mean) / std`` (every resize mode leaves such an image as it is), None
        for the released CLIP preprocessing (PIL, on the host)."""
        if self._clip_path:
            return None
        return tuple(self.config.mean), tuple(self.config.std)

    def batches_crops(self, side: int) -> bool:
        """Can :meth:`preprocess_crops` resize square crops up to ``side`` pixels as one batched
        product (else it preprocesses them one by one)? Not for the released CLIP preprocessing
        (PIL's resampling on the host) nor for crops the matrix form does not take."""
        return not self._clip_path and side <= _MATRIX_RESIZE_MAX_SIDE

    def preprocess_crops(self, crops: Tensor, sides: Tensor) -> Tensor:
        """Square uint8 crops, zero-padded to one size, [M, 3, c, c], of sides ``sides`` [M]
        (each crop is ``crops[i, :, :s, :s]``) -> the vision input [M, 3, S, S] float: what
        :meth:`preprocess` gives for each crop (within float rounding), computed at once.

        A square crop is resized the same by every ``resize`` mode (squash, crop or pad all
        scale it to S x S), so each is ``Wy @ x @ Wx^T`` with its side's weights; the weights of
        a smaller crop padded with zero columns meet the crop's zero padding, which adds
        nothing, so all crops go through one batched product.
        """
        S = self.config.image_size
        M, c = crops.shape[0], crops.shape[-1]
        if M == 0:
            return torch.zeros(0, 3, S, S, device=crops.device)
        side_list = sides.tolist()
        if not self.batches_crops(c):
            return torch.stack([self.preprocess(crops[i, :, :s, :s]) for i, s in enumerate(side_list)])
        kinds = sorted(set(side_list))
        table = torch.zeros(len(kinds), S, c, device=crops.device)
        for k, s in enumerate(kinds):
            # at its own size a crop is not resized (preprocess leaves it as it is)
            table[k, :, :s] = torch.eye(S, device=crops.device) if s == S else _resize_weights(s, S, crops.device, torch.float32)
        row = {s: k for k, s in enumerate(kinds)}
        w = table[torch.tensor([row[s] for s in side_list], device=crops.device)][:, None]  # [M, 1, S, c]
        x = crops.float().div_(255.0)
        x = torch.matmul(torch.matmul(w, x), w.transpose(-1, -2)).clamp_(0, 1)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def _clip_processor(self, image: Tensor) -> Tensor:
        """transformers' CLIP preprocessing (PIL bicubic on uint8, centre crop), bit-exact."""
        if self._processor is None:
            s = self.config.image_size
            self._processor = CLIPImageProcessor(
                size={"shortest_edge": s}, crop_size={"height": s, "width": s}, resample=3,
                image_mean=list(self.config.mean), image_std=list(self.config.std),
            )
        pixels = self._processor(image.permute(1, 2, 0).cpu().numpy(), return_tensors="pt").pixel_values[0]
        return pixels.to(image.device)

    def _hidden(self, pixels: Tensor) -> Tensor:
        p = next(self.model.parameters())
        if isinstance(self.model, ConvVisionModel):
            return self.model(pixels.to(device=p.device, dtype=p.dtype))
        out = self.model(pixel_values=pixels.to(device=p.device, dtype=p.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.select_layer]

    def forward(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed images -> patch tokens [B, N, Dv]."""
        h = self._hidden(pixels)
        return h[:, 1:] if self.config.drop_cls else h

    def pool(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed crops -> one token each, [B, Dv] (CLS or mean of patches)."""
        h = self._hidden(pixels)
        if self.config.pool == "cls":
            return h[:, 0]
        return (h[:, 1:] if self.config.drop_cls else h).mean(dim=1)


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    """[B, C, H, W] float in [0, 1] -> [B, C, h, w]: bicubic with antialiasing (``F.interpolate``'s,
    weights a = -0.5 as PIL's), clamped to [0, 1].

    Small inputs (mask memory crops, a few to ~60 pixels a side, a dozen per conversation) go
    through the same separable resampling as two matrix products, ``Wy @ x @ Wx^T``, with the
    weights read off ``F.interpolate`` itself: 5-8x faster than its per-pixel kernel, which
    made the crops the largest cost of building a training batch. The values agree with
    ``F.interpolate`` up to float rounding (within 1e-6; ``tests/model/test_vision.py``). Larger
    inputs keep ``F.interpolate``: its banded kernel skips the zero weights that a dense
    product would multiply, and reading the weights off costs a [side, side] basis.
    """
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        return x
    if max(H, W) > _MATRIX_RESIZE_MAX_SIDE:
        return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    wy = _resize_weights(H, h, x.device, x.dtype)
    wx = _resize_weights(W, w, x.device, x.dtype)
    return torch.matmul(torch.matmul(wy, x), wx.T).clamp_(0, 1)


# the matrix form for inputs up to this side: its weights are read off a [side, side] basis
_MATRIX_RESIZE_MAX_SIDE = 256


def _resize_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[n_out, n_in]: ``F.interpolate``'s antialiased bicubic weights along one axis, kept per
    (sizes, device, dtype). Read off the operation (in float64) by resampling the unit vectors,
    each spread along the other axis, where that axis keeps its size, so it is left unchanged."""
    key = (n_in, n_out, device, dtype)
    got = _RESIZE_WEIGHTS.get(key)
    if got is None:
        basis = torch.eye(n_in, dtype=torch.float64)[:, None, :, None].expand(n_in, 1, n_in, 4)
        out = F.interpolate(basis.contiguous(), size=(n_out, 4), mode="bicubic", antialias=True, align_corners=False)
        got = out[:, 0, :, 0].T.contiguous().to(device=device, dtype=dtype)
        if len(_RESIZE_WEIGHTS) >= 512:  # sizes seen by one process are few; bound them anyway
            _RESIZE_WEIGHTS.clear()
        _RESIZE_WEIGHTS[key] = got
    return got


_RESIZE_WEIGHTS: dict[tuple, Tensor] = {}
