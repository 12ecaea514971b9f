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

    def loss(self, name: str, features: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the label groups.

        Args:
            name: which feature map ("vision" or "decoder").
            features: [B, g, g, C] channels-last features.
            labels: [B, G, S, S] long class maps (``IGNORE_LABEL`` where unsupervised) in the same
                square frame as the features; sampled at each cell's centre pixel.

        Returns:
            scalar loss (zero when no pixel is supervised).
        """
        g = features.shape[1]
        s = labels.shape[-1]
        centres = ((torch.arange(g, device=labels.device) + 0.5) * s / g).long().clamp_(max=s - 1)
        cells = labels[:, :, centres][:, :, :, centres]  # [B, G, g, g]
        logits = self.heads[name](features.float() if features.dtype != self.heads[name].weight.dtype else features)
        total = features.new_zeros((), dtype=torch.float32)
        start = 0
        for i, n in enumerate(self.groups.values()):
            lg = logits[..., start : start + n].reshape(-1, n).float()
            tg = cells[:, i].reshape(-1)
            start += n
            if (tg != IGNORE_LABEL).any():
                total = total + F.cross_entropy(lg, tg, ignore_index=IGNORE_LABEL)
        return total / max(1, len(self.groups))
