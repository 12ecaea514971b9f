"""Per-pixel attribute maps of a world scene, for dense auxiliary supervision.

Each visible pixel of an object gets the object's colour, category, texture and size class; a
composite's pixels get their part's colour and category (the part is what is drawn there) and
the composite's object category, size and texture. Class 0 is background in every group.
"""

from __future__ import annotations

import numpy as np

from segllm.data.world.scene import CATEGORY_IDS, COLOURS, MIXED, SIZES, TEXTURES, WorldObject

COLOUR_CLASSES = {c: i + 1 for i, c in enumerate(COLOURS)}
SIZE_CLASSES = {s: i + 1 for i, s in enumerate(SIZES)}
TEXTURE_CLASSES = {t: i + 1 for i, t in enumerate(TEXTURES)}

# label groups and their class counts (background included), as DenseConfig.groups wants them
DENSE_GROUPS: dict[str, int] = {
    "colour": len(COLOURS) + 1,
    "category": max(CATEGORY_IDS.values()) + 1,  # what is drawn there: a shape or a part
    "object": max(CATEGORY_IDS.values()) + 1,  # the top-level object there: a shape or a composite
    "texture": len(TEXTURES) + 1,
    "size": len(SIZES) + 1,
}


def dense_labels(objects: list[WorldObject], masks: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Class maps of one scene.

    Args:
        objects: the scene's objects and parts.
        masks: visible-pixel mask [H, W] bool of every object and part, by id.

    Returns:
        one int16 [H, W] map per group of :data:`DENSE_GROUPS` (0 = background).
    """
    h, w = next(iter(masks.values())).shape
    out = {name: np.zeros((h, w), np.int16) for name in DENSE_GROUPS}
    # wholes first, then parts on top: a part is what is drawn where it lies
    for o in sorted(objects, key=lambda o: o.parent is not None):
        m = masks[o.id]
        if o.colour != MIXED:
            out["colour"][m] = COLOUR_CLASSES[o.colour]
        out["category"][m] = CATEGORY_IDS[o.shape]
        if o.parent is None:
            out["object"][m] = CATEGORY_IDS[o.shape]
            out["texture"][m] = TEXTURE_CLASSES.get(o.texture, 0)
            out["size"][m] = SIZE_CLASSES.get(o.size, 0)
    return out
