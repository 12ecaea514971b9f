"""Multi-round conversations generated from COCO-style annotations, deterministic by seed.

The SegLLM authors did not release the generator of their multi-round data (MR-RefCOCO,
MR-PACO); this module writes conversations of that kind from three sources:

- ``kind="refcoco"``: a REFER ``instances.json`` and its refs pickle (optionally one split).
  Round 1 is a referring expression of a ref; later rounds name other objects of the image by
  relating them to an earlier round's target ("the dog left of instance 1"), by superlatives
  ("the left-most dog") or by another ref's expression.
- ``kind="paco"``: a PACO-LVIS style file (``part_categories``, parts with ``obj_ann_id``).
  Object rounds as for ``coco``; part rounds ask for a part of an earlier round's object
  ("Segment the handle of instance 2.").
- ``kind="coco"``: any COCO instances file (category names only). An object is named by its
  category when it is the only one of that category, else by a superlative or a relation.

Every phrase is checked to pick out exactly one annotated object of the image: the check runs
against *all* annotations of the image (crowd, tiny and mask-less ones included), while only
usable ones (a decodable mask, not crowd, at least ``min_area`` pixels) become targets. Positional
relations demand a clear reading: the target's box lies entirely on that side of the anchor's box,
and no other candidate's centre is even on that side of the anchor's centre. Distances and sizes
need a margin over the runner-up.

Each image gets its own random generator, ``numpy.random.default_rng([seed, image_id])`` (its
k-th further conversation, with ``per_image`` > 1, ``[seed, image_id, k]``), so a conversation
depends only on the seed and its image, not on order, ``limit`` or process count.

:func:`generate_from_coco` writes a dataset folder (``annotations.json``, ``conversations.jsonl``,
read by :class:`segllm.data.records.ConversationFolder`), the same conversations in the released
format (``released.json``, read by :class:`segllm.data.released.ReleasedConversations`) and
``meta.json`` (parameters, counts, and what was skipped and why). Bad input (a missing or
unreadable image, a malformed annotation or ref) is skipped and counted, never fatal; a missing
annotation file, an unknown kind or inconsistent parameters raise :class:`GenerateError`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segllm.conversation import Conversation, Round, load_image
from segllm.data.released.convert import MaskStore, conversation_to_released
from segllm.data.released.masks import DATASETS, decode_segmentation
from segllm.data.released.refer import load_refs
from segllm.errors import SegLLMError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
KINDS = ("coco", "refcoco", "paco")
REFER_NAMES = ("refcoco", "refcoco+", "refcocog")
DEFAULT_DATASET = {"refcoco": "refcoco", "paco": "paco_lvis", "coco": "description_based_coco"}

# question templates; {np} is a noun phrase that starts with "the"
QUESTIONS = ("Segment {np}.", "Can you segment {np}?", "Please segment {np}.", "Segment {np} in the image.")
PLAIN_ANSWERS = ("<seg>",)
VARIED_ANSWERS = ("<seg>", "It is <seg>.", "Sure, <seg>.", "Here it is: <seg>.")

# uniqueness margins: the chosen object must beat the runner-up clearly, not by a pixel
DISTANCE_RATIO = 0.7  # nearest: d_best <= 0.7 d_second; farthest: d_second <= 0.7 d_best
AREA_RATIO = 1.5  # largest / smallest: 1.5x the runner-up
EXTREME_MARGIN = 0.05  # left-most etc.: centres at least 5% of the image side apart

# noun-phrase templates; {h} the head ("dog" or "object"), {k} the referenced round
BINARY_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("the {h} left of instance {k}", "the {h} to the left of instance {k}"),
    "right_of": ("the {h} right of instance {k}", "the {h} to the right of instance {k}"),
    "above": ("the {h} above instance {k}",),
    "below": ("the {h} below instance {k}",),
    "nearest": ("the {h} nearest to instance {k}", "the {h} closest to instance {k}"),
    "farthest": ("the {h} farthest from instance {k}",),
    "same_category": ("the object of the same category as instance {k}", "the other object of the same kind as instance {k}"),
    "different_category": ("the object of a different category from instance {k}",),
}
UNARY_PHRASES: dict[str, tuple[str, ...]] = {
    "leftmost": ("the left-most {h}",),
    "rightmost": ("the right-most {h}",),
    "topmost": ("the top-most {h}", "the upper-most {h}"),
    "bottommost": ("the bottom-most {h}",),
    "largest": ("the largest {h}", "the biggest {h}"),
    "smallest": ("the smallest {h}",),
}
PART_PHRASES = ("the {p} of instance {k}",)

# how later rounds are drawn: first a group (weights over the non-empty ones), then a relation
# label uniformly (so frequent relations do not crowd out rare ones), then one option
GROUP_WEIGHTS = {
    "coco": {"relation": 0.7, "unary": 0.3},
    "refcoco": {"relation": 0.7, "unary": 0.3},
    "paco": {"part": 0.45, "relation": 0.4, "unary": 0.15},
}
_INSTANCE = re.compile(r"\binstance\s+\d+\b", re.IGNORECASE)
MAX_EXAMPLES = 200  # skipped items listed by name in meta.json (all are counted)


class GenerateError(SegLLMError):
    """Generation cannot start: a missing or unreadable annotation file, an unknown kind, bad parameters."""


class _SkipImage(Exception):
    """Internal: the image cannot be used; the message is the reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------ bookkeeping


