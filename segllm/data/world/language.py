"""Referring expressions of the world: structured queries, their checker, and their wording.

A :class:`Query` is a structured referring expression: a relation family and relation, a
:class:`Head` (the attributes the described object must have, e.g. "red circle"), the earlier
rounds it refers to ("instance k") and a few relation parameters. :func:`resolve` is the
checker: it returns every object the query could denote in a scene given the earlier rounds'
targets. A round is only asked when the query is *unique* (:func:`is_unique`): exactly one
object matches, and no other object is within the geometric margins (positions within
``margin`` pixels, areas within ``ratio``) of changing the answer.

Relation families (the ``relation`` field of a conversation round):

- ``attribute``: "the red circle"; "the square with the same colour as instance 1"; "the
  circle other than instance 2"; "the object with the colour of instance 1 and the shape of
  instance 3"; "the triangle with a different texture than instance 2".
- ``positional``: "the left-most star"; "the square left of instance 2"; "the object closest
  to instance 3"; "the circle farthest from instance 1".
- ``ordinal``: "the second circle from the left"; "the second square to the right of instance 1".
- ``part-of``: "the roof of instance 1"; "the part of instance 1 at the top"; "the red part of
  instance 2"; "the house that instance 3 belongs to".
- ``comparison``: "the largest star"; "the square bigger than instance 2"; "the one bigger than
  instance 2 with the same texture"; "the largest object below instance 1".

A *pick* round (relation ``pick``, family ``attribute``) is ambiguous on purpose: "Segment one
of the red objects." matches two or more objects, any of them is a valid answer, and the
recorded target is one of them drawn at random. Later rounds that refer to it ("the object
closest to instance 1") then depend on *which* one was picked, which only the mask shows.
:func:`text_resolvable` tells, per round, whether the questions' text alone determines the
answer.

Several-target rounds (only with ``WorldConfig.multi_target_prob`` > 0): an *all* round (relation
``all``, family ``attribute``) asks for every top-level object a head phrase matches ("Segment all
the red objects.", "Segment every triangle."): two to :data:`MAX_TARGETS` of them, answered with
one ``<seg>`` each, left to right (:func:`all_targets`; the answer says so). A later *one-of*
round (relation ``one_of``, family ``ordinal``) refers to an all round and asks for one of its
targets by that order ("Segment the second of instance 2 from the left."). Both are
text-resolvable; no other relation refers to an all round (its "instance k" is several objects).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from segllm.data.world.draws import Draws
from segllm.data.world.scene import MIXED, PARTS, WorldObject

FAMILIES: tuple[str, ...] = ("attribute", "positional", "ordinal", "part-of", "comparison")

# relations of each family: those without a reference, and those with one (or two)
NO_REF_RELATIONS: dict[str, tuple[str, ...]] = {
    "attribute": ("unique",),
    "positional": ("extreme",),
    "ordinal": ("ordinal",),
    "comparison": ("largest", "smallest"),
}
REF_RELATIONS: dict[str, tuple[str, ...]] = {
    "attribute": ("same_colour", "same_shape", "same_texture", "different_colour",
                  "different_shape", "different_texture", "other", "colour_and_shape"),
    "positional": ("left_of", "right_of", "above", "below", "nearest", "farthest"),
    "ordinal": ("ordinal_from",),
    "part-of": ("part_name", "part_extreme", "part_colour", "whole"),
    "comparison": ("bigger", "smaller", "largest_dir", "smallest_dir"),
}

# relations of several-target rounds and of the rounds that pick one of their targets
ALL_RELATION, ONE_OF_RELATION = "all", "one_of"
MAX_TARGETS = 4  # the most targets an all round asks for

ATTRS: tuple[str, ...] = ("size", "colour", "texture", "shape")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
_DIR_REL = {"left": "left_of", "right": "right_of", "top": "above", "bottom": "below"}


# -- structured queries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """Attributes the described object must have (None: not said)."""

    size: str | None = None
    colour: str | None = None
    texture: str | None = None
    shape: str | None = None

    def matches(self, o: WorldObject) -> bool:
        return ((self.size is None or o.size == self.size)
                and (self.colour is None or o.colour == self.colour)
                and (self.texture is None or o.texture == self.texture)
                and (self.shape is None or o.shape == self.shape))

    def n_attrs(self) -> int:
        return sum(a is not None for a in (self.size, self.colour, self.texture, self.shape))

    def phrase(self, noun: str = "object") -> str:
        words = []
        if self.size is not None:
            words.append(SIZE_WORDS[self.size])
        if self.colour is not None:
            words.append(self.colour)
        if self.texture is not None:
            words.append(self.texture)
        words.append(self.shape if self.shape is not None else noun)
        return " ".join(words)


@dataclass(frozen=True)
class Query:
    """A structured referring expression.

    ``refs`` are 1-indexed earlier rounds. ``direction`` is one of DIRECTIONS (extremes,
    ordinals, ``*_dir`` relations, ``part_extreme``); ``rank`` is the 1-based ordinal;
    ``attr`` the attribute of ``bigger``/``smaller`` that must also be shared with the
    reference (or None); ``part`` the part name of ``part_name``; ``colour`` the colour of
    ``part_colour``.
    """

    family: str
    relation: str
    head: Head = field(default_factory=Head)
    refs: tuple[int, ...] = ()
    direction: str | None = None
    rank: int | None = None
    attr: str | None = None
    part: str | None = None
    colour: str | None = None

    def to_dict(self) -> dict:
        return {"family": self.family, "relation": self.relation,
                "head": {k: getattr(self.head, k) for k in ATTRS if getattr(self.head, k)},
                "refs": list(self.refs), "direction": self.direction, "rank": self.rank,
                "attr": self.attr, "part": self.part, "colour": self.colour}


@dataclass(frozen=True)
class Margins:
    """How clear a geometric relation must be: positions and distances differ by more than
    ``pixels``; areas by more than a factor ``ratio``."""

    pixels: float = 4.0
    ratio: float = 1.25


def default_margins(image_size: int) -> Margins:
    return Margins(pixels=max(2.0, 0.03 * image_size), ratio=1.25)


# -- the checker --------------------------------------------------------------------------------


def _coord(o: WorldObject, direction: str) -> float:
    """A key that is smallest for the object most towards ``direction``."""
    if direction == "left":
        return o.cx
    if direction == "right":
        return -o.cx
    if direction == "top":
        return o.cy
    return -o.cy


def _related(ref: WorldObject) -> set[int]:
    ids = {ref.id, *ref.parts}
    if ref.parent is not None:
        ids.add(ref.parent)
    return ids


def _pool(objects: list[WorldObject], refs: list[WorldObject], head: Head) -> list[WorldObject]:
    """What a head phrase ranges over, less the references and their wholes/parts: parts when
    the head names a part ("the roof ..."), top-level objects otherwise."""
    banned: set[int] = set()
    for r in refs:
        banned |= _related(r)
    parts = head.shape in PARTS
    return [o for o in objects if (o.parent is not None) == parts and o.id not in banned]


def _extreme(items: list[WorldObject], key, m: float) -> tuple[list, list]:
    if not items:
        return [], []
    keys = [key(o) for o in items]
    best = min(keys)
    possible = [o for o, k in zip(items, keys) if k <= best + m]
    return possible, (possible if len(possible) == 1 else [])


def _ordinal(items: list[WorldObject], key, rank: int, m: float) -> tuple[list, list]:
    """The rank-th item by increasing key; items closer than m form a cluster of ties."""
    if len(items) < rank:
        return [], []
    order = sorted(items, key=key)
    keys = [key(o) for o in order]
    clusters: list[list[WorldObject]] = [[order[0]]]
    for i in range(1, len(order)):
        if keys[i] - keys[i - 1] <= m:
            clusters[-1].append(order[i])
        else:
            clusters.append([order[i]])
    pos = 0
    for c in clusters:
        if pos + len(c) >= rank:
            return c, (c if len(c) == 1 else [])
        pos += len(c)
    return [], []


def _direction_sets(items: list[WorldObject], ref: WorldObject, direction: str,
                    m: float) -> tuple[list, list]:
    """Items lying towards ``direction`` of ref, (possibly, definitely): inside the 90-degree
    cone around that direction from ref's centroid (so "left of" means more left than up or
    down), up to a margin of m pixels."""
    def d(o: WorldObject) -> float:  # > 0 inside the cone
        along = _coord(ref, direction) - _coord(o, direction)
        across = abs(o.cy - ref.cy) if direction in ("left", "right") else abs(o.cx - ref.cx)
        return along - across
    return [o for o in items if d(o) > -m], [o for o in items if d(o) > m]


def evaluate(q: Query, objects: list[WorldObject], targets: list[int],
             margins: Margins) -> tuple[list[WorldObject], list[WorldObject]]:
    """(possible, definite) denotations of a query; it is unique when both are one object."""
    by_id = {o.id: o for o in objects}
    try:
        refs = [by_id[targets[k - 1]] for k in q.refs]
    except (IndexError, KeyError):
        return [], []
    if any(k < 1 for k in q.refs):
        return [], []
    m, ratio = margins.pixels, margins.ratio
    rel = q.relation
    head = q.head

    if rel in ("pick", ALL_RELATION):  # every object the head matches is a valid answer / a target
        out = [o for o in _pool(objects, refs, head) if head.matches(o)]
        return out, out

    # part-of relations
    if rel in ("part_name", "part_extreme", "part_colour"):
        parts = [by_id[i] for i in refs[0].parts]
        if rel == "part_name":
            out = [p for p in parts if p.shape == q.part]
            return out, out
        if rel == "part_colour":
            out = [p for p in parts if p.colour == q.colour]
            return out, out
        return _extreme(parts, lambda o: _coord(o, q.direction), m)
    if rel == "whole":
        if refs[0].parent is None:
            return [], []
        whole = by_id[refs[0].parent]
        out = [whole] if head.matches(whole) else []
        return out, out

    cands = [o for o in _pool(objects, refs, head) if head.matches(o)]

    if rel == "unique":
        return cands, cands
    if rel == "extreme":
        return _extreme(cands, lambda o: _coord(o, q.direction), m)
    if rel == "ordinal":
        return _ordinal(cands, lambda o: _coord(o, q.direction), q.rank, m)
    if rel in ("largest", "smallest"):
        return _by_area(cands, rel == "largest", ratio)

    ref = refs[0]
    if rel.startswith("same_") or rel.startswith("different_"):
        a = rel.split("_", 1)[1]
        v = getattr(ref, a)
        if v == MIXED:
            return [], []
        same = rel.startswith("same_")
        out = [o for o in cands if (getattr(o, a) == v) == same]
        return out, out
    if rel == "other":
        return cands, cands
    if rel == "colour_and_shape":
        a, b = refs
        if a.colour == MIXED or a.id == b.id:
            return [], []
        out = [o for o in cands if o.colour == a.colour and o.shape == b.shape]
        return out, out
    if rel in ("left_of", "right_of", "above", "below"):
        direction = {v: k for k, v in _DIR_REL.items()}[rel]
        return _direction_sets(cands, ref, direction, m)
    if rel in ("nearest", "farthest"):
        sign = 1.0 if rel == "nearest" else -1.0
        return _extreme(cands, lambda o: sign * float(np.hypot(o.cx - ref.cx, o.cy - ref.cy)), m)
    if rel in ("ordinal_from", "largest_dir", "smallest_dir"):
        possible, definite = _direction_sets(cands, ref, q.direction, m)
        if len(possible) != len(definite):
            return possible, []
        if rel == "ordinal_from":
            return _ordinal(definite, lambda o: -_coord(o, q.direction), q.rank, m)
        return _by_area(definite, rel == "largest_dir", ratio)
    if rel in ("bigger", "smaller"):
        if q.attr is not None:
            v = getattr(ref, q.attr)
            if v == MIXED:
                return [], []
            cands = [o for o in cands if getattr(o, q.attr) == v]
        if rel == "bigger":
            return ([o for o in cands if o.area * ratio > ref.area],
                    [o for o in cands if o.area > ref.area * ratio])
        return ([o for o in cands if o.area < ref.area * ratio],
                [o for o in cands if o.area * ratio < ref.area])
    raise ValueError(f"unknown relation {rel!r}")


def _by_area(items: list[WorldObject], largest: bool, ratio: float) -> tuple[list, list]:
    if not items:
        return [], []
    if largest:
        best = max(o.area for o in items)
        possible = [o for o in items if o.area * ratio >= best]
    else:
        best = min(o.area for o in items)
        possible = [o for o in items if o.area <= best * ratio]
    return possible, (possible if len(possible) == 1 else [])


def resolve(q: Query, objects: list[WorldObject], targets: list[int],
            margins: Margins) -> list[int]:
    """The checker: ids of every object the query may denote (sorted). ``targets[k-1]`` is the
    object id segmented in round k."""
    possible, _ = evaluate(q, objects, targets, margins)
    return sorted(o.id for o in possible)


def all_targets(q: Query, objects: list[WorldObject]) -> list[int]:
    """The targets of an all round: ids of every top-level object its head matches, left to
    right (by centroid x; the generator asks only when neighbours differ by more than the
    margin, so the order is clear)."""
    if q.relation != ALL_RELATION:
        raise ValueError(f"not an all round: relation {q.relation!r}")
    return [o.id for o in sorted(_pool(objects, [], q.head), key=lambda o: o.cx) if q.head.matches(o)]


def is_unique(q: Query, objects: list[WorldObject], targets: list[int],
              margins: Margins) -> int | None:
    """The one object id the query denotes clearly, or None."""
    possible, definite = evaluate(q, objects, targets, margins)
    if len(possible) == 1 and len(definite) == 1 and possible[0].id == definite[0].id:
        return possible[0].id
    return None


def needs_memory(q: Query, objects: list[WorldObject], targets: list[int],
                 margins: Margins) -> bool:
    """Whether the answer depends on *which* objects the referenced instances are: some other
    choice of one referenced instance makes the query denote a different object clearly."""
    if not q.refs:
        return False
    answer = is_unique(q, objects, targets, margins)
    for k in q.refs:
        actual = targets[k - 1]
        for o in objects:
            if o.id == actual:
                continue
            alt = list(targets)
            alt[k - 1] = o.id
            got = is_unique(q, objects, alt, margins)
            if got is not None and got != answer:
                return True
    return False


def reference_ancestors(queries: list[Query]) -> list[set[int]]:
    """Per round, the 0-indexed earlier rounds it depends on through its references, transitively."""
    ancestors: list[set[int]] = []
    for q in queries:
        anc: set[int] = set()
        for k in q.refs:
            if 1 <= k <= len(ancestors):
                anc |= {k - 1} | ancestors[k - 1]
        ancestors.append(anc)
    return ancestors


def text_resolvable(queries: list[Query], objects: list[WorldObject], targets: list[int],
                    margins: Margins, *, max_scenarios: int = 4096) -> list[bool]:
    """Per round, whether the questions' text alone determines its target.

    The chain of queries is re-resolved from round 1 with every pick round left open: each
    pick round may have been answered by any of its valid alternatives (:func:`resolve`), and
    every other round is re-resolved (:func:`is_unique`) given the earlier answers of that
    scenario. A round is text-resolvable iff it is not a pick round and it has the same unique
    answer in every scenario of the pick rounds it depends on (through its references,
    transitively). So a round without references is text-resolvable (unless it is a pick); a
    round referring only to text-resolvable rounds is too; a round referring to a pick round
    is not, unless every alternative of the pick gives it the same unique answer.

    Args:
        queries: the structured query of each round, in order.
        targets: the recorded target id of each round (``targets[k-1]``: round k).
        max_scenarios: the most combinations of pick alternatives enumerated per round; a
            round depending on more is counted not text-resolvable (the text leaves that much
            open).
    Returns:
        one bool per round.
    """
    return resolvability(queries, targets, lambda q, prior: resolve(q, objects, prior, margins),
                         lambda q, prior: is_unique(q, objects, prior, margins), max_scenarios=max_scenarios)


# relations whose answer the text fixes whatever the pick rounds chose (they refer to none)
_FIXED = (ALL_RELATION, ONE_OF_RELATION)


def resolvability(queries: list[Query], targets: list[int], resolve_pick, unique, *,
                  max_scenarios: int = 4096, rounds: list[int] | None = None) -> list[bool]:
    """:func:`text_resolvable` over given answerers: ``resolve_pick(query, earlier_targets)`` the
    valid alternatives of a pick round, ``unique(query, earlier_targets)`` a round's unique target
    or None (the readable checkers here, or :class:`segllm.data.world.scene_index.SceneIndex`'s
    tables: both give the same answers). With ``rounds`` (0-indexed), only those rounds' answers,
    in that order (a round's answer depends on the rounds up to it only)."""
    n = len(queries)
    if len(targets) < n:
        raise ValueError(f"{n} queries but {len(targets)} targets")
    ancestors = reference_ancestors(queries)
    wanted = range(n) if rounds is None else rounds
    needed = set(range(n)) if rounds is None else set().union(*(ancestors[i] for i in wanted))
    picks = {i: resolve_pick(queries[i], targets[:i]) for i in sorted(needed)
             if queries[i].relation == "pick"}
    out: list[bool] = []
    for i in wanted:
        q = queries[i]
        if q.relation == "pick":
            out.append(False)
            continue
        if q.relation in _FIXED:  # the text names its targets (all rounds) or one of them by order
            out.append(True)
            continue
        if not q.refs:
            out.append(unique(q, targets[:i]) is not None)
            continue
        open_picks = sorted(a for a in ancestors[i] if a in picks)
        n_scen = 1
        for a in open_picks:
            n_scen *= max(1, len(picks[a]))
        if n_scen > max_scenarios:
            out.append(False)
            continue
        chain = sorted(ancestors[i] | {i})
        answers: set[int | None] = set()
        for choice in itertools.product(*(picks[a] for a in open_picks)):
            alt = list(targets[:i + 1])
            chosen = dict(zip(open_picks, choice))
            for j in chain:  # re-resolve the chain in order under this choice of the picks
                if queries[j].relation in _FIXED:
                    continue  # depends on no pick: its recorded target stands
                alt[j] = chosen[j] if j in chosen else unique(queries[j], alt[:j])
            answers.add(alt[i])
            if len(answers) > 1 or None in answers:
                break
        out.append(len(answers) == 1 and None not in answers)
    return out


# -- wording -------------------------------------------------------------------------------------

SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large"}
ORDINAL_WORDS = {1: "first", 2: "second", 3: "third", 4: "fourth"}
SIDE_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}
GO_WORDS = {"left": "left", "right": "right", "top": "up", "bottom": "down"}
DIR_PHRASES = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}

