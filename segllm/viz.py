"""Overlays: each round's masks in its own colour, labelled with its round number (and, where
the round has several masks, their place in the answer: 2.1, 2.2, ...)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]


def colour(round_number: int) -> tuple[int, int, int]:
    """The colour of a 1-indexed round."""
    return PALETTE[(round_number - 1) % len(PALETTE)]


def mask_labels(round_number: int, count: int) -> list[str]:
    """The labels of a round's masks: "k" for one mask, "k.1", "k.2", ... (the answer's order)
    for several."""
    if count == 1:
        return [str(round_number)]
    return [f"{round_number}.{j}" for j in range(1, count + 1)]


def overlay(image: np.ndarray, masks: list[tuple[int, np.ndarray]], *, alpha: float = 0.5,
            labels: list[str] | None = None, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw masks over an image.

    Args:
        image: [H, W, 3] uint8.
        masks: (round number, [H, W] bool mask) pairs; later ones are drawn on top.
        alpha: opacity of the mask colour.
        labels: one label per mask (default: its round number); see :func:`mask_labels`. An
            empty label draws none.
        fill: one colour for every mask (default: each round's own, :func:`colour`).

    Returns:
        an RGB PIL image with each mask tinted in its round's colour, outlined and labelled.
    """
    if labels is not None and len(labels) != len(masks):
        raise ValueError(f"{len(labels)} labels for {len(masks)} masks")
    out = image.astype(np.float32).copy()
    for rnd, m in masks:
        m = np.asarray(m, bool)
        c = colour(rnd) if fill is None else fill
        out[m] = (1 - alpha) * out[m] + alpha * np.array(c, np.float32)
        edge = m & ~_erode(m)
        out[edge] = c
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for i, (rnd, m) in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        x, y = int(xs.min()), int(ys.min())
        label = str(rnd) if labels is None else labels[i]
        if not label:
            continue
        box = draw.textbbox((x, y), label)
        draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=colour(rnd))
        draw.text((x, y), label, fill=(0, 0, 0))
    return pil


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
