"""The interface every mask decoder implements, and the square-frame geometry they share.

A mask decoder sees an image placed in a square frame: resized so its longest side is
``size`` pixels, then zero-padded at the bottom and right (SAM's ResizeLongestSide + pad).
It predicts masks in that frame at a lower resolution; :meth:`MaskDecoder.postprocess`
brings them back to the original image.

Prompts come from the LLM: each ``<seg>`` yields ``K`` prompt tokens of width ``D``, the
first ``num_ref_tokens`` of which describe the referenced earlier mask ([REF]) and the rest
the target ([SEG]). A decoder returns two mask channels per prompt: channel 0 for [REF],
channel 1 for [SEG].
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from segllm.checks import on_host, require
from segllm.errors import ImageError

REF, SEG = 0, 1  # mask channels of DecoderOutput


@dataclass(frozen=True)
class Frame:
    """Where an image of ``height`` x ``width`` pixels sits inside the decoder's square input.

    The image was resized to ``resized_height`` x ``resized_width`` (longest side == ``size``)
    and placed at the top-left of a ``size`` x ``size`` canvas.
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    size: int

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> Frame:
        scale = size / max(height, width)
        return cls(
            height=height,
            width=width,
            resized_height=max(1, int(height * scale + 0.5)),
            resized_width=max(1, int(width * scale + 0.5)),
            size=size,
        )


@dataclass
class DecoderOutput:
    """Raw decoder predictions for N prompts.

    Attributes:
        mask_logits: [N, 2, h, w] logits in the padded square frame at the decoder's output
            resolution; channel 0 is [REF], channel 1 is [SEG].
        iou_scores: [N, 2] predicted IoU of each channel's mask (unbounded regression output;
            the model's confidence).
        boxes: optional [N, 2, 4] (x0, y0, x1, y1) box of each channel's mask in the padded
            square frame, in input pixels, for decoders that predict boxes (HIPIE); None otherwise.
        set_outputs: optional decoder-specific per-query predictions for set-prediction
            training losses (HIPIE: :class:`~segllm.decoders.hipie.decoder.HipieSetOutputs`),
            only when the caller asks for them; None otherwise.
        attributes: for decoders with attribute matching (the direct decoder's
            ``attributes``), the class logits of every pixel, [B, g, g, T] per image (T: the
            groups' class counts summed), and of every prompt's named classes, [N, T], for the
            dense labels to supervise; None otherwise.
    """

    mask_logits: Tensor
    iou_scores: Tensor
    boxes: Tensor | None = None
    set_outputs: Any = None
    attributes: tuple[Tensor, Tensor] | None = None


def resize_and_pad(image: Tensor, frame: Frame, *, mode: str = "bilinear") -> Tensor:
    """Place images into the square frame.

    Args:
        image: [B, C, H, W] float tensor with H, W == frame.height, frame.width.
        frame: the target frame.
        mode: interpolation mode for ``F.interpolate``.

    Returns:
        [B, C, size, size]; the area outside the resized image is zero.
    """
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    size = (frame.resized_height, frame.resized_width)
    # at its own size an image is left as it is: interpolating would give the same values
    # (tests/decoders/test_sam.py checks it) at the cost of a pass over every pixel
    resized = image if tuple(image.shape[-2:]) == size else F.interpolate(image, size=size, mode=mode, **kwargs)
    pad_bottom = frame.size - frame.resized_height
    pad_right = frame.size - frame.resized_width
    return F.pad(resized, (0, pad_right, 0, pad_bottom))


