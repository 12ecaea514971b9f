"""Mask memory: an earlier round's mask becomes LLM input tokens.

Released recipe: apply the mask to the image (background zeroed), crop to the mask's box, pad
the crop to a square (top-left), run the vision tower and keep one pooled token, project it to
the LLM width (one token); plus the box through a linear layer (a second token).
This module owns that whole path: the frame the crop is cut in, the crop, the box, the pooled
vision token and its projection, the box token and the scales at training and inference. The
vision tower and projector it runs are the model's own (shared with the image path, so they are
not this module's parameters): callers pass them in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from segllm.config import MemoryConfig
from segllm.decoders.base import Frame, image_to_frame, mask_to_frame
from segllm.errors import MaskError


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of masks, [M, H, W] bool -> [M, 4] float (x0, y0, x1, y1) in pixels, x1/y1
    exclusive (so a one-pixel mask at (x, y) has box (x, y, x+1, y+1)). Empty masks give zeros."""
    m = masks.bool()
    if m.shape[0] == 0:
        return torch.zeros(0, 4)
    if m.device.type == "cpu":  # numpy's: a quarter of the time (a dozen crops a training conversation)
        a = m.numpy()
        rows, cols = a.any(axis=2), a.any(axis=1)
        h, w = a.shape[1:]
        boxes = np.stack([cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], axis=1)
        boxes = boxes.astype(np.float32)
        boxes[~rows.any(axis=1)] = 0
        return torch.from_numpy(boxes)
    rows, cols = m.any(dim=2), m.any(dim=1)
    h, w = m.shape[1:]
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~rows.any(dim=1)] = 0
    return boxes