@dataclass
class SkipLog:
    """What generation left out, counted by scope (images, annotations, refs) and reason."""

    counts: dict[str, Counter] = field(default_factory=lambda: {"images": Counter(), "annotations": Counter(), "refs": Counter()})
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, scope: str, reason: str, where: str, detail: str = "") -> None:
        self.counts[scope][reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"scope": scope, "where": where, "reason": reason + (f": {detail}" if detail else "")})
        log.debug("skipped %s %s: %s %s", scope, where, reason, detail)

    def total(self, scope: str) -> int:
        return sum(self.counts[scope].values())

    def to_json(self) -> dict[str, dict[str, int]]:
        return {scope: dict(sorted(c.items())) for scope, c in self.counts.items()}

    def summary_lines(self) -> list[str]:
        """One line per scope with skips, e.g. ``images: 3 skipped (image file missing: 2, ...)``."""
        lines = []
        for scope, c in self.counts.items():
            if c:
                parts = ", ".join(f"{r}: {n}" for r, n in sorted(c.items()))
                lines.append(f"{scope}: {sum(c.values())} skipped ({parts})")
        return lines


# ---------------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """An annotation file read and grouped by image, before any mask is decoded."""

    data: dict[str, Any]
    images: dict[int, dict[str, Any]]  # image id -> image entry (valid entries only)
    anns_by_image: dict[int, list[dict[str, Any]]]
    object_names: dict[int, str]  # category id -> readable name
    part_names: dict[int, str]  # part category id -> readable part name (paco)
    sentences: dict[int, dict[int, list[str]]] = field(default_factory=dict)  # image -> ann id -> sentences


def readable_name(name: Any) -> str:
    """A category name as text: underscores to spaces; square brackets (macro syntax) to parentheses."""
    text = str(name).replace("_", " ").replace("[", "(").replace("]", ")")
    return re.sub(r"\s+", " ", text).strip()


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise GenerateError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot read {what} {path}: {e}") from e


def _category_names(entries: Any, path: Path, key: str, *, part: bool) -> dict[int, str]:
    if not isinstance(entries, list):
        raise GenerateError(f"{path}: '{key}' must be a list of {{id, name}}")
    names = {}
    for c in entries:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise GenerateError(f"{path}: malformed entry in '{key}': {c!r:.80}")
        name = c["name"].split(":", 1)[1] if part and ":" in c["name"] else c["name"]  # "mug:handle" -> handle
        names[c["id"]] = readable_name(name)
    return names


def _load_source(path: Path, kind: str, skips: SkipLog) -> _Source:
    """Read a COCO-style file; malformed image and annotation entries are skipped and counted."""
    data = _read_json(path, "instances file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise GenerateError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    object_names = _category_names(data.get("categories", []), path, "categories", part=False)
    part_names: dict[int, str] = {}
    if kind == "paco":
        if "part_categories" not in data:
            raise GenerateError(f"{path}: kind 'paco' needs a PACO-style file with 'part_categories'")
        part_names = _category_names(data["part_categories"], path, "part_categories", part=True)
    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        ok = isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
        ok = ok and all(isinstance(img.get(k), int) and img[k] > 0 for k in ("height", "width"))
        if not ok:
            skips.add("images", "malformed image entry", f"images[{i}]", "needs int id, file_name, height, width")
        elif img["id"] in images:
            skips.add("images", "duplicate image id", f"image {img['id']}")
        else:
            images[img["id"]] = img
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int) or not isinstance(ann.get("image_id"), int):
            skips.add("annotations", "malformed annotation", f"annotations[{i}]", "needs int id and image_id")
        elif ann["id"] in seen:
            skips.add("annotations", "duplicate annotation id", f"annotation {ann['id']}")
        elif ann["image_id"] not in images:
            skips.add("annotations", "image not listed", f"annotation {ann['id']}", f"image {ann['image_id']}")
        else:
            seen.add(ann["id"])
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
    return _Source(data, images, anns_by_image, object_names, part_names)