def normalized_frame(image: Tensor, size: int, mean: tuple[float, float, float], std: tuple[float, float, float]) -> tuple[Tensor, Frame]:
    """uint8 image [3, H, W] -> float32 [3, size, size] and its :class:`Frame`: scaled to [0, 1],
    normalised by ``mean`` / ``std`` per channel, resized (longest side ``size``) and zero-padded.

    Normalising BEFORE padding leaves the padding exactly 0 in the normalised space (the mean
    colour), as SAM does; normalisation is a per-channel affine map and the resize weights sum
    to one, so normalising before or after the resize gives the same pixels.

    Raises:
        ImageError: if ``image`` is not a uint8 tensor of shape [3, H, W] with H, W >= 1.
    """
    height, width = check_image(image)
    frame = Frame.fit(height, width, size)
    x = image.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    x = x.sub_(m).div_(s)  # in place: x is this function's own
    if (frame.resized_height, frame.resized_width) == (height, width) == (size, size):
        return x, frame  # already the frame: no resize, no padding (and no copy)
    return resize_and_pad(x[None], frame)[0], frame


def image_to_frame(image: Tensor, frame: Frame) -> Tensor:
    """uint8 image [3, H, W] -> uint8 [3, size, size]: resized with PIL's bilinear filter (as the
    released code's ResizeLongestSide) and zero-padded at the bottom/right."""
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    resized = pil.resize((frame.resized_width, frame.resized_height), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
    return F.pad(x, (0, frame.size - frame.resized_width, 0, frame.size - frame.resized_height)).to(image.device)


def mask_to_frame(mask: Tensor, frame: Frame) -> Tensor:
    """bool mask [H, W] at the image's resolution -> bool [size, size] in the frame (nearest)."""
    x = F.interpolate(mask[None, None].float(), size=(frame.resized_height, frame.resized_width), mode="nearest")
    return F.pad(x, (0, frame.size - frame.resized_width, 0, frame.size - frame.resized_height))[0, 0] > 0.5


def masks_to_frame(masks: Tensor, frame: Frame, out_size: int) -> Tensor:
    """Ground-truth masks at the original resolution -> soft targets in the decoder's output frame.

    Args:
        masks: [M, H, W] bool or float masks at the original image resolution.
        frame: the frame of that image.
        out_size: side of the decoder's (square) output logits.

    Returns:
        [M, out_size, out_size] float in [0, 1] (area-averaged, so edges are soft).
    """
    x = masks.float()[:, None]
    x = resize_and_pad(x, frame)
    if out_size != frame.size:
        whole = frame.size % out_size == 0
        x = _block_mean(x, frame.size // out_size) if whole else F.interpolate(x, size=(out_size, out_size), mode="area")
    return x[:, 0].clamp_(0, 1)


def _block_mean(x: Tensor, k: int) -> Tensor:
    """[..., H, W] -> [..., H / k, W / k]: the mean of each k x k block (H, W multiples of k): the
    area averaging of ``F.interpolate(mode="area")`` at a whole factor, as k + k strided sums;
    on the CPU ~5x faster than its (or ``avg_pool2d``'s) kernel on one-channel masks, a cost paid
    for every target mask of every training batch. Equal to it up to float rounding (exactly,
    for 0/1 masks at a power-of-two factor)."""
    rows = x[..., 0::k, :]
    for i in range(1, k):
        rows = rows + x[..., i::k, :]
    out = rows[..., 0::k]
    for j in range(1, k):
        out = out + rows[..., j::k]
    return out.div_(k * k)


def mask_to_output_frame(mask: Tensor, frame: Frame, out_size: int) -> Tensor:
    """One mask -> a soft [out_size, out_size] float map in the decoder's output frame.

    ``mask``: [H, W] at the image's resolution (as :func:`masks_to_frame`), or [size, size]
    already in the decoder's square input frame (area-averaged down to ``out_size``).
    """
    in_frame = tuple(mask.shape) == (frame.size, frame.size) and (frame.height, frame.width) != (frame.size, frame.size)
    if not in_frame:
        return masks_to_frame(mask[None], frame, out_size)[0]
    x = mask.float()[None, None]
    if out_size != frame.size:
        x = F.interpolate(x, size=(out_size, out_size), mode="area")
    return x[0, 0].clamp_(0, 1)


def logits_to_image(logits: Tensor, frame: Frame) -> Tensor:
    """Mask logits in the decoder's output frame -> logits at the original image resolution.

    Args:
        logits: [M, h, w] logits covering the padded square frame.
        frame: the frame of the image.

    Returns:
        [M, frame.height, frame.width] logits.
    """
    return frame_to_image(logits_to_frame(logits, frame), frame)


def frame_to_image(frame_logits: Tensor, frame: Frame) -> Tensor:
    """Logits [M, size, size] in the decoder's input frame -> [M, frame.height, frame.width]:
    the padding cut off, then resized to the image (for callers that need both resolutions)."""
    x = frame_logits[:, None, : frame.resized_height, : frame.resized_width]
    x = F.interpolate(x, size=(frame.height, frame.width), mode="bilinear", align_corners=False)
    return x[:, 0]


def logits_to_frame(logits: Tensor, frame: Frame) -> Tensor:
    """Mask logits [M, h, w] in the decoder's output frame -> [M, size, size] logits in its
    input frame (bilinear, as the released code upsamples HIPIE's masks to 1024)."""
    return F.interpolate(logits[:, None].float(), size=(frame.size, frame.size), mode="bilinear", align_corners=False)[:, 0]


def most_confident_region(logits: Tensor) -> Tensor:
    """Each mask's 8-connected region (of its pixels with logit > 0) with the most probability
    mass, the sum of sigmoid(logit) over the region (of two regions with the same mass, the one
    whose first pixel comes first in row-major order).

    Args:
        logits: [M, H, W] mask logits.

    Returns:
        [M, H, W] bool: the chosen region of each mask (all False where no pixel is above 0).
    """
    on = logits > 0
    if logits.shape[0] == 0 or not bool(on.any()):
        return on
    # only the rows and columns where some mask is on: objects are a small part of the frame
    rows, cols = on.any(dim=(0, 2)).nonzero()[:, 0], on.any(dim=(0, 1)).nonzero()[:, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = on[:, y0:y1, x0:x1].cpu().numpy()
    probs = logits[:, y0:y1, x0:x1].detach().float().sigmoid().cpu().numpy().astype(np.float64)
    probs[~crop] = 0.0  # off pixels weigh nothing (a NaN logit there would spoil its row's sums)
    keep = _best_regions(crop, probs)
    out = torch.zeros_like(on)
    out[:, y0:y1, x0:x1] = torch.from_numpy(keep).to(on.device)
    return out


def _best_regions(on: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """[M, H, W] bool masks and float64 probabilities -> [M, H, W] bool, each mask's 8-connected
    region with the most probability mass.

    Works on runs (maximal horizontal stretches of a row's on pixels), not pixels: a mask's runs
    are a few per row, so the union-find below touches tens of runs per object instead of
    repeating a 3 x 3 maximum over the whole map once per pixel of the longest region.
    """
    m, h, w = on.shape
    padded = np.zeros((m * h, w + 2), np.int8)  # a column of zeros either side: every run ends
    padded[:, 1:-1] = on.reshape(m * h, w)
    edges = padded[:, 1:] - padded[:, :-1]
    row_s, start = np.nonzero(edges == 1)  # both in row-major order, so the i-th start and the
    row_e, end = np.nonzero(edges == -1)  # i-th end are one run's: columns [start, end)
    assert np.array_equal(row_s, row_e)
    n = len(start)
    # each run's probability mass from the rows' running sums
    cum = np.zeros((m * h, w + 1))
    np.cumsum(probs.reshape(m * h, w), axis=1, out=cum[:, 1:])
    mass = cum[row_s, end] - cum[row_s, start]
    # runs of consecutive rows of one mask touch (8-connected) when [start, end] ranges overlap
    # with one pixel of slack; runs of one row are sorted, so the touching runs of the next row
    # are one contiguous range of indices, found by binary search on row-offset keys
    span = w + 2
    key_start, key_end = row_s * span + start, row_s * span + end
    below = (row_s + 1) * span  # the same columns one row down (crossing into the next mask's
    lo = np.searchsorted(key_end, below + start, side="left")  # first row is excluded below)
    hi = np.searchsorted(key_start, below + end, side="right")
    same_mask = (row_s % h) != h - 1
    counts = np.where(same_mask, np.maximum(hi - lo, 0), 0)
    a = np.repeat(np.arange(n), counts)
    b = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    parent = list(range(n))
    for i, j in zip(a.tolist(), b.tolist()):
        while parent[i] != i:  # path halving
            parent[i] = i = parent[parent[i]]
        while parent[j] != j:
            parent[j] = j = parent[parent[j]]
        if i != j:
            parent[max(i, j)] = min(i, j)  # the root is a region's first run
    root = np.array(parent)
    while True:  # every run straight to its root
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    region_mass = np.bincount(root, weights=mass, minlength=n)
    masks_of = row_s // h
    # per mask the root with the most mass: sort by (mask, -mass, root) and take each mask's first
    roots = np.nonzero(root == np.arange(n))[0]
    ranked = roots[np.lexsort((roots, -region_mass[roots], masks_of[roots]))]
    first = np.ones(len(ranked), bool)
    first[1:] = masks_of[ranked][1:] != masks_of[ranked][:-1]
    chosen = np.zeros(n, bool)
    chosen[ranked[first]] = True
    runs = np.nonzero(chosen[root])[0]
    delta = np.zeros((m * h, w + 1), np.int8)
    np.add.at(delta, (row_s[runs], start[runs]), 1)
    np.add.at(delta, (row_s[runs], end[runs]), -1)
    return (np.cumsum(delta[:, :w], axis=1) > 0).reshape(m, h, w)


class MeanStdInput:
    """``preprocess`` and ``input_normalization`` of a :class:`MaskDecoder` whose input is the
    image in its square frame normalised by its config's ``mean`` and ``std``
    (:func:`normalized_frame`): SAM's and the direct decoder's. Listed before ``MaskDecoder``
    among the bases."""

    image_size: int

    def preprocess(self, image: Tensor) -> tuple[Tensor, Frame]:
        """uint8 image [3, H, W] -> normalised float32 input [3, S, S] and its :class:`Frame`.

        Raises:
            ImageError: if ``image`` is not a uint8 tensor of shape [3, H, W] with H, W >= 1.
        """
        return normalized_frame(image, self.image_size, self.config.mean, self.config.std)

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std): :func:`normalized_frame` of an image already at the frame's size does
        nothing else."""
        return tuple(self.config.mean), tuple(self.config.std)


class MaskDecoder(nn.Module, abc.ABC):
    """A promptable mask decoder: image features + K prompt tokens -> [REF]/[SEG] masks.

    Subclasses set ``image_size`` (side of the square input), ``num_prompt_tokens`` (K),
    ``num_ref_tokens`` and ``prompt_dim`` (D), have an ``image_encoder`` module (the part that
    :meth:`encode_image` runs: the "decoder_encoder" trainable part) and implement the three
    abstract methods and :attr:`output_size`. New kinds are registered in
    :mod:`segllm.decoders.registry`.

    ``supports_set_prediction``: the decoder can be trained with set-prediction losses
    (``loss.set_prediction``): its ``forward`` also takes ``denoising=`` and
    ``set_outputs=True`` and then fills :attr:`DecoderOutput.set_outputs` with per-query
    predictions that :class:`segllm.decoders.hipie.criterion.HipieSetCriterion` scores (HIPIE).

    ``takes_ref_masks``: its ``forward`` also takes ``ref_masks=`` ([N, h, w] float in [0, 1]
    in its output frame: the earlier mask each prompt's round refers to, zeros where none), and
    the model passes them when mask memory is on.
    """

    image_size: int
    num_prompt_tokens: int
    num_ref_tokens: int
    prompt_dim: int
    supports_set_prediction: bool = False
    takes_ref_masks: bool = False

    @abc.abstractmethod
    def preprocess(self, image: Tensor) -> tuple[Tensor, Frame]:
        """uint8 image [3, H, W] -> normalised input [3, S, S] (S = image_size) and its frame."""

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) per channel when :meth:`preprocess` of an S x S image is only
        ``(image / 255 - mean) / std`` (then a training batch may carry the images uint8 and
        normalise them on the model's device: :meth:`segllm.batch.Batch.decoder_input`); None
        where it does more (the default)."""
        return None

    @abc.abstractmethod
    def encode_image(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed images -> image features (cacheable per image), [B, C, h, w]."""

    @abc.abstractmethod
    def forward(self, image_features: Tensor, prompts: Tensor, batch_index: Tensor) -> DecoderOutput:
        """Decode N prompts.

        Args:
            image_features: [B, C, h, w] from :meth:`encode_image`.
            prompts: [N, K, D] prompt tokens from the prompt head.
            batch_index: [N] long, which image each prompt belongs to.
        """

    @property
    def output_size(self) -> int:
        """Side of the square ``mask_logits`` this decoder returns."""
        raise NotImplementedError


def check_decoder_inputs(image_features: Tensor, prompts: Tensor, batch_index: Tensor, *, width: int, grid: int, tokens: int, channels: int | None = None) -> None:
    """Raise ValueError naming what is off in a decoder's inputs.

    Expected: ``image_features`` [B, channels, grid, grid] (``channels`` defaults to ``width``),
    ``prompts`` [N, tokens, width] and ``batch_index`` [N] integers in [0, B).
    """
    c, g, k = (width if channels is None else channels), grid, tokens
    w = width
    if image_features.ndim != 4 or tuple(image_features.shape[1:]) != (c, g, g):
        raise ValueError(f"image_features must be [B, {c}, {g}, {g}], got {list(image_features.shape)}")
    if prompts.ndim != 3:
        raise ValueError(f"prompts must be [N, K, D], got {list(prompts.shape)}")
    if prompts.shape[1] != k:
        raise ValueError(f"prompts have {prompts.shape[1]} tokens per prompt, expected num_prompt_tokens={k}")
    if prompts.shape[2] != w:
        raise ValueError(f"prompts have width {prompts.shape[2]}, expected prompt_dim={w}")
    if batch_index.ndim != 1 or batch_index.shape[0] != prompts.shape[0]:
        raise ValueError(f"batch_index must be [N] with N={prompts.shape[0]} (one per prompt), got {list(batch_index.shape)}")
    if batch_index.dtype.is_floating_point or batch_index.dtype.is_complex or batch_index.dtype == torch.bool:
        raise ValueError(f"batch_index must be an integer tensor, got {batch_index.dtype}")
    if batch_index.numel():
        b = image_features.shape[0]
        if on_host(batch_index):  # the values named in the message
            lo, hi = int(batch_index.min()), int(batch_index.max())
            if lo < 0 or hi >= b:
                raise ValueError(f"batch_index out of range: values in [{lo}, {hi}] but there are {b} images")
        else:  # read nothing back from an accelerator (segllm.checks)
            require((batch_index.min() >= 0) & (batch_index.max() < b), f"batch_index out of range: there are {b} images")


def check_image(image: Tensor) -> tuple[int, int]:
    """(height, width) of a decoder's input image; ImageError unless it is a uint8 tensor of
    shape [3, H, W] with H, W >= 1."""
    if not isinstance(image, Tensor):
        raise ImageError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ImageError(f"image must be uint8 (0-255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ImageError(f"image must be [3, H, W] (RGB, channels first), got shape {list(image.shape)}")
    height, width = image.shape[1:]
    if height < 1 or width < 1:
        raise ImageError(f"image is empty: {height}x{width} pixels")
    return int(height), int(width)