WRAPPERS: tuple[str, ...] = (
    "Segment {np}.",
    "Can you segment {np}?",
    "Where is {np}?",
    "Please segment {np}.",
    "Find {np}.",
    "Show me {np}.",
    "Could you highlight {np}?",
    "Now segment {np}.",
)

# noun-phrase templates per relation: {h} head phrase, {k}/{k2} instance numbers, {d} a
# direction word, {dp} a direction phrase ("left of"), {o} an ordinal word, {a} an attribute
# name, {p} a part name, {c} a colour
NP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "unique": ("the {h}", "the {h} in the image", "the {h} in the picture"),
    "extreme_left": ("the left-most {h}", "the {h} furthest to the left", "the {h} on the far left"),
    "extreme_right": ("the right-most {h}", "the {h} furthest to the right",
                      "the {h} on the far right"),
    "extreme_top": ("the top-most {h}", "the highest {h}", "the {h} closest to the top"),
    "extreme_bottom": ("the bottom-most {h}", "the lowest {h}", "the {h} closest to the bottom"),
    "ordinal": ("the {o} {h} from the {d}", "the {h} that is {o} from the {d}",
                "the {o} {h} counting from the {d}"),
    "largest": ("the largest {h}", "the biggest {h}", "the {h} that is the largest"),
    "smallest": ("the smallest {h}", "the tiniest {h}", "the {h} that is the smallest"),
    "same_colour": ("the {h} with the same colour as instance {k}",
                    "the {h} that has the colour of instance {k}",
                    "the {h} coloured like instance {k}"),
    "same_shape": ("the {h} with the same shape as instance {k}",
                   "the {h} shaped like instance {k}",
                   "the {h} that has the shape of instance {k}"),
    "same_texture": ("the {h} with the same texture as instance {k}",
                     "the {h} whose pattern matches instance {k}",
                     "the {h} with the texture of instance {k}"),
    "different_colour": ("the {h} whose colour differs from instance {k}",
                         "the {h} that is not the colour of instance {k}",
                         "the {h} with a different colour than instance {k}"),
    "different_shape": ("the {h} whose shape differs from instance {k}",
                        "the {h} that is not shaped like instance {k}",
                        "the {h} with a different shape than instance {k}"),
    "different_texture": ("the {h} whose texture differs from instance {k}",
                          "the {h} without the pattern of instance {k}",
                          "the {h} with a different texture than instance {k}"),
    "other": ("the other {h}, not instance {k}", "the {h} other than instance {k}",
              "the {h} that is not instance {k}"),
    "colour_and_shape": ("the {h} with the colour of instance {k} and the shape of instance {k2}",
                         "the {h} coloured like instance {k} and shaped like instance {k2}",
                         "the {h} sharing its colour with instance {k} and its shape with "
                         "instance {k2}"),
    "left_of": ("the {h} left of instance {k}", "the {h} to the left of instance {k}",
                "the {h} on the left side of instance {k}"),
    "right_of": ("the {h} right of instance {k}", "the {h} to the right of instance {k}",
                 "the {h} on the right side of instance {k}"),
    "above": ("the {h} above instance {k}", "the {h} higher up than instance {k}",
              "the {h} located above instance {k}"),
    "below": ("the {h} below instance {k}", "the {h} under instance {k}",
              "the {h} lower than instance {k}"),
    "nearest": ("the {h} closest to instance {k}", "the {h} nearest to instance {k}",
                "the {h} that is closest to instance {k}"),
    "farthest": ("the {h} farthest from instance {k}", "the {h} furthest away from instance {k}",
                 "the {h} most distant from instance {k}"),
    "ordinal_from": ("the {o} {h} {dp} instance {k}", "the {h} that is {o} {dp} instance {k}",
                     "the {o} {h} going {g} from instance {k}"),
    "part_name": ("the {p} of instance {k}", "instance {k}'s {p}", "the {p} belonging to instance {k}"),
    "part_extreme": ("the part of instance {k} at the {d}", "the {d}-most part of instance {k}",
                     "the {d} part of instance {k}"),
    "part_colour": ("the {c} part of instance {k}", "the part of instance {k} that is {c}",
                    "the {c} piece of instance {k}"),
    "whole": ("the {h} that instance {k} is part of", "the {h} that instance {k} belongs to",
              "the whole {h} containing instance {k}"),
    "bigger": ("the {h} bigger than instance {k}", "the {h} that is larger than instance {k}",
               "the {h} of greater size than instance {k}"),
    "smaller": ("the {h} smaller than instance {k}", "the {h} that is tinier than instance {k}",
                "the {h} of lesser size than instance {k}"),
    "bigger_attr": ("the {h} bigger than instance {k} with the same {a}",
                    "the {h} that is larger than instance {k} and shares its {a}",
                    "the {h} with the same {a} as instance {k} but bigger"),
    "smaller_attr": ("the {h} smaller than instance {k} with the same {a}",
                     "the {h} that is smaller than instance {k} and shares its {a}",
                     "the {h} with the same {a} as instance {k} but smaller"),
    "largest_dir": ("the largest {h} {dp} instance {k}", "the biggest {h} {dp} instance {k}",
                    "the largest of the {hs} {dp} instance {k}"),
    "smallest_dir": ("the smallest {h} {dp} instance {k}", "the tiniest {h} {dp} instance {k}",
                     "the smallest of the {hs} {dp} instance {k}"),
}


