"""Scenes of the procedural world: shapes, composites made of parts, textures, layout, rendering.

Everything is drawn with boolean masks in numpy (no antialiasing), so an object's instance
mask and its pixels agree exactly. Objects are drawn in order; a later object covers an
earlier one and every instance mask holds the *visible* pixels only. A placement is rejected
when any object (or part) would keep less than ``min_visible`` of its own area.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np

from segllm.data.world.draws import Draws

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


# what is drawn for a (shape or composite kind, box) pair, computed once per process (read-only
# arrays); a world uses a few hundred boxes
_TEXTURE_MASKS: dict[tuple[str, int, int, int], np.ndarray] = {}


@dataclass(frozen=True)
class _Form:
    """The element masks of one shape or composite in an h x w box.

    ``masks``: each element's own pixels (a composite's later parts cover earlier ones), in
    COMPOSITES order; ``areas``: their pixel counts; ``covered``: their union; ``big_enough``:
    every element has at least 3 pixels (a smaller one is never placed)."""

    masks: tuple[np.ndarray, ...]
    areas: tuple[int, ...]
    covered: np.ndarray
    big_enough: bool


_FORMS: dict[tuple[str, int, int], _Form] = {}


def _form(kind: str, shape: str, h: int, w: int) -> _Form:
    key = (shape, h, w)
    f = _FORMS.get(key)
    if f is None:
        if kind == "composite":
            drawn = composite_masks(shape, h, w)
            label = np.full((h, w), -1, dtype=np.int16)
            for i, m in enumerate(drawn):
                label[m] = i
            masks = tuple(_frozen(label == i) for i in range(len(drawn)))
            covered = _frozen(label >= 0)
        else:
            masks = (_frozen(shape_mask(shape, h, w)),)
            covered = masks[0]
        areas = tuple(int(m.sum()) for m in masks)
        f = _FORMS[key] = _Form(masks, areas, covered, min(areas) >= 3)
    return f


def _textured(form: _Form, texture: str, period: int) -> np.ndarray:
    """The pixels of a basic shape's form drawn in its texture's second colour."""
    key = (id(form), texture, period)  # forms are kept for the process
    m = _TEXTURED.get(key)
    if m is None:
        h, w = form.covered.shape
        m = _TEXTURED[key] = _frozen(form.covered & _texture_mask_cached(texture, h, w, period))
    return m


_TEXTURED: dict[tuple[int, str, int], np.ndarray] = {}


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
class _Spec:
    kind: str
    shape: str
    colour: str
    size: str
    texture: str
    part_colours: tuple[str, ...] = ()


# per image size: pixel-centre grids of the gradient background (yy - 0.5, xx - 0.5, over the
# image side - 1), and the row and column index of every pixel of a raveled image
_GRADIENT_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_PIXEL_INDEX: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _tone(d: Draws) -> list[float]:
    """``np.clip(g + rng.uniform(-25, 25, size=3), 60, 200)`` with ``g = rng.uniform(95, 165)``,
    one channel at a time (the same draws and the same float64 operations)."""
    g = d.uniform(95, 165)
    return [min(max(g + (-25.0 + 50.0 * d.random()), 60.0), 200.0) for _ in range(3)]


def _scratch(size: int) -> list[np.ndarray]:
    """Float64 work arrays of this thread for one image size: four [size, size] planes and one
    [size, size, 3] image. Reused: a fresh array of this size is mapped anew by the allocator
    (page faults on every call)."""
    got = getattr(_SCRATCH, "arrays", None)
    if got is None or got[0].shape[0] != size:
        got = _SCRATCH.arrays = [np.empty((size, size)) for _ in range(4)] + [np.empty((size, size, 3))]
    return got


_SCRATCH = threading.local()


def _background(d: Draws, size: int) -> np.ndarray:
    """The background image, uint8 [size, size, 3]. Computed one channel at a time (numpy's
    broadcasting over a last axis of 3 is slow), with the float64 operations of the readable form
    in the comments, element by element the same."""
    kind = d.integers(3)
    img = np.empty((size, size, 3), dtype=np.uint8)
    if kind == 0:  # solid: np.rint of each channel (round half to even, as round())
        img.reshape(size, 3 * size)[:] = [round(v) for v in _tone(d)] * size
        return img
    a, b = _tone(d), _tone(d)
    t, q, p, u1, u2 = _scratch(size)
    if kind == 1:  # two-colour gradient along a random direction
        ang = d.uniform(0, 2 * np.pi)
        grid = _GRADIENT_GRIDS.get(size)
        if grid is None:
            yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
            grid = _GRADIENT_GRIDS[size] = (_frozen(yy - 0.5), _frozen(xx - 0.5))
        yc, xc = grid  # yy - 0.5, xx - 0.5
        # t = xc * np.cos(ang) + yc * np.sin(ang); t = (t - t.min()) / max(1e-9, t.max() - t.min())
        np.multiply(xc, np.cos(ang), out=t)
        t += np.multiply(yc, np.sin(ang), out=q)
        lo, hi = t.min(), t.max()
        t -= lo
        t /= max(1e-9, hi - lo)
        one_minus = np.subtract(1, t, out=u1)
        for c in range(3):  # a * (1 - t) + b * t
            np.multiply(one_minus, a[c], out=p)
            p += np.multiply(t, b[c], out=q)
            # np.round to 0 decimals; the readable form's np.clip(img, 0, 255) changes nothing:
            # the values lie between two tones, in [60, 200]
            img[:, :, c] = np.rint(p, out=p)
    else:  # mild noise: a + rng.uniform(-12, 12, size=(size, size, 1)) + rng.uniform(-4, 4, size=(size, size, 3))
        d.doubles_into(u1)
        u1 *= 24.0
        u1 += -12.0
        d.doubles_into(u2)
        u2 *= 8.0
        u2 += -4.0
        for c in range(3):  # a tone in [60, 200] plus at most 16: np.clip changes nothing
            np.add(u1, a[c], out=p)
            p += u2[:, :, c]
            img[:, :, c] = np.rint(p, out=p)
    return img


def _sample_spec(d: Draws, composite_prob: float, allowed_colours: dict[str, list[str]],
                 force_pair: tuple[str, str] | None, size_cap: int) -> _Spec:
    # seq[d.integers(len(seq))] draws what rng.choice(seq) draws (see dataset.py)
    sizes = SIZES[: size_cap + 1]
    if force_pair is not None:
        colour, shape = force_pair
        return _Spec("shape", shape, colour, sizes[d.integers(len(sizes))],
                     TEXTURES[d.integers(len(TEXTURES))])
    if d.random() < composite_prob and size_cap >= 1:
        kind = _COMPOSITE_KINDS[d.integers(len(_COMPOSITE_KINDS))]
        n = len(COMPOSITES[kind])
        # rng.choice(_COLOUR_NAMES, size=n, replace=False)
        cols = tuple(_COLOUR_NAMES[i] for i in d.choice_indices(len(_COLOUR_NAMES), n))
        size = SIZES[1 + d.integers(size_cap)]  # of SIZES[1: size_cap + 1]
        return _Spec("composite", kind, MIXED, size, "solid", cols)
    shape = SHAPES[d.integers(len(SHAPES))]
    colours = allowed_colours[shape]
    colour = colours[d.integers(len(colours))]
    return _Spec("shape", shape, colour, sizes[d.integers(len(sizes))],
                 TEXTURES[d.integers(len(TEXTURES))])


_COMPOSITE_KINDS = tuple(COMPOSITES)
# each colour and its texture's second colour as uint8 arrays: a tuple is converted anew on
# every masked assignment
_COLOUR_U8 = {c: _frozen(np.array(v, dtype=np.uint8)) for c, v in COLOURS.items()}
_TEXTURE_U8 = {c: _frozen(np.array(texture_colour(c), dtype=np.uint8)) for c in COLOURS}
_COLOUR_NAMES = list(COLOURS)


def render_scene(rng: np.random.Generator | Draws, *, image_size: int, n_objects: int,
                 composite_prob: float, min_visible: float,
                 allowed_colours: dict[str, list[str]],
                 forced_pairs: list[tuple[str, str]] = (), max_tries: int = 40,
                 ) -> Scene:
    """Lay out and render up to ``n_objects`` objects (fewer if the image is too crowded).

    ``allowed_colours[shape]`` lists the colours a basic shape may take (held-out pairs removed).
    ``forced_pairs`` are (colour, shape) pairs placed first (at least one object each). A numpy
    generator is left where numpy's own calls would have left it (:meth:`Draws.sync`).
    """
    d = Draws.of(rng)
    try:
        return _render_scene(d, image_size, n_objects, composite_prob, min_visible,
                             allowed_colours, list(forced_pairs), max_tries)
    finally:
        d.sync(rng)


def _render_scene(d: Draws, size: int, n_objects: int, composite_prob: float, min_visible: float,
                  allowed_colours: dict[str, list[str]], forced: list[tuple[str, str]],
                  max_tries: int) -> Scene:
    period = max(2, int(round(size / 42)))
    image = _background(d, size)
    # which element each pixel shows: 0 background, i + 1 element i (a basic shape or a part)
    label = np.zeros((size, size), dtype=np.int32)
    # per element: its visible pixels so far (what a bincount of label would give) and the least
    # it must keep (min_visible of its own area, and 3 pixels); per composite: its elements and
    # the least their sum must keep; per object: (spec, form, first element, box corner)
    counts: list[int] = []
    least: list[float] = []
    composite_of: list[int] = []  # index into wholes, or -1
    wholes: list[tuple[int, int, float]] = []
    placed_objects: list[tuple[_Spec, _Form, int, int, int]] = []
    n_el = 0
    for k in range(n_objects):
        force = forced[k] if k < len(forced) else None
        placed = False
        size_cap = 2
        for attempt in range(max_tries):
            if attempt and attempt % 12 == 0:
                size_cap = max(0, size_cap - 1)  # crowded: try smaller objects
            spec = _sample_spec(d, composite_prob, allowed_colours, force, size_cap)
            lo, hi = SIZE_RANGES[spec.size]
            side = max(5, int(round(d.uniform(lo, hi) * size)))
            h, w = shape_box(spec.shape, side)
            if h > size or w > size:
                continue
            form = _form(spec.kind, spec.shape, h, w)
            y0 = d.integers(0, size - h + 1)
            x0 = d.integers(0, size - w + 1)
            if not form.big_enough:
                continue
            region = label[y0:y0 + h, x0:x0 + w]
            # the elements it would cover, and how many of their pixels; only those can fall
            # below what they must keep (the others passed when they or the last object were
            # placed, and are unchanged)
            lost = np.bincount(region[form.covered]).tolist() if n_el else [0]
            touched = [(e - 1, n) for e, n in enumerate(lost) if n and e]
            ok = True
            for e, n in touched:
                if counts[e] - n < least[e]:
                    ok = False
                    break
            if ok:
                done: set[int] = set()
                for e, _ in touched:
                    c = composite_of[e]
                    if c < 0 or c in done:
                        continue
                    done.add(c)
                    first, end, need = wholes[c]
                    kept = sum(counts[i] - (lost[i + 1] if i + 1 < len(lost) else 0)
                               for i in range(first, end))
                    if kept < need:
                        ok = False
                        break
            if not ok:
                continue
            # label and paint it over what lies there (later objects cover earlier ones, so
            # what stays visible is what the label map says): its colour, then its texture's
            reg = image[y0:y0 + h, x0:x0 + w]
            for i, m in enumerate(form.masks):
                np.copyto(region, n_el + 1 + i, where=m)
            if spec.kind == "composite":
                for m, c in zip(form.masks, spec.part_colours):
                    np.copyto(reg, _COLOUR_U8[c], where=m[:, :, None])
            else:
                # (a masked copy: a fifth cheaper than reg[mask] = colour, the same pixels)
                np.copyto(reg, _COLOUR_U8[spec.colour], where=form.covered[:, :, None])
                if spec.texture != "solid":
                    np.copyto(reg, _TEXTURE_U8[spec.colour],
                              where=_textured(form, spec.texture, period)[:, :, None])
            for e, n in touched:
                counts[e] -= n
            counts.extend(form.areas)
            least.extend(max(min_visible * a, 3) for a in form.areas)
            if len(form.masks) > 1:
                composite_of.extend([len(wholes)] * len(form.masks))
                wholes.append((n_el, n_el + len(form.masks), min_visible * sum(form.areas)))
            else:
                composite_of.append(-1)
            placed_objects.append((spec, form, n_el, y0, x0))
            n_el += len(form.masks)
            placed = True
            break
        if not placed and force is not None:
            raise _LayoutError("could not place a forced object")

    # records: every element's visible pixels per row and per column, from one bincount each
    # of the label map; a composite's are the sums of its parts'. Centroids are the exact
    # integer sums of coordinates over the pixel count, as xs.mean() computes them
    index = _PIXEL_INDEX.get(size)
    if index is None:
        rows = np.repeat(np.arange(size, dtype=np.int32), size)
        index = _PIXEL_INDEX[size] = (_frozen(rows), _frozen(np.tile(np.arange(size, dtype=np.int32), size)),
                                      _frozen(np.arange(size, dtype=np.int64)))
    rows, cols, coord = index
    flat = label.ravel() * size
    per_row = np.bincount(flat + rows, minlength=(n_el + 1) * size).reshape(n_el + 1, size)[1:]
    per_col = np.bincount(flat + cols, minlength=(n_el + 1) * size).reshape(n_el + 1, size)[1:]
    area = per_row.sum(axis=1).tolist()
    sum_y = (per_row @ coord).tolist()
    sum_x = (per_col @ coord).tolist()
    any_row, any_col = per_row > 0, per_col > 0
    y_first = any_row.argmax(axis=1).tolist()
    y_last = (size - 1 - any_row[:, ::-1].argmax(axis=1)).tolist()
    x_first = any_col.argmax(axis=1).tolist()
    x_last = (size - 1 - any_col[:, ::-1].argmax(axis=1)).tolist()
    onehot = [label == i for i in range(1, n_el + 1)]  # each element's visible pixels

    def record(oid, kind, shape, colour, sz, texture, parent, parts, els) -> WorldObject:
        if len(els) == 1:
            i = els[0]
            n, sy, sx = area[i], sum_y[i], sum_x[i]
            xa, ya, xb, yb = x_first[i], y_first[i], x_last[i], y_last[i]
        else:
            a, b = els[0], els[-1] + 1
            n, sy, sx = sum(area[a:b]), sum(sum_y[a:b]), sum(sum_x[a:b])
            xa, ya = min(x_first[a:b]), min(y_first[a:b])
            xb, yb = max(x_last[a:b]), max(y_last[a:b])
        return WorldObject(id=oid, kind=kind, shape=shape, colour=colour, size=sz,
                           texture=texture, parent=parent, parts=parts,
                           cx=sx / n + 0.5, cy=sy / n + 0.5, area=n,
                           bbox=(xa, ya, xb - xa + 1, yb - ya + 1))

    objects: list[WorldObject] = []
    masks: dict[int, np.ndarray] = {}
    next_id = 1
    for spec, form, first, _, _ in placed_objects:
        if spec.kind == "composite":
            oid = next_id
            els = range(first, first + len(form.masks))
            part_ids = tuple(range(oid + 1, oid + 1 + len(els)))
            objects.append(record(oid, "composite", spec.shape, MIXED, spec.size, "solid",
                                  None, part_ids, els))
            masks[oid] = np.logical_or.reduce(onehot[first:first + len(els)])
            for pid, ei, pname, c in zip(part_ids, els, COMPOSITES[spec.shape], spec.part_colours):
                objects.append(record(pid, "part", pname, c, spec.size, "solid", oid, (), (ei,)))
                masks[pid] = onehot[ei]
            next_id = oid + 1 + len(els)
        else:
            objects.append(record(next_id, "shape", spec.shape, spec.colour, spec.size,
                                  spec.texture, None, (), (first,)))
            masks[next_id] = onehot[first]
            next_id += 1
    return Scene(image=image, objects=objects, masks=masks)


class _LayoutError(RuntimeError):
    pass
