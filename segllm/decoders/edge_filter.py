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

import threading
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["colour_guided_filter"]


class _Box(NamedTuple):
    """One mask's box to filter: mask index, rows y0:y1 and columns x0:x1 of the frame."""

    mask: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def pixels(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


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
    rows_on, cols_on = on.any(2), on.any(1)  # [M, S] each: rows and columns with mask pixels
    per_row = (2 * radius + 1) ** 2
    groups: list[list[_Box]] = [[]]  # masks filtered together
    pixels = 0  # pixels of the last group's boxes so far
    for i in range(m):
        rows, cols = rows_on[i].nonzero()[:, 0], cols_on[i].nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        box = _Box(i, max(0, int(rows[0]) - margin), min(s, int(rows[-1]) + 1 + margin),
                   max(0, int(cols[0]) - margin), min(s, int(cols[-1]) + 1 + margin))
        if groups[-1] and (pixels + box.pixels) * per_row > _GROUP_ENTRIES:
            groups.append([])
            pixels = 0
        groups[-1].append(box)
        pixels += box.pixels
    out = logits.clone()
    for group in groups:
        if group:
            _filter_group(out, logits, image, group, radius, sigma_space, sigma_colour, iterations)
    return out


# at most this many weights in one sparse matrix (~0.5 GB with their int32 columns): bounds the
# memory of many large masks (a 1024 x 1024 frame's box has 81M at radius 4) and keeps int32
_GROUP_ENTRIES = 2**26


def _filter_group(out: Tensor, logits: Tensor, image: Tensor, group: list[_Box], radius: int, sigma_space: float,
                  sigma_colour: float, iterations: int) -> None:
    """Every pass of a group of masks' boxes at once, written into ``out`` [M, S, S] as logits.

    The passes are one sparse matrix (block diagonal: a row per pixel of every box, its
    neighbours' weights, a neighbour repeated at a box border once more and summed) times the
    probabilities of every box's pixels: a sparse product moves about a third of the memory that
    gathering the neighbours and summing them does (3-4x faster a pass on this CPU). Each box's
    neighbour indices, weights and probabilities are written into the group's arrays in place
    (no concatenation, no second copy of the indices in int32)."""
    dev = out.device
    offsets = torch.arange(-radius, radius + 1, device=dev)
    dy, dx = offsets.repeat_interleave(len(offsets)), offsets.repeat(len(offsets))  # [k*k] each
    k2 = len(dy)
    space = ((dy.square() + dx.square()).float() / (2 * sigma_space**2)).view(1, -1)  # [1, k*k]
    pixels = sum(b.pixels for b in group)
    itype = torch.int32 if pixels * k2 < 2**31 else torch.int64  # int64 only for one huge box
    cols = _workspace("cols", pixels * k2, itype, dev)
    vals = _workspace("vals", pixels * k2, torch.float32, dev)
    p = torch.empty(pixels, dtype=torch.float32, device=dev)
    start = 0
    for b in group:
        h, w = b.y1 - b.y0, b.x1 - b.x0
        n = h * w
        # each pixel's k*k neighbours in the box (its border repeated outward) as flat indices,
        # in the order of the offsets (so each pixel's indices never decrease: sorted CSR rows)
        ys = (torch.arange(h, device=dev, dtype=itype).view(h, 1, 1) + dy.view(1, 1, -1)).clamp_(0, h - 1)
        xs = (torch.arange(w, device=dev, dtype=itype).view(1, w, 1) + dx.view(1, 1, -1)).clamp_(0, w - 1)
        index = cols[start * k2 : (start + n) * k2]
        torch.add(ys.mul_(w), xs, out=index.view(h, w, k2))  # [h, w, k*k], local to the box
        # only the box in float (a frame of the released size is 1024 x 1024)
        colours = (image[b.mask] if image.ndim == 4 else image)[:, b.y0 : b.y1, b.x0 : b.x1].to(dev, torch.float32).div_(255.0).reshape(3, n)
        d2 = colours.index_select(1, index).view(3, n, -1).sub_(colours[:, :, None]).square_()
        colour_d2 = d2[0].add_(d2[1]).add_(d2[2])  # [h*w, k*k]
        # exponents held at -30 and probabilities at 1e-6 and above: a weight below e^-30 is lost
        # against the centre's 1 in float32 anyway, and exp's subnormal results (below e^-87, any
        # clear colour edge) and products with them are ~40x slower on CPUs than normal numbers
        weights = torch.exp((space + colour_d2 / (2 * sigma_colour**2)).neg_().clamp_(min=-30.0),
                            out=vals[start * k2 : (start + n) * k2].view(n, k2))
        weights /= weights.sum(1, keepdim=True)  # the centre weighs 1 before normalising: never 0 / 0
        torch.sigmoid(logits[b.mask, b.y0 : b.y1, b.x0 : b.x1].float(), out=p[start : start + n].view(h, w)).clamp_(min=1e-6)
        index += start  # into the group's pixels
        start += n
    if _sparse_ok(dev):
        with warnings.catch_warnings():  # torch's notes that sparse CSR is "beta" and its input unchecked: ours is built right
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                torch.arange(0, pixels * k2 + 1, k2, device=dev, dtype=itype), cols, vals, (pixels, pixels))
        for _ in range(iterations):
            p = torch.mv(matrix, p)
    else:  # the same sums as a gather (devices without sparse CSR products, e.g. Apple's MPS)
        cols, vals = cols.view(pixels, k2), vals.view(pixels, k2)
        for _ in range(iterations):
            p = (p[cols] * vals).sum(1)
    p = torch.logit(p.clamp_(1e-6, 1 - 1e-6))
    start = 0
    for b in group:
        h, w = b.y1 - b.y0, b.x1 - b.x0
        n = h * w
        out[b.mask, b.y0 : b.y1, b.x0 : b.x1] = p[start : start + n].view(h, w).to(out.dtype)
        start += n


def _workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [numel] tensor for this thread's group arrays, reused from call to call up to
    ``_WORKSPACE_BYTES``: memory the allocator hands out afresh is faulted in page by page on
    first use, which cost about as much as computing the weights (larger groups get new memory)."""
    most = _WORKSPACE_BYTES // torch.empty((), dtype=dtype).element_size()  # elements
    if device.type != "cpu" or numel > most:
        return torch.empty(numel, dtype=dtype, device=device)
    cache = _WORKSPACES.__dict__.setdefault("buffers", {})
    buf = cache.get((name, dtype))
    if buf is None or buf.numel() < numel:  # grown by doubling: few new buffers as groups vary
        buf = cache[name, dtype] = torch.empty(min(most, max(numel, 0 if buf is None else 2 * buf.numel())), dtype=dtype)
    return buf[:numel]


_WORKSPACES = threading.local()  # each thread's own (batch segmentation's lanes filter at once)
_WORKSPACE_BYTES = 64 * 2**20


def _sparse_ok(device: torch.device) -> bool:
    """Whether sparse CSR matrix-vector products run on ``device`` (CPU and CUDA)."""
    return device.type in ("cpu", "cuda")