# whole questions of pick rounds: {hs} the plural head phrase, {ah} the head with "a"/"an"
PICK_TEMPLATES: tuple[str, ...] = (
    "Segment one of the {hs}.",
    "Segment {ah}.",
    "Pick any of the {hs}.",
    "Can you segment one of the {hs}?",
    "Show me any one of the {hs}.",
    "Find {ah}, any of them.",
    "Choose one of the {hs} and segment it.",
)


# whole questions of all rounds: {hs} the plural head phrase, {h} the head
ALL_TEMPLATES: tuple[str, ...] = (
    "Segment all the {hs}.",
    "Segment every {h}.",
    "Find all the {hs}.",
    "Show me every {h}.",
    "Can you segment all of the {hs}?",
    "Please segment each {h}.",
)
# answers of all rounds: {segs} one "<seg>" per target, in the order the answer states
ALL_ANSWERS: tuple[str, ...] = (
    "From left to right: {segs}.",
    "Here they are, from left to right: {segs}.",
    "There are {n}, from left to right: {segs}.",
)
# whole questions of one-of rounds: {o} the ordinal word, {k} the all round
ONE_OF_TEMPLATES: tuple[str, ...] = (
    "Segment the {o} of instance {k} from the left.",
    "Of instance {k}, segment the {o} from the left.",
    "Which is the {o} of instance {k} counting from the left? Segment it.",
)
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def all_answer(n: int, rng: np.random.Generator | Draws) -> str:
    """The answer of an all round with n targets: n ``<seg>`` in a list, left to right."""
    if n < 1:
        raise ValueError(f"an all round needs at least one target, got {n}")
    segs = "<seg>" if n == 1 else ", ".join(["<seg>"] * (n - 1)) + " and <seg>"
    t = ALL_ANSWERS[int(rng.integers(len(ALL_ANSWERS)))]
    return t.format(segs=segs, n=_NUMBER_WORDS.get(n, str(n)))


