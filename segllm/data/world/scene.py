"""Scenes of the procedural world: shapes, composites made of parts, textures, layout, rendering.

Everything is drawn with boolean masks in numpy (no antialiasing), so an object's instance
mask and its pixels agree exactly. Objects are drawn in order; a later object covers an
earlier one and every instance mask holds the *visible* pixels only. A placement is rejected
when any object (or part) would keep less than ``min_visible`` of its own area.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

# -- vocabulary ---------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "cyan": (40, 220, 230),
}

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "hexagon", "diamond",
    "ellipse", "cross", "ring", "heart", "arrow",
)

# composite kind -> its parts, in drawing order (a later part covers an earlier one)
COMPOSITES: dict[str, tuple[str, ...]] = {
    "house": ("wall", "door", "roof"),
    "tree": ("trunk", "crown"),
    "lollipop": ("stick", "candy"),
}
PARTS: tuple[str, ...] = tuple(p for parts in COMPOSITES.values() for p in parts)

SIZES: tuple[str, ...] = ("small", "medium", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")

# colour attribute of a composite object (its parts have their own colours)
MIXED = "mixed"

# side of an object's bounding box as a fraction of the image side, per size class
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.11, 0.14),
    "medium": (0.18, 0.22),
    "large": (0.27, 0.32),
}

CATEGORIES: list[dict] = (
    [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    + [{"id": len(SHAPES) + i + 1, "name": c, "supercategory": "composite"}
       for i, c in enumerate(COMPOSITES)]
    + [{"id": len(SHAPES) + len(COMPOSITES) + i + 1, "name": p, "supercategory": "part"}
       for i, p in enumerate(PARTS)]
)
CATEGORY_IDS: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}


@functools.cache
def texture_colour(colour: str) -> tuple[int, int, int]:
    """The second colour of a textured object: a lighter tint of dark colours, a darker shade of
    light ones."""
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    out = rgb * 0.5 if lum >= 128 else rgb * 0.5 + 127.5
    return tuple(int(round(v)) for v in out)


# -- shape masks ----------------------------------------------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates normalised to [-1, 1] (u to the right, v downwards)."""
    v = (np.arange(h, dtype=np.float64) + 0.5) / h * 2.0 - 1.0
    u = (np.arange(w, dtype=np.float64) + 0.5) / w * 2.0 - 1.0
    return u[None, :], v[:, None]