class MaskMemoryEncoder(nn.Module):
    """Mask memory: an earlier mask (and its box) -> a ``<mask>`` token and a ``<box>`` token.

    Args:
        config: memory options.
        llm_dim: the LLM width (output of the box encoder).
        frame_size: the side of the mask decoder's square input frame, in pixels (where the
            crop is cut with ``config.crop_frame == "decoder"``).
    """

    def __init__(self, config: MemoryConfig, llm_dim: int, frame_size: int = 0) -> None:
        super().__init__()
        self.config = config
        self.frame_size = frame_size
        self.box_head = nn.Linear(4, llm_dim)

    def inputs(self, image: Tensor, mask: Tensor, box: Tensor | None = None, *, vision: nn.Module) -> tuple[Tensor, Tensor]:
        """One earlier mask's inputs for :meth:`tokens`: the preprocessed masked crop [3, S, S]
        and the normalised box [4].

        Args:
            image: [3, H, W] uint8.
            mask: [H, W] bool; or, when ``crop_frame == "decoder"``, the mask in the decoder's
                square frame ([Sd, Sd], as :meth:`segllm.model.rounds.RoundEngine.decode` gives it).
            box: the decoder's predicted box for this mask, [4] (x0, y0, x1, y1) float pixels of
                the image; used when ``box_source == "decoder"``.
            vision: the model's vision tower (its ``preprocess`` sizes and normalises the crop).
        """
        crop, box = self.crop_inputs(image, mask, box)
        return vision.preprocess(crop), box

    def crop_inputs(self, image: Tensor, mask: Tensor, box: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`inputs` before the vision tower's preprocessing: the masked crop, uint8
        [3, s, s] (s its side in pixels), and the normalised box [4]. Training batches carry
        these small crops and preprocess them on the model's device, all at once
        (:meth:`segllm.model.vision.VisionTower.preprocess_crops`)."""
        cfg = self.config
        if cfg.crop_frame == "decoder":
            frame = Frame.fit(image.shape[1], image.shape[2], self.frame_size)
            if box is not None:
                box = box * (frame.size / max(frame.height, frame.width))
            if tuple(mask.shape) != (frame.size, frame.size):  # else it already is a frame mask
                mask = mask_to_frame(mask, frame)
            image = image_to_frame(image, frame)
        predicted = box if cfg.box_source == "decoder" else None
        used = self.box_of(mask, predicted)  # the box both the crop and the box token use
        return self.cut(image, mask, used), self.normalised_boxes(mask[None], used[None])[0]

    def tokens(self, pixels: Tensor, boxes: Tensor, *, vision: nn.Module, projector: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Earlier masks -> LLM tokens.

        Args:
            pixels: [M, 3, S, S] preprocessed masked crops (:meth:`inputs`).
            boxes: [M, 4] normalised boxes.
            vision, projector: the model's vision tower (its ``pool``: one token per crop) and
                projector (vision width -> LLM width).
            dtype: the LLM's dtype.

        Returns:
            (mask tokens [M, D], box tokens [M, D]), scaled for training (feature dropout,
            while this module is in training mode) or inference (``inference_scale``).
        """
        grad = any(p.requires_grad for p in vision.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            pooled = vision.pool(pixels)
        mask_feats = projector(pooled.to(dtype))
        box_feats = self.encode_boxes(boxes.to(mask_feats.device)).to(mask_feats.dtype)
        scale = self._scale(pixels.shape[0], mask_feats)
        return mask_feats * scale, box_feats * scale

    def _scale(self, M: int, like: Tensor) -> Tensor:
        """[M, 1]: each token's factor. Training drops whole tokens with ``feature_dropout``
        (unscaled, as released); inference multiplies by ``inference_scale``."""
        cfg = self.config
        if self.training and cfg.feature_dropout > 0:
            keep = torch.rand(M, 1, device=like.device) >= cfg.feature_dropout
            return keep.to(like.dtype)
        return torch.full((M, 1), cfg.inference_scale if not self.training else 1.0, device=like.device, dtype=like.dtype)

    def box_of(self, mask: Tensor, box: Tensor | None = None) -> Tensor:
        """The integer box [4] (x0, y0, x1, y1), x1/y1 exclusive, that a memory crop uses.

        ``mask``: [H, W] bool. Without ``box``: the mask's tight box. With a predicted ``box``
        (float pixels of the same frame): truncated to whole pixels, clipped to the frame and
        made at least 2 pixels wide and high, as the released inference code does.
        """
        if box is None:
            return mask_boxes(mask[None])[0]
        h, w = mask.shape
        side = max(h, w)
        x0, y0, x1, y1 = (min(max(int(v), 0), side) for v in box.tolist())  # int() truncates toward zero
        x1 = min(max(x1, x0 + 2), side)
        y1 = min(max(y1, y0 + 2), side)
        return torch.tensor([x0, y0, x1, y1], dtype=torch.float32)

    def crop(self, image: Tensor, mask: Tensor, box: Tensor | None = None) -> Tensor:
        """The masked crop of one earlier mask.

        Args:
            image: [3, H, W] uint8.
            mask: [H, W] bool, same size.
            box: optional predicted box (see :meth:`box_of`); default the mask's tight box.

        Returns:
            [3, s, s] uint8: the image with the background zeroed, cropped to the box and
            zero-padded at the bottom/right to a square of side s = max(box h, box w).
        """
        return self.cut(image, mask, self.box_of(mask, box))

    def cut(self, image: Tensor, mask: Tensor, box: Tensor) -> Tensor:
        """:meth:`crop` at an integer box [4] already resolved by :meth:`box_of` (checks the mask:
        same size as the image, not empty)."""
        self._check(image, mask)
        x0, y0, x1, y1 = (int(v) for v in box.tolist())
        # zeroed outside the mask within the box only (the same pixels as masking the whole image)
        crop = image[:, y0:y1, x0:x1] * mask[y0:y1, x0:x1].to(image.dtype)
        side = max(y1 - y0, x1 - x0)
        out = torch.zeros(3, side, side, dtype=image.dtype, device=image.device)
        out[:, : crop.shape[1], : crop.shape[2]] = crop
        return out

    @staticmethod
    def _check(image: Tensor, mask: Tensor) -> None:
        if mask.shape != image.shape[1:]:
            raise MaskError(f"mask of shape {tuple(mask.shape)} does not fit an image of {tuple(image.shape[1:])}")
        if not bool(mask.any()):
            raise MaskError("cannot encode an empty (zero-area) mask")

    def normalised_boxes(self, masks: Tensor, boxes: Tensor | None = None) -> Tensor:
        """[M, H, W] masks (or their ``boxes`` [M, 4] from :meth:`box_of`) -> [M, 4] boxes for
        the box encoder, divided by ``box_norm`` (or the longest image side) and in ``box_order``."""
        if boxes is None:
            boxes = mask_boxes(masks)
        norm = self.config.box_norm or float(max(masks.shape[-2:]))
        boxes = boxes / norm
        if self.config.box_order == "yxyx":
            boxes = boxes[:, [1, 0, 3, 2]]
        return boxes

    def encode_boxes(self, boxes: Tensor) -> Tensor:
        """[M, 4] normalised boxes -> [M, D_llm]."""
        return self.box_head(boxes.to(self.box_head.weight.dtype))
