"""Dense auxiliary supervision: per-cell attribute classes predicted from image features.

Where the training data knows what every pixel shows (the procedural world does: each pixel's
colour, shape category, texture and size class), a linear classifier per feature cell turns it
into a dense training signal for the vision features. Why: the project's experiments (issue 13)
found the image path into the LLM starved of gradient (the mask losses reach it only through the
LLM), so the LLM had no features to bind words to; these heads give the image features
attribute-level content from the first step. They are used in training only.

Shapes: B images, G label groups, g feature grid side, S label map side.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segllm.config import DenseConfig

IGNORE_LABEL = -1  # label of pixels that supervise nothing (padding)


class DenseHeads(nn.Module):
    """One linear classifier per supervised feature map (``vision``: the vision tower's patch
    tokens, ``decoder``: the mask decoder's image features), each predicting every label group.

    Args:
        config: the label groups (name -> number of classes) and which features they supervise.
        widths: channel width of each supervised feature map, by name.
    """

    def __init__(self, config: DenseConfig, widths: dict[str, int]) -> None:
        super().__init__()
        self.groups = dict(config.groups)
        total = sum(self.groups.values())
        self.heads = nn.ModuleDict({name: nn.Linear(widths[name], total) for name in config.on})

    def target_loss(self, prompts: Tensor, labels: Tensor) -> Tensor:
        """The "target" head: which classes the object each ``<seg>`` asks for has.

        Args:
            prompts: [S, D] each ``<seg>``'s prompt summary (the mean of its [SEG] tokens).
            labels: [S, G] long, from :func:`target_labels`.

        Returns:
            scalar loss (zero when nothing is supervised).
        """
        w = self.heads["target"].weight
        return group_loss(self.groups, self.heads["target"](prompts.to(w.dtype)), labels.to(prompts.device))

    def loss(self, name: str, features: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the label groups.

        Args:
            name: which feature map ("vision" or "decoder").
            features: [B, g, g, C] channels-last features.
            labels: [B, G, S, S] integer class maps (``IGNORE_LABEL`` where unsupervised) in the same
                square frame as the features; sampled at each cell's centre pixel.

        Returns:
            scalar loss (zero when no pixel is supervised).
        """
        logits = self.heads[name](features.float() if features.dtype != self.heads[name].weight.dtype else features)
        return group_loss(self.groups, logits, cell_labels(labels, features.shape[1]))


def cell_labels(labels: Tensor, g: int) -> Tensor:
    """Class maps [B, G, S, S] -> the class at each of g x g cells' centre pixels, [B, g, g, G]."""
    s = labels.shape[-1]
    centres = ((torch.arange(g, device=labels.device) + 0.5) * s / g).long().clamp_(max=s - 1)
    return labels[:, :, centres][:, :, :, centres].permute(0, 2, 3, 1)


def group_loss(groups: dict[str, int], logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the label groups of the cross-entropy of ``logits`` [..., sum of class counts]
    (the groups' classes side by side, in ``groups`` order) against ``labels`` [..., G]
    (``IGNORE_LABEL`` skipped); zero where nothing is supervised."""
    total = logits.new_zeros((), dtype=torch.float32)
    start = 0
    for i, n in enumerate(groups.values()):
        lg = logits[..., start : start + n].reshape(-1, n).float()
        tg = labels[..., i].reshape(-1).long()  # batches carry int16 maps
        start += n
        # the mean over the supervised labels as a sum over a count (0 / 1 where there are
        # none): no data-dependent branch, so no wait for the device in the middle of a step
        ce = F.cross_entropy(lg, tg, ignore_index=IGNORE_LABEL, reduction="sum")
        total = total + ce / (tg != IGNORE_LABEL).sum().clamp(min=1)
    return total / max(1, len(groups))


def target_labels(dense: dict[str, np.ndarray], masks: list[np.ndarray], groups: list[str]) -> Tensor:
    """The classes of the objects some masks cover: per mask and group, the most common
    non-background class under the mask (``IGNORE_LABEL`` where the mask covers only background
    or nothing).

    Args:
        dense: a conversation's class maps [H, W] by group (``Conversation.dense``).
        masks: bool [H, W] target masks at the same resolution.
        groups: the label groups, in the heads' order.

    Returns:
        [len(masks), len(groups)] long.
    """
    out = torch.full((len(masks), len(groups)), IGNORE_LABEL, dtype=torch.long)
    for g, name in enumerate(groups):
        labels = np.asarray(dense[name])
        for i, m in enumerate(masks):
            counts = np.bincount(labels[np.asarray(m, dtype=bool)].astype(np.int64).ravel(), minlength=1)
            counts[0] = 0  # background says nothing about the object
            if counts.any():
                out[i, g] = int(counts.argmax())
    return out
