"""Per-pixel attribute maps of a world scene, for dense auxiliary supervision.

Each visible pixel of an object gets the object's colour, category, texture and size class; a
composite's pixels get their part's colour and category (the part is what is drawn there) and
the composite's object category, size and texture. Class 0 is background in every group.
"""

from __future__ import annotations

import numpy as np

from segllm.data.world.scene import CATEGORY_IDS, COLOURS, COMPOSITES, MIXED, SIZES, TEXTURES, WorldObject, _frozen

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
        objects: the scene's objects and parts; each one's ``bbox`` ([x, y, w, h], pixels)
            holds every pixel of its mask (as the world's records do), so only that box is
            written; an empty box (w or h <= 0) means the whole image.
        masks: visible-pixel mask [H, W] bool of every object and part, by id.

    Returns:
        one int16 [H, W] map per group of :data:`DENSE_GROUPS` (0 = background).
    """
    h, w = next(iter(masks.values())).shape
    # the five maps as planes of one array, in DENSE_GROUPS order (colour, category, object,
    # texture, size): what an object writes is a run of consecutive planes, written at once
    planes = np.zeros((len(DENSE_GROUPS), h, w), np.int16)
    # wholes first, then parts on top: a part is what is drawn where it lies
    for o in sorted(objects, key=lambda o: o.parent is not None):
        x, y, bw, bh = o.bbox
        box = (slice(y, y + bh), slice(x, x + bw)) if bw > 0 and bh > 0 else (slice(None),) * 2
        key = (o.parent is None, o.colour, o.shape, o.texture, o.size)
        got = _WRITES.get(key)
        if got is None:
            got = _WRITES[key] = _writes(*key)
        first, values = got
        np.copyto(planes[first:first + len(values), box[0], box[1]], values, where=masks[o.id][box])
    return dict(zip(DENSE_GROUPS, planes))


def _writes(whole: bool, colour: str, shape: str, texture: str, size: str) -> tuple[int, np.ndarray]:
    """What an object writes into dense_labels' planes: (first plane, int16 [k, 1, 1] values of
    planes first .. first + k - 1). A whole writes its colour (none for a composite), category,
    object, texture and size; a part its colour and category."""
    values = [CATEGORY_IDS[shape], CATEGORY_IDS[shape], TEXTURE_CLASSES.get(texture, 0),
              SIZE_CLASSES.get(size, 0)] if whole else [CATEGORY_IDS[shape]]
    first = 1
    if colour != MIXED:
        values.insert(0, COLOUR_CLASSES[colour])
        first = 0
    return first, _frozen(np.array(values, np.int16)[:, None, None])


# (whole, colour, shape, texture, size) -> _writes' answer: a world has a few hundred
_WRITES: dict[tuple, tuple[int, np.ndarray]] = {}


def named_labels(head) -> dict[str, int]:
    """The classes a question's head (:class:`segllm.data.world.language.Head`: the attributes the
    asked-for object must have) names, by label group of :data:`DENSE_GROUPS`; 0 where it names
    none. A composite's name ("house") is its ``object`` class; any other shape or part name
    ("star", "roof") is its ``category`` class (what is drawn at the object's pixels)."""
    out = dict.fromkeys(DENSE_GROUPS, 0)
    if head.colour is not None and head.colour != MIXED:
        out["colour"] = COLOUR_CLASSES[head.colour]
    if head.texture is not None:
        out["texture"] = TEXTURE_CLASSES[head.texture]
    if head.size is not None:
        out["size"] = SIZE_CLASSES[head.size]
    if head.shape is not None:
        out["object" if head.shape in COMPOSITES else "category"] = CATEGORY_IDS[head.shape]
    return out