def with_article(noun_phrase: str) -> str:
    """ "a red circle", "an orange star"."""
    return ("an " if noun_phrase[:1] in "aeiou" else "a ") + noun_phrase


def plural(noun_phrase: str) -> str:
    if noun_phrase.endswith(("s", "x", "sh", "ch")):
        return noun_phrase + "es"
    return noun_phrase + "s"


def template_key(q: Query) -> str:
    if q.relation == "extreme":
        return f"extreme_{q.direction}"
    if q.relation in ("bigger", "smaller") and q.attr is not None:
        return f"{q.relation}_attr"
    return q.relation


def phrase(q: Query, rng: np.random.Generator | Draws) -> str:
    """A question asking for the object a query denotes, worded by a random template."""
    if q.relation == "pick":
        t = PICK_TEMPLATES[int(rng.integers(len(PICK_TEMPLATES)))]
        h = q.head.phrase("object")
        return t.format(hs=plural(h), ah=with_article(h))
    if q.relation == ALL_RELATION:
        t = ALL_TEMPLATES[int(rng.integers(len(ALL_TEMPLATES)))]
        h = q.head.phrase("object")
        return t.format(hs=plural(h), h=h)
    if q.relation == ONE_OF_RELATION:
        t = ONE_OF_TEMPLATES[int(rng.integers(len(ONE_OF_TEMPLATES)))]
        return t.format(o=ORDINAL_WORDS[q.rank or 1], k=q.refs[0])
    templates = NP_TEMPLATES[template_key(q)]
    t = templates[int(rng.integers(len(templates)))]
    h = q.head.phrase("object")
    np_ = t.format(
        h=h,
        hs=plural(h),
        g=GO_WORDS.get(q.direction or "", ""),
        k=q.refs[0] if q.refs else "",
        k2=q.refs[1] if len(q.refs) > 1 else "",
        d=SIDE_WORDS.get(q.direction or "", ""),
        dp=DIR_PHRASES.get(q.direction or "", ""),
        o=ORDINAL_WORDS.get(q.rank or 0, ""),
        a=q.attr or "",
        p=q.part or "",
        c=q.colour or "",
    )
    w = WRAPPERS[int(rng.integers(len(WRAPPERS)))]
    return w.format(np=np_)


