"""Exporting a session's masks: PNG files, COCO RLE, and a COCO-style JSON of the whole session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def to_rle(mask: np.ndarray) -> dict:
    """[H, W] bool mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def from_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed, as :func:`to_rle` writes) -> [H, W] bool."""
    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


def save_masks(replies, folder: str | Path) -> list[Path]:
    """Write ``round{k}_mask{j}.png`` (0/255) for every mask of every reply."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in replies:
        for j, m in enumerate(r.masks, start=1):
            p = folder / f"round{r.round}_mask{j}.png"
            Image.fromarray(np.asarray(m, np.uint8) * 255).save(p)
            paths.append(p)
    return paths


def session_to_coco(replies, image_size: tuple[int, int], *, file_name: str = "image.png") -> dict:
    """A COCO-style dict: one image, one annotation per mask with its round, its place among the
    round's masks (``mask``: 1, 2, ... in the answer's order, as ``round{k}_mask{j}.png``), the
    question and the answer."""
    h, w = image_size
    anns = []
    for r in replies:
        for j, m in enumerate(r.masks):
            x0, y0, x1, y1 = (float(v) for v in r.boxes[j])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 1,
                    "category_id": 1,
                    "segmentation": to_rle(m),
                    "area": int(np.count_nonzero(m)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                    "score": float(r.scores[j]),
                    "round": r.round,
                    "mask": j + 1,
                    "question": r.question,
                    "refs": list(r.refs),
                    "answer": r.text,
                    "user": bool(getattr(r, "user", False)),  # a region the user gave, not a prediction
                }
            )
    return {
        "images": [{"id": 1, "file_name": file_name, "height": h, "width": w}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