def _clean_sentence(raw: Any) -> str | None:
    """A referring expression as a noun phrase, or None when it cannot be used in a question."""
    if not isinstance(raw, str):
        return None
    s = re.sub(r"\s+", " ", raw).strip().rstrip(".").strip()
    # brackets would read as macros; an "instance k" inside would read as a reference to round k
    if not s or "[" in s or "]" in s or _INSTANCE.search(s):
        return None
    return s


def _add_refs(source: _Source, refs_path: Path, split: str | None, skips: SkipLog) -> None:
    """Attach the sentences of the refs (of ``split``) to their images; keep only images with refs."""
    try:
        refs = load_refs(refs_path)
    except SegLLMError as e:
        raise GenerateError(str(e)) from e
    if split is not None:
        splits = sorted({str(r.get("split")) for r in refs})
        refs = [r for r in refs if r.get("split") == split]
        if not refs:
            raise GenerateError(f"{refs_path}: no refs in split {split!r}; splits are {', '.join(splits)}")
    ann_image = {a["id"]: img for img, anns in source.anns_by_image.items() for a in anns}
    for r in refs:
        where = f"ref {r.get('ref_id')!r}"
        ann_id, image_id = r.get("ann_id"), r.get("image_id")
        if not isinstance(ann_id, int) or ann_id not in ann_image:
            skips.add("refs", "annotation not in the instances file", where, f"ann_id {ann_id!r}")
            continue
        if ann_image[ann_id] != image_id:
            skips.add("refs", "image id differs from its annotation's", where)
            continue
        raw = r["sentences"] if isinstance(r["sentences"], list) else []
        sents = [s for s in (_clean_sentence(x.get("sent") or x.get("raw")) for x in raw if isinstance(x, dict)) if s]
        if not sents:
            skips.add("refs", "no usable sentence", where)
            continue
        source.sentences.setdefault(image_id, {}).setdefault(ann_id, []).extend(sents)
    # only images that have refs (of the split) take part
    source.images = {i: img for i, img in source.images.items() if i in source.sentences}


# ------------------------------------------------------------------------------------ scene


@dataclass
class _Scene:
    """One image's objects with their geometry (arrays over objects), parts and sentences."""

    image: dict[str, Any]
    height: int
    width: int
    ids: np.ndarray  # (n,) annotation ids
    name_idx: np.ndarray  # (n,) index into names
    names: list[str]  # readable category names (sorted)
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 (x1, y1 exclusive)
    centres: np.ndarray  # (n, 2) x, y
    areas: np.ndarray  # (n,)
    eligible: np.ndarray  # (n,) may be a target
    masks: dict[int, np.ndarray]  # ann id -> bool mask (targets only)
    parts: dict[int, dict[str, list[tuple[int, bool]]]] = field(default_factory=dict)  # obj id -> part -> [(id, ok)]
    sentences: dict[int, list[str]] = field(default_factory=dict)  # object index -> expressions
    index: dict[int, int] = field(default_factory=dict)  # ann id -> object index
    decodable: set[int] = field(default_factory=set)  # ann ids (objects and parts) whose mask decodes


def _decode(ann: dict[str, Any], h: int, w: int) -> np.ndarray | None:
    """The annotation's mask, or None when its segmentation is missing, malformed or empty."""
    seg = ann.get("segmentation")
    if not seg:
        return None
    try:
        m = decode_segmentation(seg, h, w)
    except Exception:  # pycocotools raises bare Exceptions and TypeErrors on malformed shapes
        return None
    return m if m.shape == (h, w) and m.any() else None


def _bbox_geometry(ann: dict[str, Any]) -> tuple[list[float], float] | None:
    b = ann.get("bbox")
    if not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) for v in b) or b[2] <= 0 or b[3] <= 0:
        return None
    x, y, bw, bh = (float(v) for v in b)
    return [x, y, x + bw, y + bh], bw * bh


def _geometry(mask: np.ndarray) -> tuple[list[float], list[float], float]:
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return box, [float(xs.mean()), float(ys.mean())], float(len(xs))