# -- head enumeration ----------------------------------------------------------------------------


_COMBOS: dict[tuple[tuple[str, ...], int], list[tuple[str, ...]]] = {}


def head_combos(o: WorldObject, allowed: tuple[str, ...], rng: np.random.Generator,
                max_attrs: int = 4) -> list[tuple[str, ...]]:
    """The attribute subsets :func:`heads_for` builds its heads from, in its order (the same
    draws from rng)."""
    avail = tuple(a for a in allowed if getattr(o, a) != MIXED)
    out: list[tuple[str, ...]] = []
    for n in range(0, min(max_attrs, len(avail)) + 1):
        combos = _COMBOS.get((avail, n))
        if combos is None:
            combos = _COMBOS[(avail, n)] = list(itertools.combinations(avail, n))
        if len(combos) == 1:
            out.append(combos[0])  # rng.permutation(1) draws nothing (tests/data/test_world_index.py)
        else:
            out.extend(combos[i] for i in rng.permutation(len(combos)).tolist())
    return out


def heads_for(o: WorldObject, allowed: tuple[str, ...], rng: np.random.Generator,
              max_attrs: int = 4) -> list[Head]:
    """Heads built from subsets of o's attributes (only those in ``allowed``), fewest attributes
    first, random order within a size."""
    return [Head(**{a: getattr(o, a) for a in c}) for c in head_combos(o, allowed, rng, max_attrs)]
