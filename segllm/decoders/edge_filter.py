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

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["colour_guided_filter"]


class _Box(NamedTuple):
    """One mask's box to filter: mask index, rows y0:y1 and columns x0:x1 of the frame, each
    pixel's neighbours as flat indices into its group's pixels [h*w*k*k], their weights
    [h*w*k*k] and the pixels' probabilities [h*w]."""

    mask: int
    y0: int
    y1: int
    x0: int
    x1: int
    columns: Tensor
    weights: Tensor
    probs: Tensor


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
    space = ((dy.square() + dx.square()).float() / (2 * sigma_space**2)).view(1, -1)  # [1, k*k]
    group: list[_Box] = []  # masks filtered together
    pixels = 0  # pixels of the group's boxes so far
    for i in range(m):
        rows, cols = on[i].any(1).nonzero()[:, 0], on[i].any(0).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        y0, y1 = max(0, int(rows[0]) - margin), min(s, int(rows[-1]) + 1 + margin)
        x0, x1 = max(0, int(cols[0]) - margin), min(s, int(cols[-1]) + 1 + margin)
        h, w = y1 - y0, x1 - x0
        if group and (pixels + h * w) * len(dy) > _GROUP_ENTRIES:
            _filter_group(out, group, pixels, len(dy), iterations)
            group, pixels = [], 0
        # each pixel's k*k neighbours in the box (its border repeated outward) as flat indices,
        # in the order of the offsets (so each pixel's indices never decrease: sorted CSR rows)
        ys = (torch.arange(h, device=dev).view(h, 1, 1) + dy.view(1, 1, -1)).clamp_(0, h - 1)
        xs = (torch.arange(w, device=dev).view(1, w, 1) + dx.view(1, 1, -1)).clamp_(0, w - 1)
        index = (ys * w + xs).view(h * w, -1)  # [h*w, k*k]
        # only the box in float (a frame of the released size is 1024 x 1024)
        colours = (image[i] if image.ndim == 4 else image)[:, y0:y1, x0:x1].to(dev, torch.float32).div_(255.0).reshape(3, h * w)
        d2 = colours.index_select(1, index.view(-1)).view(3, h * w, -1).sub_(colours[:, :, None]).square_()
        colour_d2 = d2[0].add_(d2[1]).add_(d2[2])  # [h*w, k*k]
        # exponents held at -30 and probabilities at 1e-6 and above: a weight below e^-30 is lost
        # against the centre's 1 in float32 anyway, and exp's subnormal results (below e^-87, any
        # clear colour edge) and products with them are ~40x slower on CPUs than normal numbers
        weights = torch.exp_((space + colour_d2 / (2 * sigma_colour**2)).neg_().clamp_(min=-30.0))
        weights /= weights.sum(1, keepdim=True)  # the centre weighs 1 before normalising: never 0 / 0
        p = logits[i, y0:y1, x0:x1].float().sigmoid().clamp_(min=1e-6).reshape(h * w)
        group.append(_Box(i, y0, y1, x0, x1, index.add_(pixels).view(-1), weights.view(-1), p))
        pixels += h * w
    if group:
        _filter_group(out, group, pixels, len(dy), iterations)
    return out


# at most this many weights in one sparse matrix (~0.5 GB with their int32 columns): bounds the
# memory of many large masks (a 1024 x 1024 frame's box has 81M at radius 4) and keeps int32
_GROUP_ENTRIES = 2**26


def _filter_group(out: Tensor, group: list[_Box], pixels: int, per_row: int, iterations: int) -> None:
    """Every pass of a group of masks' boxes (``pixels`` in all, ``per_row`` neighbours each) at
    once, written into ``out`` [M, S, S] as logits.

    The passes are one sparse matrix (block diagonal: a row per pixel of every box, its
    neighbours' weights, a neighbour repeated at a box border once more and summed) times the
    probabilities of every box's pixels: a sparse product moves about a third of the memory that
    gathering the neighbours and summing them does (3-4x faster a pass on this CPU)."""
    dev = out.device
    cols, vals = torch.cat([b.columns for b in group]), torch.cat([b.weights for b in group])
    p = torch.cat([b.probs for b in group])
    if _sparse_ok(dev):
        itype = torch.int32 if pixels * per_row < 2**31 else torch.int64  # int64 only for one huge box
        with warnings.catch_warnings():  # torch's notes that sparse CSR is "beta" and its input unchecked: ours is built right
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                torch.arange(0, pixels * per_row + 1, per_row, device=dev, dtype=itype), cols.to(itype), vals, (pixels, pixels))
        for _ in range(iterations):
            p = torch.mv(matrix, p)
    else:  # the same sums as a gather (devices without sparse CSR products, e.g. Apple's MPS)
        cols, vals = cols.view(pixels, per_row), vals.view(pixels, per_row)
        for _ in range(iterations):
            p = (p[cols] * vals).sum(1)
    p = torch.logit(p.clamp_(1e-6, 1 - 1e-6))
    start = 0
    for b in group:
        h, w = b.y1 - b.y0, b.x1 - b.x0
        n = h * w
        out[b.mask, b.y0 : b.y1, b.x0 : b.x1] = p[start : start + n].view(h, w).to(out.dtype)
        start += n


def _sparse_ok(device: torch.device) -> bool:
    """Whether sparse CSR matrix-vector products run on ``device`` (CPU and CUDA)."""
    return device.type in ("cpu", "cuda")