def _build_scene(img: dict[str, Any], anns: list[dict[str, Any]], source: _Source, kind: str, min_area: float) -> _Scene:
    """Decode an image's annotations into a scene; raises :class:`_SkipImage` when uniqueness cannot be checked."""
    h, w = img["height"], img["width"]
    objects: list[tuple[int, str, list[float], list[float], float, bool]] = []
    masks: dict[int, np.ndarray] = {}
    decodable: set[int] = set()
    part_anns: list[dict[str, Any]] = []
    for ann in sorted(anns, key=lambda a: a["id"]):
        cid = ann.get("category_id")
        if kind == "paco" and cid in source.part_names:
            part_anns.append(ann)
            continue
        if cid not in source.object_names:
            # an object we cannot name could still be what a phrase picks out: the image is unsafe
            raise _SkipImage("malformed annotation", f"annotation {ann['id']} has unknown category {cid!r}")
        mask = _decode(ann, h, w)
        if mask is not None:
            box, centre, area = _geometry(mask)
        else:
            geo = _bbox_geometry(ann)
            if geo is None:
                raise _SkipImage("malformed annotation", f"annotation {ann['id']} has neither a usable mask nor a bbox")
            box, area = geo
            centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
        ok = mask is not None and not ann.get("iscrowd") and area >= min_area
        if ok:
            masks[ann["id"]] = mask
        if mask is not None:
            decodable.add(ann["id"])
        objects.append((ann["id"], source.object_names[cid], box, centre, area, ok))
    if not objects:
        raise _SkipImage("no object annotations")
    names = sorted({o[1] for o in objects})
    scene = _Scene(
        image=img,
        height=h,
        width=w,
        ids=np.array([o[0] for o in objects], np.int64),
        name_idx=np.array([names.index(o[1]) for o in objects], np.int64),
        names=names,
        boxes=np.array([o[2] for o in objects], np.float64),
        centres=np.array([o[3] for o in objects], np.float64),
        areas=np.array([o[4] for o in objects], np.float64),
        eligible=np.array([o[5] for o in objects], bool),
        masks=masks,
        decodable=decodable,
    )
    scene.index = {int(a): i for i, a in enumerate(scene.ids)}
    for ann in part_anns:
        parent = ann.get("obj_ann_id")
        if parent not in scene.index:
            raise _SkipImage("malformed annotation", f"part {ann['id']} has obj_ann_id {parent!r}, no object of the image")
        mask = _decode(ann, h, w)
        ok = mask is not None and int(mask.sum()) >= min_area
        if ok:
            masks[ann["id"]] = mask
        if mask is not None:
            decodable.add(ann["id"])
        scene.parts.setdefault(parent, {}).setdefault(source.part_names[ann["category_id"]], []).append((ann["id"], ok))
    for ann_id, sents in source.sentences.get(img["id"], {}).items():
        if ann_id in scene.index:
            scene.sentences[scene.index[ann_id]] = sents
    return scene


# ---------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Option:
    """A way to name one target: a noun phrase (``{k}`` stands for the anchor's round) and what it means."""

    relation: str
    target: int  # annotation id
    phrase: str
    anchor: int | None = None  # annotation id of the object referred to


def _extreme(s: _Scene, group: np.ndarray, label: str) -> int | None:
    """The object of ``group`` that is clearly the ``label`` (left-most, largest, ...), or None."""
    if len(group) < 2:
        return None
    if label in ("largest", "smallest"):
        a = s.areas[group]
        order = np.argsort(-a if label == "largest" else a, kind="stable")
        best, second = a[order[0]], a[order[1]]
        clear = best >= AREA_RATIO * second if label == "largest" else best * AREA_RATIO <= second
        return int(group[order[0]]) if clear else None
    axis, low = {"leftmost": (0, True), "rightmost": (0, False), "topmost": (1, True), "bottommost": (1, False)}[label]
    c = s.centres[group, axis] * (1 if low else -1)
    order = np.argsort(c, kind="stable")
    side = s.width if axis == 0 else s.height
    if c[order[1]] - c[order[0]] < EXTREME_MARGIN * side:
        return None
    # the box edge must agree with the centre (a wide object further out would make it ambiguous)
    edge = s.boxes[group, axis] if low else -s.boxes[group, axis + 2]
    others = np.delete(edge, order[0])
    return int(group[order[0]]) if edge[order[0]] < others.min() else None


def _unary_options(s: _Scene) -> list[_Option]:
    """Phrases that need no earlier round: a category named once, superlatives (with or without category)."""
    out: list[_Option] = []
    everyone = np.arange(len(s.ids))
    groups: list[tuple[str, np.ndarray]] = [("object", everyone)]
    for c, name in enumerate(s.names):
        members = np.flatnonzero(s.name_idx == c)
        if len(members) == 1:
            out.append(_Option("category", int(s.ids[members[0]]), f"the {name}"))
        else:
            groups.append((name, members))
    for head, group in groups:
        for label, phrases in UNARY_PHRASES.items():
            t = _extreme(s, group, label)
            if t is not None:
                out.extend(_Option(label, int(s.ids[t]), p.replace("{h}", head)) for p in phrases)
    for i, sents in sorted(s.sentences.items()):
        out.extend(_Option("sentence", int(s.ids[i]), _sentence_np(x)) for x in sents)
    return [o for o in out if s.eligible[s.index[o.target]]]


def _sentence_np(sent: str) -> str:
    """A referring expression as a noun phrase ("man on left" -> "the man on left")."""
    first = sent.split(" ", 1)[0].lower()
    return sent if first in ("the", "a", "an", "this", "that") else f"the {sent}"


