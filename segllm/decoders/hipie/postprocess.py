"""HIPIE's inference post-processing, as the released SegLLM runs it.

Per prompt: per-class logits are the mean of the query's logits over that class's prompt
tokens; the instance score is ``sqrt(sigmoid(class) * sigmoid(iou))``; a class-wise NMS
(IoU 0.7) on each query's best class removes duplicates; the surviving (query, class) pairs
are ranked (at most ``max_instances``). The answer for a class is its best-ranked pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from segllm.decoders.hipie.common import box_cxcywh_to_xyxy

__all__ = ["Instances", "box_iou_matrix", "class_logits", "class_nms", "postprocess", "select_best"]


@dataclass
class Instances:
    """Ranked detections of one prompt.

    Attributes:
        scores: [K] instance scores, descending.
        labels: [K] class index (0 = [REF], 1 = [SEG]).
        query_index: [K] index of the foreground query (0..num_queries-1) of each detection.
        boxes: [K, 4] (x0, y0, x1, y1) in input pixels.
    """

    scores: Tensor
    labels: Tensor
    query_index: Tensor
    boxes: Tensor


def class_logits(token_logits: Tensor, num_ref_tokens: int) -> Tensor:
    """[..., T] per-token logits -> [..., 2] (mean over [REF] tokens, mean over [SEG] tokens)."""
    return torch.stack(
        [token_logits[..., :num_ref_tokens].mean(-1), token_logits[..., num_ref_tokens:].mean(-1)], dim=-1
    )


def box_iou_matrix(boxes: Tensor) -> Tensor:
    """[K, 4] xyxy -> [K, K] pairwise IoU."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, None] + area[None, :] - inter)


def class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Greedy NMS within each label (like ``torchvision.ops.batched_nms``).

    Args:
        boxes: [K, 4] xyxy. scores: [K]. labels: [K].

    Returns:
        [K'] long indices of the kept boxes, by decreasing score.
    """
    order = torch.sort(scores, descending=True, stable=True)[1]
    overlap = (box_iou_matrix(boxes) > threshold) & (labels[:, None] == labels[None, :])
    overlap = overlap.cpu()
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlap[i]
    return torch.tensor(keep, dtype=torch.long, device=scores.device)


def postprocess(
    token_logits: Tensor,
    iou_logits: Tensor,
    boxes: Tensor,
    *,
    num_ref_tokens: int,
    image_size: int,
    nms_threshold: float = 0.7,
    max_instances: int = 100,
) -> Instances:
    """Rank the foreground queries of one prompt.

    Args:
        token_logits: [Q, T] query x prompt-token logits.
        iou_logits: [Q, 1] predicted IoU logits.
        boxes: [Q, 4] (cx, cy, w, h) normalised.
        num_ref_tokens: tokens of class [REF] (the first ones).
        image_size: side of the input frame (boxes are scaled by it).
    """
    prob = torch.sqrt(class_logits(token_logits, num_ref_tokens).sigmoid() * iou_logits.sigmoid())  # [Q, 2]
    best, best_label = prob.max(dim=1)
    xyxy = box_cxcywh_to_xyxy(boxes)
    keep = class_nms(xyxy, best, best_label, nms_threshold)
    kept = prob[keep]
    num = min(max_instances, kept.numel())
    scores, flat = torch.topk(kept.flatten(), num)
    num_classes = prob.shape[1]
    query = keep[torch.div(flat, num_classes, rounding_mode="floor")]
    return Instances(
        scores=scores,
        labels=flat % num_classes,
        query_index=query,
        boxes=xyxy[query] * image_size,
    )


def select_best(instances: Instances, label: int) -> int:
    """Index (into ``instances``) of the best detection of ``label``.

    Other labels get score -1 first, as the released code does for the target; so when no
    detection has the label the first-ranked one is returned.
    """
    scores = torch.where(instances.labels == label, instances.scores, torch.full_like(instances.scores, -1.0))
    return int(scores.argmax())
