"""Mask and box losses on soft targets in the decoder's output frame (used by the model's
training forward and by HIPIE's set-prediction criterion, so they live outside segllm.train)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean per-pixel binary cross-entropy. logits, targets: [M, h, w]; targets in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def sigmoid_focal(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al.); targets in [0, 1], same shape as logits.
    ``alpha`` < 0 turns off the class weighting."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss, mean over pixels. logits, targets: [M, h, w]."""
    return sigmoid_focal(logits.float(), targets.float(), alpha, gamma).mean()


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice, averaged over masks. logits, targets: [M, h, w]."""
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    num = 2 * (p * t).sum(1) + eps
    den = p.sum(1) + t.sum(1) + eps
    return (1 - num / den).mean()


def mask_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """IoU of thresholded predictions (logit > 0) against targets (> 0.5), per mask: [M]."""
    p = logits > 0
    t = targets > 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def box_loss(pred: Tensor, target: Tensor, size: float) -> Tensor:
    """L1 (on boxes divided by ``size``) plus generalised IoU loss, mean over boxes.

    pred, target: [M, 4] (x0, y0, x1, y1) in pixels of a frame of side ``size``.
    """
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().sum(-1) / size
    lt, rb = torch.max(pred[:, :2], target[:, :2]), torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(pred) + area(target) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0).prod(-1)
    giou = iou - (hull - union) / hull.clamp(min=1e-6)
    return (l1 + (1 - giou)).mean()