def _positional(s: _Scene, a: int, group: np.ndarray, label: str) -> int | None:
    """The only object of ``group`` on that side of object ``a``, fully beyond its box; else None."""
    ax = 0 if label in ("left_of", "right_of") else 1
    before = label in ("left_of", "above")
    c = s.centres[group, ax]
    loose = c < s.centres[a, ax] if before else c > s.centres[a, ax]
    if loose.sum() != 1:
        return None
    t = int(group[np.flatnonzero(loose)[0]])
    strict = s.boxes[t, ax + 2] <= s.boxes[a, ax] if before else s.boxes[t, ax] >= s.boxes[a, ax + 2]
    return t if strict else None


def _distance(s: _Scene, a: int, group: np.ndarray, label: str) -> int | None:
    """The clearly nearest / farthest object of ``group`` from object ``a`` (centre distance), or None."""
    if len(group) < 2:
        return None
    d = np.hypot(*(s.centres[group] - s.centres[a]).T)
    order = np.argsort(d if label == "nearest" else -d, kind="stable")
    best, second = d[order[0]], d[order[1]]
    clear = best <= DISTANCE_RATIO * second if label == "nearest" else second <= DISTANCE_RATIO * best
    return int(group[order[0]]) if clear else None


def _binary_options(s: _Scene, anchor_id: int) -> list[_Option]:
    """Phrases relating a target to the object ``anchor_id`` (an earlier round's target)."""
    a = s.index[anchor_id]
    others = np.delete(np.arange(len(s.ids)), a)
    out: list[_Option] = []

    def add(label: str, t: int | None, head: str = "object") -> None:
        if t is not None and s.eligible[t]:
            out.extend(_Option(label, int(s.ids[t]), p.replace("{h}", head), anchor_id) for p in BINARY_PHRASES[label])

    groups = [("object", others)] + [(name, others[s.name_idx[others] == c]) for c, name in enumerate(s.names)]
    for head, group in groups:
        if len(group) == 0:
            continue
        for label in ("left_of", "right_of", "above", "below"):
            add(label, _positional(s, a, group, label), head)
        for label in ("nearest", "farthest"):
            add(label, _distance(s, a, group, label), head)
    same = others[s.name_idx[others] == s.name_idx[a]]
    if len(same) == 1:
        add("same_category", int(same[0]))
    different = others[s.name_idx[others] != s.name_idx[a]]
    if len(different) == 1:
        add("different_category", int(different[0]))
    return out


def _part_options(s: _Scene, object_id: int) -> list[_Option]:
    """"the {part} of instance k" for each part category the object has exactly one usable annotation of."""
    out = []
    for part, anns in sorted(s.parts.get(object_id, {}).items()):
        if len(anns) == 1 and anns[0][1]:
            out.extend(_Option("part", anns[0][0], p.replace("{p}", part), object_id) for p in PART_PHRASES)
    return out


# --------------------------------------------------------------------------------- planning


@dataclass
class PlannedRound:
    """One generated round: question text, referenced rounds, answer, the target annotation id, the relation."""

    question: str
    refs: tuple[int, ...]
    answer: str
    target: int
    relation: str


def _rng(seed: int, image_id: int) -> np.random.Generator:
    # one generator per image: results do not depend on which images come before it
    return np.random.default_rng([seed, image_id])


def _pick(rng: np.random.Generator, items: Sequence[tuple[_Option, int]]) -> tuple[_Option, int]:
    """A relation label uniformly, then one of its (option, anchor round) pairs uniformly."""
    labels = sorted({o.relation for o, _ in items})
    label = labels[int(rng.integers(len(labels)))]
    chosen = [it for it in items if it[0].relation == label]
    return chosen[int(rng.integers(len(chosen)))]


def _question(rng: np.random.Generator, np_text: str) -> str:
    text = QUESTIONS[int(rng.integers(len(QUESTIONS)))].replace("{np}", np_text)
    return text[0].upper() + text[1:]