def _polygon(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    u, v = np.broadcast_arrays(u, v)
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x1, y1 = pts[i]
        x2, y2 = pts[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        xint = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < xint)
    return inside


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = -np.pi / 2 + i * np.pi / n
        pts.append((r * np.cos(a), r * np.sin(a) * 1.0 + 0.08))
    return pts


_HEXAGON = [(np.cos(a), np.sin(a) * 0.92) for a in np.arange(6) * np.pi / 3]
_STAR = _star_points()


def shape_box(shape: str, side: int) -> tuple[int, int]:
    """(height, width) of a shape's bounding box for a given nominal side."""
    if shape == "ellipse":
        return max(3, int(round(side * 0.6))), side
    if shape == "tree":
        return side, max(4, int(round(side * 0.7)))
    if shape == "lollipop":
        return side, max(4, int(round(side * 0.6)))
    return side, side


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# masks of a (shape, box) pair and grids, computed once per process (read-only arrays); a
# world uses a few hundred boxes
_SHAPE_MASKS: dict[tuple[str, int, int], np.ndarray] = {}
_COMPOSITE_PARTS: dict[tuple[str, int, int], list[np.ndarray]] = {}
_TEXTURE_MASKS: dict[tuple[str, int, int, int], np.ndarray] = {}
_GRADIENT_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_AREAS: dict[int, int] = {}  # id of a cached mask -> its area


def _shape_mask_cached(shape: str, h: int, w: int) -> np.ndarray:
    key = (shape, h, w)
    m = _SHAPE_MASKS.get(key)
    if m is None:
        m = _SHAPE_MASKS[key] = _frozen(shape_mask(shape, h, w))
        _AREAS[id(m)] = int(m.sum())
    return m


def _composite_parts_cached(kind: str, h: int, w: int) -> list[np.ndarray]:
    """Each part's own pixels (later parts cover earlier ones), in COMPOSITES order."""
    key = (kind, h, w)
    got = _COMPOSITE_PARTS.get(key)
    if got is None:
        masks = composite_masks(kind, h, w)
        label = np.full((h, w), -1, dtype=np.int16)
        for i, m in enumerate(masks):
            label[m] = i
        got = _COMPOSITE_PARTS[key] = [_frozen(label == i) for i in range(len(masks))]
        for m in got:
            _AREAS[id(m)] = int(m.sum())
    return got


def _texture_mask_cached(texture: str, h: int, w: int, period: int) -> np.ndarray:
    key = (texture, h, w, period)
    m = _TEXTURE_MASKS.get(key)
    if m is None:
        m = _TEXTURE_MASKS[key] = _frozen(texture_mask(texture, h, w, period))
    return m


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean mask of a basic shape filling an h x w box."""
    u, v = _grid(h, w)
    if shape == "circle" or shape == "ellipse":
        m = u * u + v * v <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.92) & (np.abs(v) <= 0.92)
    elif shape == "triangle":
        m = _polygon(u, v, [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])
    elif shape == "star":
        m = _polygon(u, v, _STAR)
    elif shape == "hexagon":
        m = _polygon(u, v, _HEXAGON)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "cross":
        m = ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    elif shape == "ring":
        r2 = u * u + v * v
        m = (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    elif shape == "heart":
        x = u * 1.2
        y = -v * 1.25 + 0.2
        m = (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    elif shape == "arrow":
        shaft = (u <= 0.05) & (np.abs(v) <= 0.3)
        head = (u >= 0.05) & (np.abs(v) <= (1.0 - u) / 0.95)
        m = shaft | head
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.broadcast_to(m, (h, w)).copy()


def _rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def composite_masks(kind: str, h: int, w: int) -> list[np.ndarray]:
    """Masks of the parts of a composite (before they cover each other), in COMPOSITES order."""
    if kind == "house":
        roof_h = int(round(h * 0.42))
        u, v = _grid(roof_h, w)
        roof = np.zeros((h, w), dtype=bool)
        roof[:roof_h] = _polygon(u, v, [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])
        c0, c1 = int(round(w * 0.12)), w - int(round(w * 0.12))
        wall = _rect(h, w, roof_h - 1, h, c0, c1)
        dw = max(2, int(round(w * 0.22)))
        d0 = (w - dw) // 2
        door = _rect(h, w, int(round(h * 0.68)), h, d0, d0 + dw)
        return [wall, door, roof]
    if kind == "tree":
        crown_h = int(round(h * 0.66))
        crown = np.zeros((h, w), dtype=bool)
        u, v = _grid(crown_h, w)
        lobes = [(-0.45, 0.3, 0.55), (0.45, 0.3, 0.55), (0.0, -0.35, 0.65)]
        crown[:crown_h] = np.logical_or.reduce(
            [(u - x) ** 2 + (v - y) ** 2 <= r * r for x, y, r in lobes])
        tw = max(2, int(round(w * 0.26)))
        t0 = (w - tw) // 2
        trunk = _rect(h, w, int(round(h * 0.5)), h, t0, t0 + tw)
        return [trunk, crown]
    if kind == "lollipop":
        candy_h = min(w, int(round(h * 0.6)))
        candy = np.zeros((h, w), dtype=bool)
        candy[:candy_h] = shape_mask("circle", candy_h, w)
        sw = max(2, int(round(w * 0.16)))
        s0 = (w - sw) // 2
        stick = _rect(h, w, candy_h // 2, h, s0, s0 + sw)
        return [stick, candy]
    raise ValueError(f"unknown composite {kind!r}")


def texture_mask(texture: str, h: int, w: int, period: int) -> np.ndarray:
    """Pixels of an h x w box drawn in the object's second colour (anchored to the box)."""
    yy, xx = np.mgrid[0:h, 0:w]
    p = max(2, period)
    if texture == "solid":
        return np.zeros((h, w), dtype=bool)
    if texture == "striped":
        return ((xx + yy) // p) % 2 == 1
    if texture == "dotted":
        q = 2 * p
        return ((xx % q) >= 1) & ((xx % q) < p) & ((yy % q) >= 1) & ((yy % q) < p)
    if texture == "checkered":
        c = p + 1
        return (xx // c + yy // c) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


# -- scene records -------------------------------------------------------------------------------


@dataclass
class WorldObject:
    """One object (a shape or a composite) or one part of a composite, with its visible geometry.

    ``id`` is the annotation id local to the scene (1, 2, ...). Geometry (``cx``, ``cy``:
    centroid of the visible mask; ``area``: visible pixels; ``bbox``: [x, y, w, h] of the
    visible mask) is in pixels.
    """

    id: int
    kind: str  # "shape", "composite" or "part"
    shape: str  # category name: a shape, a composite kind or a part name
    colour: str  # a COLOURS key, or MIXED for a composite
    size: str
    texture: str
    parent: int | None = None
    parts: tuple[int, ...] = ()
    cx: float = 0.0
    cy: float = 0.0
    area: int = 0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size,
                "texture": self.texture}

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "parent_id": self.parent,
                "part_ids": list(self.parts), "attributes": self.attributes,
                "centroid": [self.cx, self.cy], "area": self.area, "bbox": list(self.bbox)}


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: list[WorldObject]
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # id -> bool [H, W]

    def by_id(self) -> dict[int, WorldObject]:
        return {o.id: o for o in self.objects}


# -- layout & rendering --------------------------------------------------------------------------


@dataclass
class _Element:
    """A drawable primitive: a basic shape or one part of a composite."""

    mask: np.ndarray  # local bool [h, w]
    y0: int
    x0: int
    colour: str
    texture: str
    area: int  # own area before other objects cover it


@dataclass
class _Spec:
    kind: str
    shape: str
    colour: str
    size: str
    texture: str
    part_colours: tuple[str, ...] = ()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    def tone() -> np.ndarray:
        g = rng.uniform(95, 165)
        return np.clip(g + rng.uniform(-25, 25, size=3), 60, 200)

    kind = rng.integers(3)
    if kind == 0:  # solid
        img = np.broadcast_to(tone(), (size, size, 3)).astype(np.float64)
    else:
        a, b = tone(), tone()
        if kind == 1:  # two-colour gradient along a random direction
            ang = rng.uniform(0, 2 * np.pi)
            grid = _GRADIENT_GRIDS.get(size)
            if grid is None:
                yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
                grid = _GRADIENT_GRIDS[size] = (_frozen(yy - 0.5), _frozen(xx - 0.5))
            yc, xc = grid  # yy - 0.5, xx - 0.5
            t = xc * np.cos(ang) + yc * np.sin(ang)
            t = (t - t.min()) / max(1e-9, t.max() - t.min())
            img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
        else:  # mild noise
            img = a[None, None] + rng.uniform(-12, 12, size=(size, size, 1))
            img = img + rng.uniform(-4, 4, size=(size, size, 3))
    np.rint(img, out=img)  # np.round to 0 decimals
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _sample_spec(rng: np.random.Generator, composite_prob: float,
                 allowed_colours: dict[str, list[str]], force_pair: tuple[str, str] | None,
                 size_cap: int) -> _Spec:
    # _choice(rng, seq) draws what rng.choice(seq) draws (see dataset.py)
    sizes = SIZES[: size_cap + 1]
    if force_pair is not None:
        colour, shape = force_pair
        return _Spec("shape", shape, colour, _choice(rng, sizes), _choice(rng, TEXTURES))
    if rng.random() < composite_prob and size_cap >= 1:
        kind = _choice(rng, _COMPOSITE_KINDS)
        n = len(COMPOSITES[kind])
        cols = [str(c) for c in rng.choice(_COLOUR_NAMES, size=n, replace=False)]
        size = _choice(rng, SIZES[1: size_cap + 1])
        return _Spec("composite", kind, MIXED, size, "solid", tuple(cols))
    shape = _choice(rng, SHAPES)
    colour = _choice(rng, allowed_colours[shape])
    return _Spec("shape", shape, colour, _choice(rng, sizes), _choice(rng, TEXTURES))


_COMPOSITE_KINDS = tuple(COMPOSITES)
_COLOUR_NAMES = list(COLOURS)


def _choice(rng: np.random.Generator, seq):
    """``rng.choice(seq)`` of a sequence of strings, as its element: the same draw."""
    return str(seq[int(rng.integers(len(seq)))])


def _elements(spec: _Spec, rng: np.random.Generator,
              image_size: int) -> tuple[list[_Element], int, int]:
    lo, hi = SIZE_RANGES[spec.size]
    side = max(5, int(round(rng.uniform(lo, hi) * image_size)))
    h, w = shape_box(spec.shape, side)
    if spec.kind == "composite":
        owned = _composite_parts_cached(spec.shape, h, w)
        parts = [(owned[i], spec.part_colours[i], "solid") for i in range(len(owned))]
    else:
        parts = [(_shape_mask_cached(spec.shape, h, w), spec.colour, spec.texture)]
    els = [_Element(m, 0, 0, c, t, _AREAS[id(m)]) for m, c, t in parts]
    return els, h, w


def render_scene(rng: np.random.Generator, *, image_size: int, n_objects: int,
                 composite_prob: float, min_visible: float,
                 allowed_colours: dict[str, list[str]],
                 forced_pairs: list[tuple[str, str]] = (), max_tries: int = 40,
                 ) -> Scene:
    """Lay out and render up to ``n_objects`` objects (fewer if the image is too crowded).

    ``allowed_colours[shape]`` lists the colours a basic shape may take (held-out pairs removed).
    ``forced_pairs`` are (colour, shape) pairs placed first (at least one object each).
    """
    size = image_size
    period = max(2, int(round(size / 42)))
    image = _background(rng, size)
    label = np.full((size, size), -1, dtype=np.int32)
    elements: list[_Element] = []
    specs: list[tuple[_Spec, list[int]]] = []  # spec, element indices

    forced = list(forced_pairs)
    # visible pixels of every element so far, and the least each may keep: what a bincount of
    # the label map would give, kept up to date on the placement box only
    counts = np.zeros(0, dtype=np.int64)
    need = np.zeros(0, dtype=np.float64)
    composites: list[tuple[list[int], float]] = []  # element indices of a composite, least visible
    for k in range(n_objects):
        force = forced[k] if k < len(forced) else None
        placed = False
        size_cap = 2
        for attempt in range(max_tries):
            if attempt and attempt % 12 == 0:
                size_cap = max(0, size_cap - 1)  # crowded: try smaller objects
            spec = _sample_spec(rng, composite_prob, allowed_colours, force, size_cap)
            els, h, w = _elements(spec, rng, size)
            if h > size or w > size:
                continue
            y0 = int(rng.integers(0, size - h + 1))
            x0 = int(rng.integers(0, size - w + 1))
            base = len(elements)
            region = label[y0:y0 + h, x0:x0 + w]
            covered = els[0].mask if len(els) == 1 else np.logical_or.reduce([e.mask for e in els])
            lost = np.bincount(region[covered] + 1, minlength=base + 1)[1:]
            left = counts - lost
            areas = np.array([e.area for e in els], dtype=np.int64)
            # every element (the new ones keep their whole area: their masks are disjoint)
            ok = not (np.any(left < need) or np.any(left < 3)
                      or np.any(areas < min_visible * areas) or np.any(areas < 3))
            if ok:  # whole objects must stay visible enough too (composites)
                for idx, least in composites:
                    if sum(left[i] for i in idx) < least:
                        ok = False
                        break
            if not ok:
                continue
            new_region = region.copy()
            for i, e in enumerate(els):
                new_region[e.mask] = base + i
                e.y0, e.x0 = y0, x0
            label[y0:y0 + h, x0:x0 + w] = new_region
            counts = np.concatenate([left, areas])
            need = np.concatenate([need, min_visible * areas])
            idx = list(range(base, base + len(els)))
            if len(idx) > 1:
                composites.append((idx, min_visible * sum(e.area for e in els)))
            specs.append((spec, idx))
            elements.extend(els)
            placed = True
            break
        if not placed and force is not None:
            raise _LayoutError("could not place a forced object")

    # paint
    for i, e in enumerate(elements):
        h, w = e.mask.shape
        lab = label[e.y0:e.y0 + h, e.x0:e.x0 + w]
        sel = lab == i
        reg = image[e.y0:e.y0 + h, e.x0:e.x0 + w]
        if e.texture == "solid":
            reg[sel] = COLOURS[e.colour]
        else:
            tex = _texture_mask_cached(e.texture, h, w, period)
            reg[sel & ~tex] = COLOURS[e.colour]
            reg[sel & tex] = texture_colour(e.colour)

    # records
    objects: list[WorldObject] = []
    masks: dict[int, np.ndarray] = {}
    next_id = 1
    for spec, idx in specs:
        e = elements[idx[0]]
        box = (e.y0, e.x0, *e.mask.shape)  # every element of an object shares its box
        if spec.kind == "composite":
            oid = next_id
            part_ids = tuple(range(oid + 1, oid + 1 + len(idx)))
            part_masks = [label == ei for ei in idx]
            whole = np.logical_or.reduce(part_masks)
            objects.append(_record(oid, "composite", spec.shape, MIXED, spec.size, "solid",
                                   None, part_ids, whole, box))
            masks[oid] = whole
            for pid, ei, pname, m in zip(part_ids, idx, COMPOSITES[spec.shape], part_masks):
                objects.append(_record(pid, "part", pname, elements[ei].colour, spec.size,
                                       "solid", oid, (), m, box))
                masks[pid] = m
            next_id = oid + 1 + len(idx)
        else:
            m = label == idx[0]
            objects.append(_record(next_id, "shape", spec.shape, spec.colour, spec.size,
                                   spec.texture, None, (), m, box))
            masks[next_id] = m
            next_id += 1
    return Scene(image=image, objects=objects, masks=masks)


class _LayoutError(RuntimeError):
    pass


def _record(oid: int, kind: str, shape: str, colour: str, size: str, texture: str,
            parent: int | None, parts: tuple[int, ...], mask: np.ndarray,
            box: tuple[int, int, int, int] | None = None) -> WorldObject:
    """An object's record from its visible mask; ``box`` (y0, x0, h, w), where given, holds
    every pixel of the mask (it is searched instead of the whole image)."""
    if box is None:
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1))
        return WorldObject(id=oid, kind=kind, shape=shape, colour=colour, size=size,
                           texture=texture, parent=parent, parts=parts,
                           cx=float(xs.mean()) + 0.5, cy=float(ys.mean()) + 0.5,
                           area=int(len(xs)), bbox=bbox)
    # the same from the pixel counts of the box's rows and columns: the sums of coordinates
    # are exact integers, and xs.mean() is their float sum over the count (exact below 2**53)
    y0, x0, h, w = box
    sub = mask[y0:y0 + h, x0:x0 + w]
    rows = np.count_nonzero(sub, axis=1)
    cols = np.count_nonzero(sub, axis=0)
    n = int(rows.sum())
    ry = np.flatnonzero(rows)
    rx = np.flatnonzero(cols)
    sy = int(rows @ np.arange(y0, y0 + h)) / n
    sx = int(cols @ np.arange(x0, x0 + w)) / n
    bbox = (int(x0 + rx[0]), int(y0 + ry[0]), int(rx[-1] - rx[0] + 1), int(ry[-1] - ry[0] + 1))
    return WorldObject(id=oid, kind=kind, shape=shape, colour=colour, size=size,
                       texture=texture, parent=parent, parts=parts,
                       cx=sx + 0.5, cy=sy + 0.5, area=n, bbox=bbox)
