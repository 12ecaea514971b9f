"""The world: deterministic samples (scene + multi-round conversation) and dataset writing.

Every sample is drawn from its own generator ``np.random.default_rng([seed, split_id, index])``,
so the same (seed, split, index) always gives the same image and conversation, whatever else
is generated and in whichever order.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segllm.data.world import language as L
from segllm.data.world.draws import Draws
from segllm.data.world.scene import (
    CATEGORIES,
    CATEGORY_IDS,
    COLOURS,
    MIXED,
    SHAPES,
    WorldObject,
    _LayoutError,
    render_scene,
)
from segllm.data.world.scene_index import SceneIndex
from segllm.errors import ConfigError

GENERATOR_VERSION = "segllm-world/1"
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "heldout": 3}
HELDOUT_SEED = 20250125  # fixes the held-out (colour, shape) pairs, whatever the world seed

DEFAULT_ANSWERS = ("<seg>", "It is <seg>.", "Sure, <seg>.", "Here it is: <seg>.",
                   "<seg> is the one.", "Sure, it is <seg>.")

# relation family weights: rounds without a reference, rounds with one
_NO_REF_WEIGHTS = {"attribute": 0.4, "positional": 0.25, "ordinal": 0.15, "comparison": 0.2}
_REF_WEIGHTS = {"attribute": 0.28, "positional": 0.3, "ordinal": 0.08, "part-of": 0.16,
                "comparison": 0.18}
# relative weights of relations within a family (default 1); relations that are rarely unique
# are drawn more often so that easy ones do not crowd them out
_RELATION_WEIGHTS = {"left_of": 2.5, "right_of": 2.5, "above": 2.5, "below": 2.5,
                     "bigger": 2.0, "smaller": 2.0}
_RELATION_W: dict[tuple[str, ...], tuple[float, ...]] = {}  # per family's relations, their weights
# relations whose targets are top-level objects only; others may also target parts
_TOP_ONLY = ("same_shape", "different_shape", "other", "colour_and_shape", "largest",
             "smallest", "bigger", "smaller", "largest_dir", "smallest_dir")
_PART_TARGET_PROB = 0.3

_NO_SIZE = tuple(a for a in L.ATTRS if a != "size")  # heads of size comparisons


@dataclass
class WorldConfig:
    """Settings of the procedural world.

    Attributes:
        image_size: side of the square images, pixels.
        min_objects, max_objects: top-level objects per scene (a crowded scene may get fewer
            than drawn, never fewer than ``min_objects``).
        min_rounds, max_rounds: rounds per conversation (the drawn number is capped by the
            number of distinct objects that can be described).
        answers: answer templates, each with exactly one "<seg>".
        composite_prob: chance that an object is a composite (house, tree, lollipop).
        min_visible: the least fraction of its own area every object and part keeps visible.
        ref_prob: chance that a round after the first refers to earlier rounds.
        memory_prob: chance that a referring round insists on a question whose answer depends
            on which objects the referenced instances are (when one can be found); where an
            earlier round is not text-resolvable (a pick round, or one depending on it), such
            a round insists on depending on it too.
        pick_prob: chance that a round is a *pick* round ("Segment one of the red objects.":
            two or more objects match, the target is one of them drawn at random), when the
            scene has such a phrase; later rounds refer preferentially to pick rounds and to
            rounds depending on them, so their answers are not determined by the text alone.
        heldout_fraction: fraction of (colour, shape) pairs held out of train/val/test.
        multi_target_prob: chance that a round is an *all* round ("Segment all the red
            objects.": every top-level object a head phrase matches, two to
            ``language.MAX_TARGETS`` of them, answered with one ``<seg>`` each, left to right),
            when the scene has such a phrase; after one, a later round may ask for one of its
            targets by that order ("the second of instance 2 from the left"). 0 (the default)
            draws nothing for them, so the default world is unchanged.
        family_weights: multipliers of the relation families' chances (``language.FAMILIES``,
            e.g. ``{"ordinal": 2.5}``: ordinal rounds 2.5 times as likely as by default, before
            renormalising), for a recipe that drills the weak families; empty (the default)
            keeps the default world, conversation for conversation.
    """

    image_size: int = 128
    min_objects: int = 3
    max_objects: int = 8
    min_rounds: int = 2
    max_rounds: int = 8
    answers: list[str] = field(default_factory=lambda: list(DEFAULT_ANSWERS))
    composite_prob: float = 0.25
    min_visible: float = 0.6
    ref_prob: float = 0.9
    memory_prob: float = 0.9
    pick_prob: float = 0.25
    heldout_fraction: float = 0.1
    multi_target_prob: float = 0.0
    family_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"need 1 <= min_objects <= max_objects, got "
                              f"{self.min_objects}, {self.max_objects}")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ConfigError(f"need 1 <= min_rounds <= max_rounds, got "
                              f"{self.min_rounds}, {self.max_rounds}")
        if not self.answers:
            raise ConfigError("answers must not be empty")
        self.answers = list(self.answers)
        for a in self.answers:
            if a.count("<seg>") != 1:
                raise ConfigError(f"every answer needs exactly one <seg>: {a!r}")
        for name in ("composite_prob", "min_visible", "ref_prob", "memory_prob", "pick_prob",
                     "heldout_fraction", "multi_target_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {v}")
        self.family_weights = {str(k): float(v) for k, v in dict(self.family_weights).items()}
        for k, v in self.family_weights.items():
            if k not in L.FAMILIES:
                raise ConfigError(f"family_weights: unknown family {k!r}; expected some of {list(L.FAMILIES)}")
            if not 0.0 <= v < float("inf"):
                raise ConfigError(f"family_weights[{k!r}] must be a finite number >= 0, got {v}")
        for table in (_NO_REF_WEIGHTS, _REF_WEIGHTS):
            if sum(w * self.family_weights.get(f, 1.0) for f, w in table.items()) <= 0:
                raise ConfigError(f"family_weights leave no family to draw from among {list(table)}")

    def family_tables(self) -> tuple[dict[str, float], dict[str, float]]:
        """The families' chances of rounds without a reference and with one, after
        ``family_weights`` (the module's own tables when it is empty)."""
        if not self.family_weights:
            return _NO_REF_WEIGHTS, _REF_WEIGHTS
        return tuple({f: w * self.family_weights.get(f, 1.0) for f, w in table.items()}
                     for table in (_NO_REF_WEIGHTS, _REF_WEIGHTS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown WorldConfig keys: {sorted(unknown)}")
        return cls(**d)


def heldout_pairs(fraction: float = 0.1) -> frozenset[tuple[str, str]]:
    """The (colour, shape) pairs of basic shapes never drawn in train/val/test.

    Fixed by HELDOUT_SEED; no colour and no shape loses more than two of its pairs, so every
    colour and every shape is still seen in training.
    """
    pairs = [(c, s) for s in SHAPES for c in COLOURS]
    n = int(round(fraction * len(pairs)))
    rng = np.random.default_rng(HELDOUT_SEED)
    chosen: list[tuple[str, str]] = []
    per_c: dict[str, int] = {}
    per_s: dict[str, int] = {}
    for i in rng.permutation(len(pairs)):
        if len(chosen) >= n:
            break
        c, s = pairs[i]
        if per_c.get(c, 0) >= 2 or per_s.get(s, 0) >= 2:
            continue
        chosen.append((c, s))
        per_c[c] = per_c.get(c, 0) + 1
        per_s[s] = per_s.get(s, 0) + 1
    return frozenset(chosen)


@dataclass
class Sample:
    """One scene and its conversation.

    ``masks`` maps annotation ids local to the sample (1, 2, ...) to visible-pixel masks, for
    every object and part; ``record`` is the conversation record (``mask_ids`` are keys of
    ``masks``); ``queries[i]`` is the structured query of round i+1 (for re-checking),
    ``needs_memory[i]`` whether its answer depends on which objects its references are,
    ``text_resolvable[i]`` whether the questions' text alone determines its answer
    (:func:`segllm.data.world.language.text_resolvable`) and ``alternatives[i]`` the ids of
    every valid answer of a pick round (empty for other rounds). The record's rounds carry the
    same as ``kind`` ("query", "pick", or "all" for a several-target round, whose ``mask_ids``
    are its targets left to right), ``text_resolvable`` and ``alternatives`` (pick rounds only).
    """

    split: str
    index: int
    image: np.ndarray
    masks: dict[int, np.ndarray]
    objects: list[WorldObject]
    record: dict[str, Any]
    queries: list[L.Query]
    needs_memory: list[bool]
    text_resolvable: list[bool] = field(default_factory=list)
    alternatives: list[list[int]] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        """Each round's (first) target id."""
        return [r["mask_ids"][0] for r in self.record["rounds"]]


# -- conversation building -----------------------------------------------------------------------


# Draws are written so that they take from the generator exactly what the numpy calls they
# replace took, and give the same values (``rng.choice(seq)`` is ``seq[rng.integers(len(seq))]``;
# ``rng.choice(n, p=p)`` searches one ``rng.random()`` in p's cumulative sums), checked by
# tests/data/test_world_index.py; the conversations themselves are pinned by
# tests/data/test_world_golden.py.
_CDFS: dict[tuple[float, ...], list[float]] = {}


def _cdf(p: tuple[float, ...]) -> list[float]:
    """What ``rng.choice(len(p), p=p)`` searches: p's cumulative sums over their last."""
    c = _CDFS.get(p)
    if c is None:
        a = np.asarray(p, dtype=np.float64).cumsum()
        a /= a[-1]
        c = _CDFS[p] = a.tolist()
    return c


def _choice_p(rng: np.random.Generator | Draws, p: tuple[float, ...]) -> int:
    """``int(rng.choice(len(p), p=p))``: the same draw from rng and the same index."""
    return bisect.bisect_right(_cdf(p), rng.random())


def _normalised(w: tuple[float, ...]) -> tuple[float, ...]:
    """``tuple(w / w.sum())`` as numpy computes it."""
    p = _NORMALISED.get(w)
    if p is None:
        a = np.asarray(w, dtype=np.float64)
        p = _NORMALISED[w] = tuple((a / a.sum()).tolist())
    return p


_NORMALISED: dict[tuple[float, ...], tuple[float, ...]] = {}


def _choice(rng: Draws, seq):
    """``rng.choice(seq)`` for a sequence of strings or ints, as its element."""
    return seq[rng.integers(len(seq))]


def _choice_w(rng: np.random.Generator | Draws, w: tuple[float, ...]) -> int:
    """``_choice_p(rng, _normalised(w))``, its cumulative sums kept by the weights."""
    c = _CDFS_OF_WEIGHTS.get(w)
    if c is None:
        c = _CDFS_OF_WEIGHTS[w] = _cdf(_normalised(w))
    return bisect.bisect_right(c, rng.random())


_CDFS_OF_WEIGHTS: dict[tuple[float, ...], list[float]] = {}


def _weighted(rng: np.random.Generator | Draws, weights: dict[str, float]) -> str:
    got = _WEIGHTED.get(id(weights))
    if got is None or got[0] is not weights:  # the module's weight tables, read once
        keys = list(weights)
        got = _WEIGHTED[id(weights)] = (weights, keys, tuple(float(weights[k]) for k in keys))
    return got[1][_choice_w(rng, got[2])]


_WEIGHTED: dict[int, tuple[dict, list[str], tuple[float, ...]]] = {}


# how much likelier a reference is to go to a round that is not text-resolvable (a pick round
# or one depending on it), so that dependence on the picked mask propagates down the chain
_OPEN_REF_WEIGHT = 4.0


def _pick_round(rng: Draws, targets: list[int], by_id: dict[int, WorldObject],
                ok, prefer: set[int] = frozenset(), exclude=()) -> int | None:
    """A 1-indexed earlier round whose target satisfies ok; recent rounds are likelier, and so
    are the rounds in ``prefer``; never a round in ``exclude`` (all rounds: several targets)."""
    rounds = [k for k in range(1, len(targets) + 1) if k not in exclude and ok(by_id[targets[k - 1]])]
    if not rounds:
        return None
    w = tuple((3.0 if k == len(targets) else 1.0) * (_OPEN_REF_WEIGHT if k in prefer else 1.0)
              for k in rounds)
    return rounds[_choice_w(rng, w)]


def _offered_heads(vals: tuple) -> tuple[tuple, ...]:
    """The head keys a pick round tries for an object with attribute values ``vals`` (size,
    colour, texture, shape), in order: each attribute alone, then adjacent pairs of them
    (mixed colours left out). Kept per values: a world has a few thousand."""
    got = _OFFERED.get(vals)
    if got is None:
        avail = [j for j in range(4) if vals[j] != MIXED]
        combos = [(j,) for j in avail] + list(zip(avail, avail[1:]))
        got = _OFFERED[vals] = tuple(tuple(vals[j] if j in c else None for j in range(4))
                                     for c in combos)
    return got


_OFFERED: dict[tuple, tuple[tuple, ...]] = {}


class _Builder:
    def __init__(self, objects: list[WorldObject], rng: Draws,
                 margins: L.Margins, families: tuple[dict[str, float], dict[str, float]] | None = None) -> None:
        self.objects = objects
        # the families' chances without / with a reference (WorldConfig.family_tables)
        self.no_ref_weights, self.ref_weights = families or (_NO_REF_WEIGHTS, _REF_WEIGHTS)
        self.index = SceneIndex(objects, margins)
        self.pos = self.index.pos
        self.by_id = {o.id: o for o in objects}
        self.top = [o for o in objects if o.parent is None]
        self.rng = rng
        self.margins = margins
        self.queries: list[L.Query] = []  # the rounds built so far
        self.open: set[int] = set()  # 1-indexed rounds built so far that are not text-resolvable
        self.resolvable_so_far: list[bool] = []  # per round built: text-resolvable (exact)
        self.alternatives: list[list[int]] = []  # per round built: a pick round's valid answers
        # 1-indexed all rounds built so far -> their targets left to right, and those a one-of
        # round has followed
        self.multi: dict[int, list[int]] = {}
        self.followed: set[int] = set()

    # one relation, its parameters drawn once; every target/head that makes it unique
    def options(self, family: str, relation: str, targets: list[int], target_ok,
                ambiguous: bool = False) -> list[tuple[tuple, int]]:
        """Questions of one relation (references and parameters drawn once) for each object they
        can denote uniquely, with the fewest head attributes; with ``ambiguous``, preferably a
        head that alone matches several objects, so that the references decide. As (option,
        target id); :meth:`query` makes an option's question."""
        rng, by_id = self.rng, self.by_id
        used = set(targets)
        refs: tuple[int, ...] = ()
        kw: dict[str, Any] = {}
        allowed: tuple[str, ...] = L.ATTRS
        min_attrs, max_attrs = 0, 2
        cands: list[WorldObject]
        untargeted = [o for o in self.top if o.id not in used and target_ok(o)]
        if relation not in _TOP_ONLY and rng.random() < _PART_TARGET_PROB:
            # parts may be described by their own name ("the red roof", "the door closest to
            # instance 2"); the head then always names the part
            untargeted += [o for o in self.objects
                           if o.parent is not None and o.id not in used and target_ok(o)]

        if relation == "unique":
            cands, min_attrs, max_attrs = untargeted, 1, 4
        elif relation in ("extreme", "ordinal", "largest", "smallest"):
            cands, max_attrs = untargeted, 3
            if relation in ("largest", "smallest"):
                allowed = _NO_SIZE
            if relation != "largest" and relation != "smallest":
                kw["direction"] = _choice(rng, L.DIRECTIONS)
            if relation == "ordinal":
                kw["rank"] = (2, 3)[_choice_p(rng, (0.7, 0.3))]
        elif relation in ("part_name", "part_extreme", "part_colour"):
            k = _pick_round(rng, targets, by_id, prefer=self.open, exclude=self.multi, ok=lambda o: o.kind == "composite" and any(
                p not in used for p in o.parts))
            if k is None:
                return []
            refs = (k,)
            cands = [by_id[p] for p in by_id[targets[k - 1]].parts
                     if p not in used and target_ok(by_id[p])]
            allowed, max_attrs = (), 0
            if relation == "part_extreme":
                kw["direction"] = _choice(rng, ("top", "bottom"))
        elif relation == "whole":
            k = _pick_round(rng, targets, by_id, prefer=self.open, exclude=self.multi, ok=lambda o: o.kind == "part" and o.parent not in used)
            if k is None:
                return []
            refs = (k,)
            whole = by_id[by_id[targets[k - 1]].parent]
            cands = [whole] if target_ok(whole) else []
            allowed, max_attrs = ("shape",), 1
        else:
            if relation in ("same_colour", "different_colour"):
                ok = lambda o: o.colour != MIXED  # noqa: E731
            elif relation in ("same_shape", "different_shape", "other"):
                ok = lambda o: o.parent is None  # noqa: E731
            else:
                ok = lambda o: True  # noqa: E731
            k = _pick_round(rng, targets, by_id, prefer=self.open, exclude=self.multi, ok=ok)
            if k is None:
                return []
            refs = (k,)
            ref = by_id[targets[k - 1]]
            cands = untargeted
            if relation.startswith("same_") or relation.startswith("different_"):
                a = relation.split("_", 1)[1]
                allowed = tuple(x for x in L.ATTRS if x != a)
            elif relation == "colour_and_shape":
                k2 = _pick_round(rng, targets, by_id, prefer=self.open, exclude=self.multi, ok=lambda o: o.parent is None and o.id != ref.id)
                if k2 is None or ref.colour == MIXED:
                    return []
                refs = (k, k2)
                allowed, max_attrs = ("size", "texture"), 1
            elif relation in ("bigger", "smaller"):
                # "the star bigger than instance 2" alone always denotes the largest star, so
                # the compared object also shares an attribute with the reference
                attrs = [a for a in ("colour", "texture", "shape") if getattr(ref, a) != MIXED]
                attr = _choice(rng, attrs)
                kw["attr"] = attr
                allowed = tuple(x for x in _NO_SIZE if x != attr)
            elif relation in ("ordinal_from", "largest_dir", "smallest_dir"):
                if relation != "ordinal_from":
                    allowed = _NO_SIZE
                kw["direction"] = _choice(rng, L.DIRECTIONS)
                if relation == "ordinal_from":
                    kw["rank"] = (1, 2, 3)[_choice_p(rng, (0.3, 0.45, 0.25))]

        out: list[tuple[tuple, int]] = []
        index = self.index
        pos = self.pos
        ref_pos = tuple(pos[targets[k - 1]] for k in refs)
        direction, rank, attr = kw.get("direction"), kw.get("rank"), kw.get("attr")
        need_memory = bool(refs) and ambiguous
        part_rel = relation in ("part_name", "part_extreme", "part_colour")
        is_other = relation == "other"
        per_target = relation == "part_name" or relation == "part_colour"
        reach = None
        if not per_target:
            memo, answer = index.answers(relation, ref_pos, direction, rank, attr)
            reach = index.reach(relation, ref_pos, direction, rank, attr)
        if is_other:
            ref_p = pos[targets[refs[0] - 1]]
        n_matching = index.n_matching
        shuffled, shuffled_levels = rng.shuffled, rng.shuffled_levels
        if not is_other:
            levels_at = index.levels_at(allowed, max_attrs)
        for t in shuffled(cands)[:8]:
            tid = t.id
            p = pos[tid]
            part = t.shape if relation == "part_name" else None
            colour = t.colour if relation == "part_colour" else None
            if per_target:
                memo, answer = index.answers(relation, ref_pos, direction, rank, attr, part, colour)
            if is_other:
                vt, vr = index.values[p], index.values[ref_p]
                allowed_t = tuple(a for a, x, y in zip(L.ATTRS, vt, vr) if x == y)
                levels = index.head_levels(p, allowed_t, 2)
            else:
                levels = levels_at[p]
                if levels is None:
                    levels = levels_at[p] = index.head_levels(p, allowed, max_attrs)
            # heads_for's draws: every level of two or more heads permuted, fewest attributes
            # first (all drawn before any head is tried)
            if reach is not None and tid not in reach:
                shuffled_levels(levels, keep=False)  # no head can make it the answer: only its draws are made
                continue
            orders = shuffled_levels(levels)
            part_head = t.kind == "part" and not part_rel  # then the head must name the part
            shape = t.shape
            first: tuple | None = None  # the head (a SceneIndex head key) of the question
            lo = max(min_attrs, 1) if is_other else min_attrs
            for hks in orders[lo:]:
                for hk in hks:
                    if part_head and hk[3] != shape:
                        continue
                    if need_memory and first is not None and n_matching(hk) < 2:
                        continue  # have a valid question; look only for one that needs memory
                    u = memo.get(hk, 0)  # 0: not asked yet (ids start at 1)
                    if u == 0:
                        u = answer(hk)
                    if u == tid:
                        if not need_memory or n_matching(hk) >= 2:
                            first = hk
                            break
                        if first is None:
                            first = hk
                else:
                    continue
                break
            if first is not None:
                out.append(((family, relation, first, refs, kw, part, colour), tid))
        return out

    @staticmethod
    def query(option: tuple) -> L.Query:
        """The question of an option of :meth:`options` (built only for the options tried)."""
        family, relation, hk, refs, kw, part, colour = option
        extra = dict(kw)
        if part is not None:
            extra["part"] = part
        if colour is not None:
            extra["colour"] = colour
        return L.Query(family, relation, L.Head(*hk), refs, **extra)

    def pick(self, targets: list[int]) -> tuple[L.Query, int, list[int]] | None:
        """A pick round: a head phrase ("red object", "circle") that two or more top-level
        objects match, none of them (nor their parts) an earlier target; (query, target drawn
        among the matches, every match's id), or None when the scene has no such phrase."""
        used: set[int] = set()
        for t in targets:
            used |= L._related(self.by_id[t])
        index = self.index
        used_mask = 0
        for i, oid in enumerate(index.ids):
            if oid in used:
                used_mask |= 1 << i
        top_mask = index.top_mask
        # head keys, each tried once, in the order each object offers them: its attributes
        # alone, then adjacent pairs of them
        heads: list[tuple] = []
        tried: set[tuple] = set()
        for o in self.top:
            if o.id in used:
                continue
            for hk in _offered_heads(index.values[self.pos[o.id]]):
                if hk in tried:
                    continue
                tried.add(hk)
                m = index.head_mask(hk) & top_mask
                if m & (m - 1) and not m & used_mask:  # two or more, none used
                    heads.append(hk)
        if not heads:
            return None
        # one attribute is the usual case ("one of the red objects"); two ("one of the small
        # circles") when a single one is not available
        single = [h for h in heads if sum(v is not None for v in h) == 1]
        pool = single if single and self.rng.random() < 0.8 else heads
        head = pool[self.rng.integers(len(pool))]
        q = L.Query("attribute", "pick", L.Head(*head))
        alternatives = self.index.resolve(q, targets)
        target = alternatives[self.rng.integers(len(alternatives))]
        return q, target, alternatives

    def all_round(self) -> tuple[L.Query, int] | None:
        """An all round: a head phrase ("red object", "triangle"), not asked by an earlier all
        round, that 2 to ``L.MAX_TARGETS`` top-level objects match, their centroids more than the
        margin apart from left to right (so the answer's order is clear); (query, its left-most
        target), or None when the scene has no such phrase. Its targets are
        :func:`L.all_targets`."""
        heads: list[L.Head] = []
        asked = {q.head for q in self.queries if q.relation == L.ALL_RELATION}  # not twice
        for o in self.top:
            avail = [a for a in L.ATTRS if getattr(o, a) != MIXED]
            for c in [(a,) for a in avail] + [(a, b) for a, b in zip(avail, avail[1:])]:
                h = L.Head(**{a: getattr(o, a) for a in c})
                if h in heads or h in asked:
                    continue
                xs = sorted(m.cx for m in self.top if h.matches(m))
                if 2 <= len(xs) <= L.MAX_TARGETS and all(b - a > self.margins.pixels for a, b in zip(xs, xs[1:])):
                    heads.append(h)
        if not heads:
            return None
        single = [h for h in heads if h.n_attrs() == 1]
        pool = single if single and self.rng.random() < 0.8 else heads
        q = L.Query("attribute", L.ALL_RELATION, pool[int(self.rng.integers(len(pool)))])
        return q, L.all_targets(q, self.objects)[0]

    def one_of(self) -> tuple[L.Query, int] | None:
        """A one-of round: one target of the latest all round no one-of round has followed yet,
        asked by its place from the left; (query, that target), or None without such a round."""
        left = [k for k in self.multi if k not in self.followed]
        if not left:
            return None
        k = left[-1]
        rank = 1 + int(self.rng.integers(len(self.multi[k])))
        q = L.Query("ordinal", L.ONE_OF_RELATION, L.Head(), (k,), direction="left", rank=rank)
        return q, self.multi[k][rank - 1]

    def add(self, q: L.Query, t: int, targets: list[int], tr: bool,
            alternatives: list[int] | None = None) -> None:
        """Record a built round (``targets`` already holds its target)."""
        self.queries.append(q)
        self.resolvable_so_far.append(tr)
        self.alternatives.append(alternatives if alternatives is not None else [])
        if not tr:
            self.open.add(len(self.queries))
        if q.relation == L.ALL_RELATION:
            self.multi[len(self.queries)] = L.all_targets(q, self.objects)
        elif q.relation == L.ONE_OF_RELATION:
            self.followed.add(q.refs[0])

    def resolvable(self, q: L.Query, t: int, targets: list[int]) -> bool:
        """Whether round ``len(targets) + 1`` asked as q (answer t) is text-resolvable given
        the rounds built so far; exact (:func:`L.text_resolvable`) and cheap when it refers to
        no open round."""
        if q.relation == "pick":
            return False
        if not any(k in self.open for k in q.refs):
            return True  # its references are all determined and it is unique given them
        n = len(self.queries)
        return self.index.text_resolvable(self.queries + [q], targets + [t], rounds=[n])[0]

    def _n_matching(self, head: L.Head) -> int:
        """How many objects a head phrase alone matches ("the red circle": every red circle)."""
        return self.index.n_matching((head.size, head.colour, head.texture, head.shape))

    def next_round(self, targets: list[int], use_ref: bool, want_memory: bool,
                   target_ok) -> tuple[L.Query, int, bool] | None:
        rng = self.rng
        fallback: tuple[L.Query, int, bool] | None = None
        fallback_rank = -1
        # with an open (not text-resolvable) earlier round, a memory round should depend on it
        insist_open = want_memory and bool(self.open)
        for attempt in range(30):
            ref_now = use_ref and attempt < 22
            if ref_now:
                family = _weighted(rng, self.ref_weights)
                rels = L.REF_RELATIONS[family]
            else:
                family = _weighted(rng, self.no_ref_weights)
                rels = L.NO_REF_RELATIONS[family]
            w = _RELATION_W.get(rels)
            if w is None:
                w = _RELATION_W[rels] = tuple(float(_RELATION_WEIGHTS.get(r, 1.0)) for r in rels)
            relation = rels[_choice_w(rng, w)]
            # a few draws of references/parameters per relation, so that relations that are
            # rarely unique (e.g. "left of") are not crowded out by easy ones
            opts: list[tuple[tuple, int]] = []
            for _ in range(3):
                opts = self.options(family, relation, targets, target_ok, want_memory)
                if opts:
                    break
            for option, t in rng.shuffled(opts):
                q = self.query(option)
                mem = self.index.needs_memory(q, targets)
                if insist_open:
                    if not self.resolvable(q, t, targets):
                        return q, t, mem
                    if int(mem) > fallback_rank:
                        fallback, fallback_rank = (q, t, mem), int(mem)
                    continue
                if mem or not want_memory:
                    return q, t, mem
                if fallback is None:
                    fallback = (q, t, mem)
            if fallback is not None and attempt >= 16:
                break
        return fallback


def build_conversation(objects: list[WorldObject], rng: np.random.Generator | Draws, n_rounds: int,
                       margins: L.Margins, *, ref_prob: float = 0.9, memory_prob: float = 0.9,
                       pick_prob: float = 0.0, first_target_ok=None, multi_target_prob: float = 0.0,
                       ) -> list[tuple[L.Query, int, bool]]:
    """Up to n_rounds (query, target id, needs_memory) rounds; stops early when no further
    object can be described uniquely. With ``pick_prob``, a round is a pick round (see
    :meth:`_Builder.pick`) with that chance, where the scene allows one (never round 1 when
    ``first_target_ok`` constrains it). With ``multi_target_prob``, a round is an all round
    (:meth:`_Builder.all_round`; its target id here is the left-most of its targets,
    :func:`L.all_targets` gives them all) with that chance, and a round after one is a one-of
    round (:meth:`_Builder.one_of`) with chance ``_ONE_OF_PROB``."""
    d = Draws.of(rng)
    b = _Builder(objects, d, margins)
    try:
        return _build(b, d, n_rounds, ref_prob, memory_prob, pick_prob, first_target_ok,
                      multi_target_prob)
    finally:
        b.index.release()
        d.sync(rng)


# chance that a round after an all round (not yet followed) asks for one of its targets
_ONE_OF_PROB = 0.5


def _multi_round(b: _Builder, rng: Draws, multi_target_prob: float) -> tuple[L.Query, int, bool] | None:
    """A one-of round (chance ``_ONE_OF_PROB`` where an all round waits for one) or an all round
    (chance ``multi_target_prob``), or None: the round is drawn as usual."""
    if any(k not in b.followed for k in b.multi) and rng.random() < _ONE_OF_PROB:
        got = b.one_of()
    elif rng.random() < multi_target_prob:
        got = b.all_round()
    else:
        return None
    return None if got is None else (got[0], got[1], False)


def _build(b: _Builder, rng: Draws, n_rounds: int, ref_prob: float,
           memory_prob: float, pick_prob: float, first_target_ok,
           multi_target_prob: float = 0.0) -> list[tuple[L.Query, int, bool]]:
    targets: list[int] = []
    rounds: list[tuple[L.Query, int, bool]] = []
    for r in range(1, n_rounds + 1):
        use_ref = r > 1 and rng.random() < ref_prob
        want_memory = use_ref and rng.random() < memory_prob
        ok = first_target_ok if (r == 1 and first_target_ok is not None) else (lambda o: True)
        got = alternatives = None
        # no draw at all unless asked for: the default world stays as pinned
        if multi_target_prob > 0 and not (r == 1 and first_target_ok):
            got = _multi_round(b, rng, multi_target_prob)
        if got is None and pick_prob > 0 and rng.random() < pick_prob and not (r == 1 and first_target_ok):
            picked = b.pick(targets)
            if picked is not None:
                got, alternatives = (picked[0], picked[1], False), picked[2]
        if got is None:
            got = b.next_round(targets, use_ref, want_memory, ok)
        if got is None:
            break
        tr = b.resolvable(got[0], got[1], targets)
        rounds.append(got)
        targets.append(got[1])
        b.add(got[0], got[1], targets, tr, alternatives)
    return rounds


# -- the world -----------------------------------------------------------------------------------


class World:
    """Deterministic sampler of scenes and conversations. ``world.sample(split, index)``."""

    def __init__(self, config: WorldConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else WorldConfig()
        self.seed = int(seed)
        self.heldout_pairs = heldout_pairs(self.config.heldout_fraction)
        self.margins = L.default_margins(self.config.image_size)
        self._families = self.config.family_tables()  # kept: _weighted caches per table object
        all_colours = list(COLOURS)
        self._colours_seen = {s: [c for c in all_colours if (c, s) not in self.heldout_pairs]
                              for s in SHAPES}
        self._colours_all = {s: all_colours for s in SHAPES}
        self._heldout_list = sorted(self.heldout_pairs)

    def sample(self, split: str, index: int) -> Sample:
        # building a conversation allocates many small containers, none of them kept in a
        # reference cycle past the call (SceneIndex.release), so the cyclic garbage collector
        # has nothing to find here: paused, it does not scan a large heap (a training process
        # holds the model's objects) every few hundred allocations; about 20% less time
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._sample(split, index)
        finally:
            if enabled:
                gc.enable()

    def _sample(self, split: str, index: int) -> Sample:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        cfg = self.config
        # np.random.default_rng([seed, split, index])'s draws (the same values, cheaper)
        rng = Draws.from_seed([self.seed, SPLITS[split], int(index)])
        heldout = split == "heldout"
        for _ in range(100):
            n_rounds = int(rng.integers(cfg.min_rounds, cfg.max_rounds + 1))
            lo = max(cfg.min_objects, min(n_rounds, cfg.max_objects))
            n_obj = int(rng.integers(lo, cfg.max_objects + 1))
            forced = []
            if heldout and self._heldout_list:
                forced = [self._heldout_list[int(rng.integers(len(self._heldout_list)))]]
            try:
                scene = render_scene(
                    rng, image_size=cfg.image_size, n_objects=n_obj,
                    composite_prob=cfg.composite_prob, min_visible=cfg.min_visible,
                    allowed_colours=self._colours_all if heldout else self._colours_seen,
                    forced_pairs=forced)
            except _LayoutError:
                continue
            if sum(o.parent is None for o in scene.objects) < cfg.min_objects:
                continue
            first_ok = None
            if heldout:
                first_ok = lambda o: (o.colour, o.shape) in self.heldout_pairs  # noqa: E731
            b = _Builder(scene.objects, rng, self.margins, self._families)
            try:
                rounds = _build(b, rng, n_rounds, cfg.ref_prob, cfg.memory_prob, cfg.pick_prob,
                                first_ok, cfg.multi_target_prob)
            finally:
                b.index.release()
            if len(rounds) >= cfg.min_rounds:
                break
        else:  # pragma: no cover - practically unreachable with sane configs
            raise RuntimeError(f"could not generate {split} sample {index}")

        queries = [r[0] for r in rounds]
        # what the builder found round by round: a round's text-resolvability depends on the
        # rounds up to it only (language.text_resolvable, which the builder's checks equal), a
        # pick round's alternatives are resolve(q, targets[:i])
        resolvable = b.resolvable_so_far
        alternatives = b.alternatives
        recs = []
        for (q, t, _mem), tr, alts in zip(rounds, resolvable, alternatives):
            question = L.phrase(q, rng)
            if q.relation == L.ALL_RELATION:  # one <seg> per target, left to right
                ids = L.all_targets(q, scene.objects)
                answer = L.all_answer(len(ids), rng)
            else:
                ids = [t]
                answer = cfg.answers[int(rng.integers(len(cfg.answers)))]
            kind = "pick" if q.relation == "pick" else "all" if q.relation == L.ALL_RELATION else "query"
            rec = {"question": question, "refs": list(q.refs), "answer": answer,
                   "mask_ids": ids, "relation": q.family,
                   "kind": kind, "text_resolvable": tr}
            if q.relation == "pick":
                rec["alternatives"] = list(alts)
            recs.append(rec)
        record = {"id": f"{split}-{index:06d}", "image": f"images/{split}_{index:06d}.png",
                  "image_id": index + 1, "rounds": recs}
        return Sample(split=split, index=index, image=scene.image, masks=scene.masks,
                      objects=scene.objects, record=record, queries=queries,
                      needs_memory=[r[2] for r in rounds], text_resolvable=resolvable,
                      alternatives=alternatives)


# -- writing -------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(config_dict: dict, seed: int, out_dir: str) -> None:
    _WORKER["world"] = World(WorldConfig.from_dict(config_dict), seed)
    _WORKER["out"] = out_dir


def _make_item(args: tuple[str, int]) -> tuple[dict, list[dict], dict]:
    from PIL import Image
    from pycocotools import mask as mask_utils

    split, index = args
    world: World = _WORKER["world"]
    s = world.sample(split, index)
    Image.fromarray(s.image, mode="RGB").save(
        os.path.join(_WORKER["out"], s.record["image"]), compress_level=1)
    h, w = s.image.shape[:2]
    image = {"id": s.record["image_id"], "file_name": s.record["image"], "height": h, "width": w}
    anns = []
    for o in s.objects:
        rle = mask_utils.encode(np.asfortranarray(s.masks[o.id].astype(np.uint8)))
        area = int(mask_utils.area(rle))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": o.id, "image_id": image["id"], "category_id": CATEGORY_IDS[o.shape],
                     "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0,
                     "attributes": o.attributes, "parent_id": o.parent})
    return image, anns, s.record


def write_split(root: str | os.PathLike, split: str, n: int, *, seed: int,
                config: WorldConfig | None = None, workers: int = 1,
                progress: bool = False) -> Path:
    """Write n samples (indices 0..n-1) of a split to ``root/<split>/``: ``images/*.png``,
    ``annotations.json`` (COCO, annotation ids unique across the split), ``conversations.jsonl``
    and ``meta.json``. Returns the split folder."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    config = config if config is not None else WorldConfig()
    out = Path(root) / split
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(split, i) for i in range(n)]
    cfg_dict = config.to_dict()

    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n, desc=f"world {split}", unit="conv")
        except ImportError:  # pragma: no cover
            bar = None

    images: list[dict] = []
    annotations: list[dict] = []
    records: list[dict] = []
    next_id = 1
    with open(out / "conversations.jsonl", "w", encoding="utf-8") as fconv:
        def consume(item: tuple[dict, list[dict], dict]) -> None:
            nonlocal next_id
            image, anns, record = item
            remap = {a["id"]: next_id + j for j, a in enumerate(anns)}
            next_id += len(anns)
            for a in anns:
                a["id"] = remap[a["id"]]
                if a["parent_id"] is not None:
                    a["parent_id"] = remap[a["parent_id"]]
            for r in record["rounds"]:
                r["mask_ids"] = [remap[i] for i in r["mask_ids"]]
                if "alternatives" in r:
                    r["alternatives"] = [remap[i] for i in r["alternatives"]]
            records.append(record)
            images.append(image)
            annotations.extend(anns)
            fconv.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)

        if workers <= 1:
            _init_worker(cfg_dict, seed, str(out))
            for job in jobs:
                consume(_make_item(job))
        else:
            import multiprocessing as mp

            # fork (where there is one) needs no ``if __name__ == "__main__"`` guard in the caller
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers, initializer=_init_worker,
                                              initargs=(cfg_dict, seed, str(out))) as pool:
                for item in pool.imap(_make_item, jobs, chunksize=16):
                    consume(item)
    if bar is not None:
        bar.close()

    coco = {"info": {"description": f"segllm procedural world, split {split}",
                     "version": GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": CATEGORIES}
    with open(out / "annotations.json", "w", encoding="utf-8") as f:
        json.dump(coco, f)
    meta = {"seed": seed, "split": split, "n": n, "config": cfg_dict,
            "version": GENERATOR_VERSION, "text_resolvable": resolvability_share(records),
            "heldout_pairs": [list(p) for p in sorted(heldout_pairs(config.heldout_fraction))]}
    with open(out / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out


def generate(root: str | os.PathLike, counts: dict[str, int], *, seed: int,
             config: WorldConfig | None = None, workers: int = 1) -> dict[str, dict[str, Any]]:
    """Write every split of ``counts`` (e.g. {"train": 5000, "val": 200, "test": 200,
    "heldout": 200}) under root, with a progress bar. Splits with a count of 0 are skipped.

    Returns, per split written, its share of text-resolvable rounds
    (:func:`resolvability_share`, also in the split's ``meta.json``)."""
    for split in counts:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    shares: dict[str, dict[str, Any]] = {}
    for split, n in counts.items():
        if n > 0:
            out = write_split(root, split, int(n), seed=seed, config=config, workers=workers,
                              progress=True)
            shares[split] = json.loads((out / "meta.json").read_text())["text_resolvable"]
    return shares


def resolvability_share(records: list[dict[str, Any]], late_round: int = 4) -> dict[str, Any]:
    """How many rounds the questions' text alone answers, over conversation records.

    Returns ``{"rounds", "text_resolvable", "share", "late_rounds", "late_text_resolvable",
    "late_share", "late_round"}``: counts of rounds carrying a ``text_resolvable`` field and of
    those that are text-resolvable, and their share (a fraction in [0, 1], None without
    rounds), overall and over rounds ``>= late_round`` (1-indexed). Rounds without the field
    (records of other sources) are not counted.
    """
    n = tr = n_late = tr_late = 0
    for rec in records:
        for k, rd in enumerate(rec.get("rounds", []), start=1):
            v = rd.get("text_resolvable") if isinstance(rd, dict) else None
            if not isinstance(v, bool):
                continue
            n, tr = n + 1, tr + v
            if k >= late_round:
                n_late, tr_late = n_late + 1, tr_late + v
    return {"rounds": n, "text_resolvable": tr, "share": tr / n if n else None,
            "late_round": late_round, "late_rounds": n_late, "late_text_resolvable": tr_late,
            "late_share": tr_late / n_late if n_late else None}