def plan_conversation(
    s: _Scene, rng: np.random.Generator, kind: str, n_rounds: int, answers: Sequence[str]
) -> list[PlannedRound]:
    """Draw up to ``n_rounds`` rounds for a scene (fewer when no further target can be named uniquely)."""
    unary = _unary_options(s)
    if kind == "refcoco":  # round 1 is a referring expression, as in MR-RefCOCO
        first = [o for o in unary if o.relation == "sentence"]
    else:
        first = [o for o in unary if o.relation != "sentence"]
    if not first:
        return []
    rounds: list[PlannedRound] = []
    used: set[int] = set()
    object_rounds: list[tuple[int, int]] = []  # (round number, object ann id): possible anchors
    binary_cache: dict[int, list[_Option]] = {}
    for n in range(1, n_rounds + 1):
        if n == 1:
            option, k = _pick(rng, [(o, 0) for o in first])
        else:
            groups: dict[str, list[tuple[_Option, int]]] = {"relation": [], "part": [], "unary": []}
            for k, obj in object_rounds:
                if obj not in binary_cache:
                    binary_cache[obj] = _binary_options(s, obj)
                groups["relation"] += [(o, k) for o in binary_cache[obj] if o.target not in used]
                groups["part"] += [(o, k) for o in _part_options(s, obj) if o.target not in used]
            groups["unary"] = [(o, 0) for o in unary if o.target not in used]
            weights = {g: w for g, w in GROUP_WEIGHTS[kind].items() if groups[g]}
            if not weights:
                break
            names = sorted(weights)
            p = np.array([weights[g] for g in names])
            option, k = _pick(rng, groups[names[int(rng.choice(len(names), p=p / p.sum()))]])
        refs = (k,) if k else ()  # k: the anchor's round, 0 for a phrase that needs none
        phrase = option.phrase.replace("{k}", str(refs[0])) if refs else option.phrase
        answer = answers[int(rng.integers(len(answers)))]
        rounds.append(PlannedRound(_question(rng, phrase), refs, answer, option.target, option.relation))
        used.add(option.target)
        if option.relation != "part":
            object_rounds.append((n, option.target))
    return rounds


# ----------------------------------------------------------------------------------- writing


