"""Mask edges that follow the image: a colour-guided (joint bilateral) filter of mask probabilities.

Inference-time post-processing in the decoder's input frame, off unless a model's config asks
for it (:class:`segllm.config.EdgeFilterConfig`). Each iteration replaces every pixel's mask
probability by the weighted mean of its neighbours' within ``radius``, each neighbour weighted
by ``exp(-d^2 / (2 sigma_space^2) - |c - c'|^2 / (2 sigma_colour^2))`` (d its distance in
pixels, c and c' the two pixels' RGB colours in [0, 1]): probability flows between pixels of
the same colour and hardly across a colour edge, so a mask whose border is a pixel or two off
the object's edge (a coarse decoder's rounded corners, missed tips and thin parts) settles onto
it. This is the mean-field step of a dense CRF with only its appearance kernel (Krähenbühl and
Koltun 2011, as DeepLab used it), without the CRF's label compatibilities.

Why: the bundled model's masks on the right object lose most of their IoU within one pixel of
the object's border (README, "The bundled default model"), where the procedural world's flat
colours mark the true edge exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["colour_guided_filter"]

def colour_guided_filter(
    logits: Tensor, image: Tensor, *, iterations: int, radius: int, sigma_space: float, sigma_colour: float, margin: int
) -> Tensor:
    """Filter M masks of one image along its colours.

    Args:
        logits: [M, S, S] mask logits in the decoder's input frame.
        image: [3, S, S] uint8, the image in the same frame, or [M, 3, S, S]: each mask's own.
        iterations: filter passes (0 returns ``logits`` unchanged).
        radius: neighbours within this many pixels (a square window of side ``2 radius + 1``).
        sigma_space: spatial scale of the weights, pixels.
        sigma_colour: colour scale of the weights, RGB in [0, 1].
        margin: each mask is filtered in the box around its pixels (logit > 0) grown by this
            many pixels (the crop's border repeated outward); its logits outside stay as given,
            and a mask without pixels stays as it is. Objects are a small part of the frame.

    Returns:
        [M, S, S] logits (``logits``' dtype): in each mask's box, its filtered probabilities as
        logits (clamped to probabilities 1e-6 .. 1 - 1e-6).
    """
    m, s = logits.shape[0], logits.shape[-1]
    if logits.ndim != 3 or logits.shape[1] != s or tuple(image.shape[-3:]) != (3, s, s) or image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[0] != m):
        raise ValueError(f"need logits [M, S, S] and an image [3, S, S] or [M, 3, S, S] of the same M and S, got {list(logits.shape)} and {list(image.shape)}")
    if iterations <= 0 or m == 0:
        return logits
    on = logits > 0
    out = logits.clone()
    dev = logits.device
    offsets = torch.arange(-radius, radius + 1, device=dev)
    dy, dx = offsets.repeat_interleave(len(offsets)), offsets.repeat(len(offsets))  # [k*k] each
    space = ((dy.square() + dx.square()).float() / (2 * sigma_space**2)).view(-1, 1)  # [k*k, 1]
    for i in range(m):
        rows, cols = on[i].any(1).nonzero()[:, 0], on[i].any(0).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        y0, y1 = max(0, int(rows[0]) - margin), min(s, int(rows[-1]) + 1 + margin)
        x0, x1 = max(0, int(cols[0]) - margin), min(s, int(cols[-1]) + 1 + margin)
        h, w = y1 - y0, x1 - x0
        # each pixel's k*k neighbours in the box (its border repeated outward) as flat indices,
        # and their weights: made once per mask, then every pass is one gather and one sum
        ys = (torch.arange(h, device=dev).view(1, h, 1) + dy.view(-1, 1, 1)).clamp_(0, h - 1)
        xs = (torch.arange(w, device=dev).view(1, 1, w) + dx.view(-1, 1, 1)).clamp_(0, w - 1)
        index = (ys * w + xs).view(-1, h * w)  # [k*k, h*w]
        # only the box in float (a frame of the released size is 1024 x 1024)
        colours = (image[i] if image.ndim == 4 else image)[:, y0:y1, x0:x1].to(dev, torch.float32).div_(255.0).reshape(3, h * w)
        colour_d2 = (colours[:, index] - colours[:, None]).square_().sum(0)  # [k*k, h*w]
        weights = torch.exp_(-(space + colour_d2 / (2 * sigma_colour**2)))
        weights /= weights.sum(0, keepdim=True)  # the centre weighs 1 before normalising: never 0 / 0
        p = logits[i, y0:y1, x0:x1].float().sigmoid().reshape(h * w)
        for _ in range(iterations):
            p = (p[index] * weights).sum(0)
        out[i, y0:y1, x0:x1] = torch.logit(p.view(h, w).clamp(1e-6, 1 - 1e-6)).to(logits.dtype)
    return out