def _check_params(kind: str, refs: Any, split: Any, seed: int, min_rounds: int, max_rounds: int, answers: Sequence[str]) -> None:
    if kind not in KINDS:
        raise GenerateError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if refs is not None and kind != "refcoco":
        raise GenerateError(f"a refs file is only used with kind 'refcoco', not {kind!r}")
    if kind == "refcoco" and refs is None:
        raise GenerateError("kind 'refcoco' needs a refs pickle (refs=..., the REFER refs(*).p file)")
    if split is not None and kind != "refcoco":
        raise GenerateError(f"a split selects refs, so it only applies to kind 'refcoco', not {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GenerateError(f"seed must be a non-negative integer, got {seed!r}")
    if not 1 <= min_rounds <= max_rounds:
        raise GenerateError(f"need 1 <= min_rounds <= max_rounds, got min_rounds={min_rounds}, max_rounds={max_rounds}")
    if not answers or any(not isinstance(a, str) or a.count("<seg>") != 1 for a in answers):
        raise GenerateError("every answer phrasing must contain exactly one '<seg>'")


def _dataset_mode(dataset_name: str) -> str:
    """'ids' when the released records can name COCO annotation ids in ``dataset_name``, else 'store'."""
    kind = DATASETS.get(dataset_name, (None,))[0]
    if kind == "coco":
        return "ids"
    if kind in ("described", "rle"):
        return "store"
    usable = [n for n, v in DATASETS.items() if v[0] in ("coco", "described", "rle")]
    raise GenerateError(f"dataset name {dataset_name!r} cannot hold generated masks; use one of {', '.join(usable)}")


def _image_id_key(image_id: int) -> int:
    return image_id if image_id >= 0 else zlib.crc32(str(image_id).encode())


def _check_image(path: Path, img: dict[str, Any]) -> np.ndarray:
    """Read the image (so a broken file is found now, not in training) and check its size."""
    if not path.is_file():
        raise _SkipImage("image file missing", str(path))
    try:
        arr = load_image(path)
    except SegLLMError as e:
        raise _SkipImage("image unreadable", str(e)) from None
    if arr.shape[:2] != (img["height"], img["width"]):
        raise _SkipImage(
            "image size differs from its entry", f"{path} is {arr.shape[0]}x{arr.shape[1]}, entry {img['height']}x{img['width']}"
        )
    return arr


def generate_from_coco(
    instances_json: str | Path,
    images_root: str | Path,
    out_dir: str | Path,
    *,
    refs: str | Path | None = None,
    split: str | None = None,
    kind: str = "coco",
    seed: int = 0,
    max_rounds: int = 6,
    min_rounds: int = 2,
    limit: int | None = None,
    min_area: float = 256.0,
    dataset_name: str | None = None,
    images_prefix: str = "",
    answers: Sequence[str] = PLAIN_ANSWERS,
    copy_images: bool = False,
    per_image: int = 1,
) -> Path:
    """Generate multi-round conversations from COCO-style annotations and write them to ``out_dir``.

    Args:
        instances_json: COCO instances file (RefCOCO's ``instances.json``, a PACO-LVIS file, any COCO file).
        images_root: folder the images' ``file_name`` entries are relative to.
        out_dir: output folder (created); see below for what it holds.
        refs: REFER refs pickle, for ``kind="refcoco"`` only (read with a restricted unpickler).
        split: refs split to use (``val``, ``testA``, ...); only images with refs of it are used.
        kind: ``"coco"``, ``"refcoco"`` or ``"paco"`` (see the module docstring).
        per_image: conversations generated per image (each with its own generator).
        seed: non-negative; image ``i`` uses ``numpy.random.default_rng([seed, i])``.
        max_rounds, min_rounds: each conversation draws its length in [min_rounds, max_rounds];
            an image that cannot give ``min_rounds`` uniquely named targets is skipped.
        limit: stop after this many conversations (images are taken in id order).
        min_area: objects (and parts) of fewer mask pixels are never targets.
        dataset_name: dataset name of the released records' masks. A COCO-id dataset
            (``refcoco``, ``refcoco+``, ``refcocog``, ``paco_lvis``, ``lvis``) makes MASK-DECODE name
            the COCO annotation ids (put ``annotations.json`` or the full file where
            :class:`~segllm.data.released.MaskLookup` looks for that name); ``description_based_coco``
            (the default for ``coco``) or ``visual_genome`` / ``pascal`` store the masks in
            ``out_dir`` under the released layout instead. Defaults: refcoco -> the refs
            folder's name (refcoco, refcoco+, refcocog) or ``refcoco``; paco -> ``paco_lvis``.
        images_prefix: prefix of the released records' image paths (relative to the original's
            images folder, e.g. ``coco/train2014``); empty: relative to ``images_root``.
        answers: answer phrasings, each with exactly one ``<seg>`` (:data:`VARIED_ANSWERS` for variety).
        copy_images: copy the used images to ``out_dir/images/`` (a self-contained folder); else
            the records name the images by absolute path.

    Writes ``annotations.json`` (COCO: the used images and all their usable annotations, ids
    unchanged), ``conversations.jsonl`` (this package's records; each round also names its
    ``relation``), ``released.json`` (the released format), ``meta.json`` (parameters, counts,
    skips) and, for a mask-storing dataset name, the mask file under ``out_dir``.

    Returns:
        ``out_dir``.
    """
    instances_json, images_root, out_dir = Path(instances_json), Path(images_root), Path(out_dir)
    answers = tuple(answers)
    _check_params(kind, refs, split, seed, min_rounds, max_rounds, answers)
    if limit is not None and limit < 0:
        raise GenerateError(f"limit must be >= 0, got {limit}")
    if dataset_name is None:
        parent = Path(refs).parent.name if refs is not None else ""
        dataset_name = parent if kind == "refcoco" and parent in REFER_NAMES else DEFAULT_DATASET[kind]
    mode = _dataset_mode(dataset_name)
    if any(c in images_prefix for c in "[]|:"):
        raise GenerateError(f"images_prefix {images_prefix!r} contains a character a macro cannot hold ([]|:)")

    skips = SkipLog()
    source = _load_source(instances_json, kind, skips)
    if refs is not None:
        _add_refs(source, Path(refs), split, skips)
    writer = _Writer(out_dir, images_root, dataset_name, mode, images_prefix, copy_images)
    considered = 0
    try:
        for image_id in sorted(source.images):
            if limit is not None and writer.conversations >= limit:
                break
            considered += 1
            for k in range(per_image):
                _generate_one(source, image_id, writer, skips, kind, seed, min_rounds, max_rounds, min_area, answers, k)
    finally:
        writer.finish(source, kind)
    meta = {
        "generator": "segllm.data.generate",
        "version": GENERATOR_VERSION,
        "parameters": {
            "instances": str(instances_json),
            "images_root": str(images_root),
            "refs": None if refs is None else str(refs),
            "split": split,
            "kind": kind,
            "seed": seed,
            "max_rounds": max_rounds,
            "min_rounds": min_rounds,
            "limit": limit,
            "min_area": min_area,
            "dataset_name": dataset_name,
            "images_prefix": images_prefix,
            "answers": list(answers),
            "copy_images": copy_images,
            "per_image": per_image,
        },
        "released": writer.released_note(),
        "counts": {
            "images_in_file": len(source.data["images"]),
            "images_considered": considered,
            "images_used": len(writer.images),
            "conversations": writer.conversations,
            "rounds": sum(writer.round_counts.elements()),
            "rounds_per_conversation": {str(k): v for k, v in sorted(writer.round_counts.items())},
            "relations": dict(sorted(writer.relations.items())),
        },
        "skipped": skips.to_json(),
        "skipped_examples": skips.examples,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for line in skips.summary_lines():
        log.warning("generate: %s (see %s)", line, out_dir / "meta.json")
    return out_dir


def _generate_one(
    source: _Source,
    image_id: int,
    writer: _Writer,
    skips: SkipLog,
    kind: str,
    seed: int,
    min_rounds: int,
    max_rounds: int,
    min_area: float,
    answers: Sequence[str],
    k: int = 0,
) -> None:
    """Plan and write image ``image_id``'s ``k``-th conversation, or record why it is skipped."""
    img = source.images[image_id]
    try:
        scene = _build_scene(img, source.anns_by_image.get(image_id, []), source, kind, min_area)
        # the first conversation of an image keeps the generator it always had
        rng = _rng(seed, _image_id_key(image_id)) if k == 0 else np.random.default_rng([seed, _image_id_key(image_id), k])
        n_rounds = int(rng.integers(min_rounds, max_rounds + 1))
        rounds = plan_conversation(scene, rng, kind, n_rounds, answers)
        if not rounds:
            raise _SkipImage("no target can be named uniquely in round 1")
        if len(rounds) < min_rounds:
            raise _SkipImage(f"fewer than min_rounds={min_rounds} uniquely named targets")
        writer.add(scene, rounds, f"gen-{img['id']}" if k == 0 else f"gen-{img['id']}-{k}")
    except _SkipImage as e:
        skips.add("images", e.reason, f"image {image_id} ({img['file_name']})", e.detail)


class _Writer:
    """Writes the conversations of each used image as they come, then the annotation and released files."""

    def __init__(self, out: Path, images_root: Path, dataset: str, mode: str, prefix: str, copy_images: bool) -> None:
        self.out, self.images_root, self.dataset, self.mode = out, images_root, dataset, mode
        self.prefix, self.copy_images = prefix, copy_images
        self.store = MaskStore("described" if DATASETS[dataset][0] == "described" else "rle") if mode == "store" else None
        self.store_path = DATASETS[dataset][1]
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "conversations.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.released: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.used_ids: set[int] = set()
        self.decodable: set[int] = set()
        self.conversations = 0
        self.round_counts: Counter = Counter()
        self.relations: Counter = Counter()

    def add(self, scene: _Scene, rounds: list[PlannedRound], conv_id: str) -> None:
        """Write one conversation; raises :class:`_SkipImage` (nothing written) when its image or record is unusable."""
        img = scene.image
        file_name = img["file_name"]
        src = self.images_root / file_name
        pixels = _check_image(src, img)
        conv = Conversation(pixels, [Round(r.question, r.refs, r.answer, [scene.masks[r.target]]) for r in rounds])
        released_image = posixpath.join(self.prefix, file_name) if self.prefix else file_name
        try:
            rec = conversation_to_released(
                conv,
                image=released_image,
                dataset=self.dataset,
                mask_ids=[[r.target] for r in rounds] if self.mode == "ids" else None,
                store=self.store,
                id_prefix=conv_id,
                conv_id=conv_id,
            )
        except SegLLMError as e:
            raise _SkipImage("cannot write the released record", str(e)) from None
        if self.copy_images:
            dest = self.out / "images" / file_name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            image_field = posixpath.join("images", file_name)
        else:
            image_field = str(src.resolve())  # absolute: ConversationFolder joins it onto its root unchanged
        record = {
            "id": conv_id,
            "image": image_field,
            "image_id": img["id"],
            "rounds": [
                {"question": r.question, "refs": list(r.refs), "answer": r.answer, "mask_ids": [r.target], "relation": r.relation}
                for r in rounds
            ],
        }
        self._jsonl.write(json.dumps(record) + "\n")
        self.released.append(rec)
        if img["id"] not in self.used_ids:
            self.images.append(img)
        self.used_ids.add(img["id"])
        self.decodable |= scene.decodable
        self.conversations += 1
        self.round_counts[len(rounds)] += 1
        self.relations.update(r.relation for r in rounds)

    def finish(self, source: _Source, kind: str) -> None:
        self._jsonl.close()
        anns = [a for i in sorted(self.used_ids) for a in sorted(source.anns_by_image.get(i, []), key=lambda a: a["id"])]
        # only annotations whose mask decodes are kept: a broken one would trip whoever reads the file next
        usable = [a for a in anns if a["id"] in self.decodable]
        coco: dict[str, Any] = {
            "info": {"description": f"segllm.data.generate ({kind})", "version": GENERATOR_VERSION},
            "images": self.images,
            "annotations": usable,
            "categories": source.data.get("categories", []),
        }
        if kind == "paco":
            coco["part_categories"] = source.data.get("part_categories", [])
        (self.out / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
        (self.out / "released.json").write_text(json.dumps(self.released, indent=1) + "\n", encoding="utf-8")
        if self.store is not None:
            self.store.save(self.out / self.store_path)

    def released_note(self) -> dict[str, Any]:
        """Where the released records' masks are to be found (for meta.json)."""
        if self.mode == "store":
            return {
                "dataset_name": self.dataset,
                "masks": f"stored in {self.store_path} under this folder (use this folder as annotations_folder)",
            }
        return {
            "dataset_name": self.dataset,
            "masks": f"COCO annotation ids: put annotations.json (or the full source file) at annotations_folder/{self.store_path}",
        }
