"""The checker of :mod:`segllm.data.world.language`, precomputed once per scene.

:func:`segllm.data.world.language.evaluate` is the readable specification of what a query
denotes; building a conversation asks it about a hundred thousand questions per thousand
scenes, most of them several times and most over the same few objects. :class:`SceneIndex`
answers the same questions from tables built once per scene: sets of objects are bit masks
(bit i: ``objects[i]``), one per attribute value, per reference (the reference, its parts and
its whole) and per (reference, direction) cone; geometric keys (coordinates, distances from a
reference) are computed with the very expressions of ``evaluate`` and kept; every answer is
memoised by (relation, parameters, references, head). Its answers equal ``evaluate``'s
(``tests/data/test_world_index.py`` checks it query by query, and
``tests/data/test_world_golden.py`` pins the conversations generated with it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from segllm.data.world.draws import Draws
from segllm.data.world.language import _DIR_REL, ATTRS, Margins, Query, _related, resolvability
from segllm.data.world.scene import MIXED, PARTS, WorldObject

_PART_RELATIONS = ("part_name", "part_extreme", "part_colour")
_DIR_OF = {v: k for k, v in _DIR_REL.items()}
_PARTS = frozenset(PARTS)
_ATTR_INDEX = {a: i for i, a in enumerate(ATTRS)}
# (attribute values, attributes a head may name) -> per number of attributes, the heads in
# itertools.combinations order
_HEAD_TABLES: dict[tuple, list[tuple[HeadKey, ...]]] = {}
# (attribute values, attributes a head may name, most attributes) -> head_levels' answer
_LEVELS: dict[tuple, tuple[tuple[HeadKey, ...], ...]] = {}

HeadKey = tuple  # (size, colour, texture, shape), None where the head does not say


def _bits(mask: int) -> list[int]:
    """Positions of the set bits of mask, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _reaching(fn: Callable[[int], tuple[int, int]], definite: int) -> Callable[[int], tuple[int, int]]:
    """``fn`` (a relation's candidates -> (possible, definite)) marked with ``reach``: a mask
    that holds every definite answer it gives for any candidates (see :meth:`SceneIndex.reach`)."""
    fn.reach = definite
    return fn


class SceneIndex:
    """Answers :func:`~segllm.data.world.language.is_unique`, ``resolve``, ``needs_memory`` and
    ``text_resolvable`` for one scene (``objects``) and margins, as those functions do."""

    def __init__(self, objects: list[WorldObject], margins: Margins) -> None:
        self.objects = list(objects)
        self.margins = margins
        self.ids = [o.id for o in self.objects]
        self.pos = {o.id: i for i, o in enumerate(self.objects)}  # like evaluate's by_id: last wins
        top = part = 0
        self.attr_masks: dict[str, dict[str, int]] = {a: {} for a in ATTRS}
        for i, o in enumerate(self.objects):
            bit = 1 << i
            if o.parent is None:
                top |= bit
            else:
                part |= bit
            for a in ATTRS:
                d = self.attr_masks[a]
                v = getattr(o, a)
                d[v] = d.get(v, 0) | bit
        self.top_mask, self.part_mask = top, part
        self.all_mask = (1 << len(self.objects)) - 1
        self.values = [(o.size, o.colour, o.texture, o.shape) for o in self.objects]
        # the keys of language._coord, per direction
        cx = [o.cx for o in self.objects]
        cy = [o.cy for o in self.objects]
        self.coord = {"left": cx, "right": [-v for v in cx], "top": cy, "bottom": [-v for v in cy]}
        self.area = [o.area for o in self.objects]
        self._cx = np.array(cx, dtype=np.float64)
        self._cy = np.array(cy, dtype=np.float64)
        self._related: dict[int, int] = {}
        self._cones: dict[tuple[int, str], tuple[int, int]] = {}
        self._dist: dict[int, list[float]] = {}
        self._head_masks: dict[HeadKey, int] = {}
        self._n_matching: dict[HeadKey, int] = {}
        self._denoters: dict[tuple, Callable[[HeadKey], tuple[int, int]]] = {}
        self._answers: dict[tuple, dict[HeadKey, int | None]] = {}
        self._reach: dict[tuple, frozenset[int] | None] = {}  # answers()' keys -> reach()
        self._fns: dict[tuple, Callable[[int], tuple[int, int]]] = {}  # _relation's, by its arguments
        self._levels_at: dict[tuple, list] = {}
        # needs_memory's single-reference loop: each relation's functions by alternative
        # position, the objects related to each position (as _banned((p,))), and the positions
        # an id resolves to (evaluate's by_id: an id given twice is its last object)
        self._fn_rows: dict[tuple, list] = {}
        self._related_at: list[int | None] = [None] * len(self.objects)
        self._alt_positions = [p for p, oid in enumerate(self.ids) if self.pos[oid] == p]

    def release(self) -> None:
        """Drop the memoised answers (their functions refer back to the index: a reference
        cycle), so that the index is freed as soon as it is no longer used."""
        self._denoters.clear()
        self._answers.clear()
        self._reach.clear()
        self._fns.clear()
        self._fn_rows.clear()

    # -- tables ---------------------------------------------------------------------------------

    def head_mask(self, hk: HeadKey) -> int:
        """Objects the head matches (Head.matches), over every object."""
        m = self._head_masks.get(hk)
        if m is None:
            m = self.all_mask
            for a, v in zip(ATTRS, hk):
                if v is not None:
                    m &= self.attr_masks[a].get(v, 0)
            self._head_masks[hk] = m
        return m

    def n_matching(self, hk: HeadKey) -> int:
        """How many objects a head phrase alone matches (parts for a part's name, else top-level)."""
        n = self._n_matching.get(hk)
        if n is None:
            group = self.part_mask if hk[3] in _PARTS else self.top_mask
            n = self._n_matching[hk] = (self.head_mask(hk) & group).bit_count()
        return n

    def _banned(self, refs: tuple[int, ...]) -> int:
        banned = 0
        for r in refs:
            m = self._related.get(r)
            if m is None:
                ids = _related(self.objects[r])
                m = 0
                for i, oid in enumerate(self.ids):
                    if oid in ids:
                        m |= 1 << i
                self._related[r] = m
            banned |= m
        return banned

    def _cone(self, r: int, direction: str) -> tuple[int, int]:
        """(possibly, definitely) towards direction of objects[r]: language._direction_sets."""
        key = (r, direction)
        got = self._cones.get(key)
        if got is None:
            m = self.margins.pixels
            key_of = self.coord[direction]
            ref_key = key_of[r]
            # the coordinate across the direction (cy for left/right, else cx), as plain floats
            side = self.coord["top"] if direction in ("left", "right") else self.coord["left"]
            ref_side = side[r]
            possible = definite = 0
            bit = 1
            for k, a in zip(key_of, side):
                d = (ref_key - k) - abs(a - ref_side)
                if d > -m:
                    possible |= bit
                if d > m:
                    definite |= bit
                bit <<= 1
            got = self._cones[key] = (possible, definite)
        return got

    def _distances(self, r: int) -> list[float]:
        got = self._dist.get(r)
        if got is None:
            ref = self.objects[r]
            # evaluate's float(np.hypot(o.cx - ref.cx, o.cy - ref.cy)), for every o at once
            got = self._dist[r] = np.hypot(self._cx - ref.cx, self._cy - ref.cy).tolist()
        return got

    # -- the checker ----------------------------------------------------------------------------

    def _extreme(self, mask: int, keys: list[float]) -> tuple[int, int]:
        if not mask:
            return 0, 0
        items = _bits(mask)
        best = min(keys[i] for i in items)
        lim = best + self.margins.pixels
        possible = 0
        for i in items:
            if keys[i] <= lim:
                possible |= 1 << i
        return possible, (possible if possible & (possible - 1) == 0 else 0)

    def _ordinal(self, mask: int, keys: list[float], rank: int) -> tuple[int, int]:
        items = _bits(mask)
        if len(items) < rank:
            return 0, 0
        order = sorted(items, key=keys.__getitem__)
        m = self.margins.pixels
        clusters = [[order[0]]]
        for a, b in zip(order, order[1:]):
            if keys[b] - keys[a] <= m:
                clusters[-1].append(b)
            else:
                clusters.append([b])
        pos = 0
        for c in clusters:
            if pos + len(c) >= rank:
                out = 0
                for i in c:
                    out |= 1 << i
                return out, (out if len(c) == 1 else 0)
            pos += len(c)
        return 0, 0

    def _by_area(self, mask: int, largest: bool) -> tuple[int, int]:
        if not mask:
            return 0, 0
        items = _bits(mask)
        area, ratio = self.area, self.margins.ratio
        possible = 0
        if largest:
            best = max(area[i] for i in items)
            for i in items:
                if area[i] * ratio >= best:
                    possible |= 1 << i
        else:
            best = min(area[i] for i in items)
            for i in items:
                if area[i] <= best * ratio:
                    possible |= 1 << i
        return possible, (possible if possible & (possible - 1) == 0 else 0)

    def denote(self, rel: str, refs: tuple[int, ...], hk: HeadKey, direction: str | None = None,
               rank: int | None = None, attr: str | None = None, part: str | None = None,
               colour: str | None = None) -> tuple[int, int]:
        """(possible, definite) denotations as bit masks, for references given as positions in
        ``objects`` (see :func:`~segllm.data.world.language.evaluate`)."""
        return self.denoter(rel, refs, direction, rank, attr, part, colour)(hk)

    def denoter(self, rel: str, refs: tuple[int, ...], direction: str | None = None,
                rank: int | None = None, attr: str | None = None, part: str | None = None,
                colour: str | None = None) -> Callable[[HeadKey], tuple[int, int]]:
        """The function head key -> :meth:`denote` of one relation with its parameters and
        references; it remembers its answers by the set of objects the head leaves."""
        key = (rel, refs, direction, rank, attr, part, colour)
        f = self._denoters.get(key)
        if f is None:
            f = self._denoters[key] = self._make_denoter(rel, refs, direction, rank, attr, part, colour)
        return f

    def answers(self, rel: str, refs: tuple[int, ...], direction: str | None = None,
                rank: int | None = None, attr: str | None = None, part: str | None = None,
                colour: str | None = None) -> tuple[dict[HeadKey, int | None], Callable]:
        """(memo, answer) of one relation with its parameters and references: ``answer(hk)``
        is the id of the one object the question with head hk denotes uniquely, or None
        (``unique_id(*denote(hk))``), and memo holds the answers given so far by head key (a
        caller may look there first)."""
        key = (rel, refs, direction, rank, attr, part, colour)
        got = self._answers.get(key)
        if got is None:
            memo: dict[HeadKey, int | None] = {}
            ids = self.ids
            if rel in _PART_RELATIONS or rel == "whole":
                denote = self.denoter(rel, refs, direction, rank, attr, part, colour)

                def answer(hk: HeadKey) -> int | None:
                    possible, definite = denote(hk)
                    u = None
                    if possible and possible == definite and possible & (possible - 1) == 0:
                        u = ids[possible.bit_length() - 1]
                    memo[hk] = u
                    return u
            else:
                # the denoter's steps inline, remembered by the candidates the head leaves
                fn = self._relation(rel, refs, direction if direction in self.coord else "bottom",
                                    rank, attr)
                reach = getattr(fn, "reach", None)
                if reach is not None:
                    self._reach[key] = frozenset(ids[i] for i in _bits(reach & self.all_mask))
                keep = ~self._banned(refs)
                top, parts = self.top_mask & keep, self.part_mask & keep
                head_masks, head_mask = self._head_masks, self.head_mask
                by_candidates: dict[int, int | None] = {}

                def answer(hk: HeadKey) -> int | None:
                    hm = head_masks.get(hk)
                    if hm is None:
                        hm = head_mask(hk)
                    c = hm & (parts if hk[3] in _PARTS else top)
                    u = by_candidates.get(c, 0)  # 0: not yet (ids start at 1)
                    if u == 0:
                        possible, definite = fn(c)
                        u = None
                        if possible and possible == definite and possible & (possible - 1) == 0:
                            u = ids[possible.bit_length() - 1]
                        by_candidates[c] = u
                    memo[hk] = u
                    return u
            got = self._answers[key] = (memo, answer)
        return got

    def reach(self, rel: str, refs: tuple[int, ...], direction: str | None = None,
              rank: int | None = None, attr: str | None = None) -> frozenset[int] | None:
        """After :meth:`answers` with the same arguments (no part or colour): the ids of every
        object some head could make the question's one answer, or None where that is not
        narrowed down. Known for the relations whose answer always lies in a set fixed by the
        references ("left of instance 2", "the same colour as instance 1", "bigger than instance
        3", "the second ... right of instance 2": the set's definite part, whatever the head):
        a candidate outside it needs no head tried."""
        return self._reach.get((rel, refs, direction, rank, attr, None, None))

    def _answer_once(self, rel: str, refs: tuple[int, ...], direction, rank, attr, part, colour,
                     hk: HeadKey) -> int | None:
        """``answers(...)[1](hk)`` without keeping tables for these references (a question asked
        once: needs_memory's alternatives)."""
        got = self._answers.get((rel, refs, direction, rank, attr, part, colour))
        if got is not None:
            memo, answer = got
            u = memo.get(hk, 0)
            return answer(hk) if u == 0 else u
        if rel in _PART_RELATIONS or rel == "whole":
            return self.answers(rel, refs, direction, rank, attr, part, colour)[1](hk)
        fn = self._relation(rel, refs, direction if direction in self.coord else "bottom", rank, attr)
        group = self.part_mask if hk[3] in _PARTS else self.top_mask
        possible, definite = fn(self.head_mask(hk) & group & ~self._banned(refs))
        if possible and possible == definite and possible & (possible - 1) == 0:
            return self.ids[possible.bit_length() - 1]
        return None

    def _make_denoter(self, rel, refs, direction, rank, attr, part, colour):
        objects = self.objects
        if direction not in self.coord:
            direction = "bottom"  # language._coord: any other direction is "bottom"
        if rel in _PART_RELATIONS:
            parts = [self.pos[i] for i in objects[refs[0]].parts]
            if rel == "part_extreme":
                pm = 0
                for i in parts:
                    pm |= 1 << i
                res = self._extreme(pm, self.coord[direction])
            else:
                out = 0
                for i in parts:
                    o = objects[i]
                    if (o.shape == part) if rel == "part_name" else (o.colour == colour):
                        out |= 1 << i
                res = (out, out)
            return lambda hk: res
        if rel == "whole":
            parent = objects[refs[0]].parent
            if parent is None:
                return lambda hk: (0, 0)
            bit = 1 << self.pos[parent]
            head_mask = self.head_mask

            def whole(hk: HeadKey) -> tuple[int, int]:
                out = head_mask(hk) & bit
                return out, out
            return whole

        fn = self._relation(rel, refs, direction, rank, attr)
        keep = ~self._banned(refs)
        top, parts = self.top_mask & keep, self.part_mask & keep
        head_masks, head_mask = self._head_masks, self.head_mask
        memo: dict[int, tuple[int, int]] = {}

        def denote(hk: HeadKey) -> tuple[int, int]:
            hm = head_masks.get(hk)
            if hm is None:
                hm = head_mask(hk)
            c = hm & (parts if hk[3] in _PARTS else top)
            got = memo.get(c)
            if got is None:
                got = memo[c] = fn(c)
            return got
        return denote

    def _relation(self, rel, refs, direction, rank, attr) -> Callable[[int], tuple[int, int]]:
        """The function candidates (a mask) -> (possible, definite) of a relation on top-level
        objects or parts (evaluate after its head has chosen the candidates)."""
        if rel in ("pick", "unique"):
            return lambda c: (c, c)
        if rel == "extreme":
            keys = self.coord[direction]
            return lambda c: self._extreme(c, keys)
        if rel == "ordinal":
            keys = self.coord[direction]
            return lambda c: self._ordinal(c, keys, rank)
        if rel in ("largest", "smallest"):
            largest = rel == "largest"
            return lambda c: self._by_area(c, largest)

        r = refs[0]  # IndexError without a reference, as in evaluate
        ref = self.objects[r]
        if rel.startswith("same_") or rel.startswith("different_"):
            a = rel.split("_", 1)[1]
            v = getattr(ref, a)
            if v == MIXED:
                return _reaching(lambda c: (0, 0), 0)
            m = self.attr_masks[a].get(v, 0)
            if not rel.startswith("same_"):
                m = ~m
            return _reaching(lambda c: (c & m, c & m), m)
        if rel == "other":
            return lambda c: (c, c)
        if rel == "colour_and_shape":
            a, b = (self.objects[i] for i in refs)
            if a.colour == MIXED or a.id == b.id:
                return _reaching(lambda c: (0, 0), 0)
            m = self.attr_masks["colour"].get(a.colour, 0) & self.attr_masks["shape"].get(b.shape, 0)
            return _reaching(lambda c: (c & m, c & m), m)
        if rel in _DIR_OF:
            p, d = self._cone(r, _DIR_OF[rel])
            return _reaching(lambda c: (c & p, c & d), d)
        if rel in ("nearest", "farthest"):
            dist = self._distances(r)
            keys = dist if rel == "nearest" else [-1.0 * v for v in dist]
            return lambda c: self._extreme(c, keys)
        if rel in ("ordinal_from", "largest_dir", "smallest_dir"):
            p, d = self._cone(r, direction)
            keys = [-v for v in self.coord[direction]]

            def towards(c: int) -> tuple[int, int]:
                possible, definite = c & p, c & d
                if possible.bit_count() != definite.bit_count():
                    return possible, 0
                if rel == "ordinal_from":
                    return self._ordinal(definite, keys, rank)
                return self._by_area(definite, rel == "largest_dir")
            return _reaching(towards, d)  # its answers lie among the definite ones
        if rel in ("bigger", "smaller"):
            same = self.all_mask
            if attr is not None:
                v = getattr(ref, attr)
                if v == MIXED:
                    return _reaching(lambda c: (0, 0), 0)
                same = self.attr_masks[attr].get(v, 0)
            ratio, ra = self.margins.ratio, ref.area
            possible = definite = 0
            for i, area in enumerate(self.area):
                if rel == "bigger":
                    if area * ratio > ra:
                        possible |= 1 << i
                    if area > ra * ratio:
                        definite |= 1 << i
                else:
                    if area < ra * ratio:
                        possible |= 1 << i
                    if area * ratio < ra:
                        definite |= 1 << i
            possible &= same
            definite &= same
            return _reaching(lambda c: (c & possible, c & definite), definite)
        raise ValueError(f"unknown relation {rel!r}")

    def head_levels(self, pos: int, allowed: tuple[str, ...],
                    max_attrs: int = 4) -> tuple[tuple[HeadKey, ...], ...]:
        """The head keys :func:`~segllm.data.world.language.heads_for` builds for
        ``objects[pos]``, per number of attributes (0, 1, ... up to max_attrs), each level in
        ``itertools.combinations`` order (heads_for permutes each level of two or more)."""
        vals = self.values[pos]
        key = (vals, allowed, max_attrs)
        got = _LEVELS.get(key)
        if got is None:
            avail = tuple(a for a in allowed if vals[_ATTR_INDEX[a]] != MIXED)
            tkey = (vals, avail)
            table = _HEAD_TABLES.get(tkey)
            if table is None:
                table = _HEAD_TABLES[tkey] = [
                    tuple(tuple(v if a in combo else None for a, v in zip(ATTRS, vals))
                          for combo in itertools.combinations(avail, n))
                    for n in range(len(avail) + 1)]
            got = _LEVELS[key] = tuple(table[: min(max_attrs, len(avail)) + 1])
        return got

    def levels_at(self, allowed: tuple[str, ...], max_attrs: int = 4) -> list:
        """This scene's memo of :meth:`head_levels` for one (allowed, max_attrs): a list by
        object position, None where not asked yet (the caller fills it). The options of one
        relation ask it for up to eight objects; a list lookup is cheaper than hashing
        (attribute values, allowed, max_attrs) each time."""
        key = (allowed, max_attrs)
        got = self._levels_at.get(key)
        if got is None:
            got = self._levels_at[key] = [None] * len(self.objects)
        return got

    def heads(self, pos: int, allowed: tuple[str, ...], rng: Draws,
              max_attrs: int = 4) -> list[tuple[int, HeadKey]]:
        """(number of attributes, head key) of the heads
        :func:`~segllm.data.world.language.heads_for` builds for ``objects[pos]``, in its order
        and with the same draws from rng."""
        out: list[tuple[int, HeadKey]] = []
        for n, hks in enumerate(self.head_levels(pos, allowed, max_attrs)):
            if len(hks) == 1:
                out.append((n, hks[0]))  # rng.permutation(1) draws nothing
            else:
                out.extend([(n, hks[i]) for i in rng.perm(len(hks))])
        return out

    def ref_positions(self, q: Query, targets: list) -> tuple[int, ...] | None:
        """Positions of the query's referenced objects, or None where evaluate finds none."""
        out = []
        n = len(targets)
        for k in q.refs:
            if k < 1 or k > n:
                return None
            p = self.pos.get(targets[k - 1])
            if p is None:
                return None
            out.append(p)
        return tuple(out)

    def masks(self, q: Query, targets: list) -> tuple[int, int]:
        """(possible, definite) of a query as bit masks: evaluate(q, objects, targets, margins)."""
        refs = self.ref_positions(q, targets)
        if refs is None:
            return 0, 0
        h = q.head
        return self.denoter(q.relation, refs, q.direction, q.rank, q.attr, q.part,
                            q.colour)((h.size, h.colour, h.texture, h.shape))

    def unique_id(self, possible: int, definite: int) -> int | None:
        if possible and possible == definite and possible & (possible - 1) == 0:
            return self.ids[possible.bit_length() - 1]
        return None

    def is_unique(self, q: Query, targets: list) -> int | None:
        return self.unique_id(*self.masks(q, targets))

    def resolve(self, q: Query, targets: list) -> list[int]:
        possible, _ = self.masks(q, targets)
        return sorted(self.ids[i] for i in _bits(possible))

    def needs_memory(self, q: Query, targets: list) -> bool:
        if not q.refs:
            return False
        refs = self.ref_positions(q, targets)
        if refs is not None and len(set(q.refs)) == len(q.refs):
            # every reference valid and distinct: each alternative only moves one of them
            h = q.head
            hk = (h.size, h.colour, h.texture, h.shape)
            memo, answer_of = self.answers(q.relation, refs, q.direction, q.rank, q.attr,
                                           q.part, q.colour)
            answer = memo[hk] if hk in memo else answer_of(hk)
            rel, pos = q.relation, self.pos
            general = not (rel in _PART_RELATIONS or rel == "whole")
            if general:  # the denoter's steps, with the relation's function per references kept
                direction = q.direction if q.direction in self.coord else "bottom"
                heads = self.head_mask(hk) & (self.part_mask if hk[3] in _PARTS else self.top_mask)
                fns, ids = self._fns, self.ids
            if general and len(refs) == 1:
                return self._moves_single(rel, refs[0], direction, q.rank, q.attr, heads, answer)
            for j in range(len(refs)):
                actual = refs[j]
                for p, oid in enumerate(self.ids):
                    if p == actual or pos[oid] != p:
                        continue  # the reference itself; an id given twice (evaluate: last wins)
                    alt = refs[:j] + (p,) + refs[j + 1:]
                    if general:
                        key = (rel, alt, direction, q.rank, q.attr)
                        fn = fns.get(key)
                        if fn is None:
                            fn = fns[key] = self._relation(rel, alt, direction, q.rank, q.attr)
                        possible, definite = fn(heads & ~self._banned(alt))
                        got = None
                        if possible and possible == definite and possible & (possible - 1) == 0:
                            got = ids[possible.bit_length() - 1]
                    else:
                        got = self._answer_once(rel, alt, q.direction, q.rank, q.attr, q.part,
                                                q.colour, hk)
                    if got is not None and got != answer:
                        return True
            return False
        answer = self.is_unique(q, targets)
        for k in q.refs:
            actual = targets[k - 1]
            for oid in self.ids:
                if oid == actual:
                    continue
                alt = list(targets)
                alt[k - 1] = oid
                got = self.is_unique(q, alt)
                if got is not None and got != answer:
                    return True
        return False

    def _moves_single(self, rel: str, actual: int, direction: str, rank, attr, heads: int,
                      answer: int | None) -> bool:
        """needs_memory's loop for a relation of the general kind with one reference (most
        asked): whether another object as the reference makes the question denote another
        object uniquely. The relation's function per alternative is kept in a list by position
        (the same functions as the loop over alternatives keys by (relation, references, ...),
        without building and hashing a key per alternative)."""
        row_key = (rel, direction, rank, attr)
        row = self._fn_rows.get(row_key)
        if row is None:
            row = self._fn_rows[row_key] = [None] * len(self.ids)
        related = self._related_at
        ids = self.ids
        for p in self._alt_positions:
            if p == actual:
                continue  # the reference itself
            fn = row[p]
            if fn is None:
                fn = row[p] = self._relation(rel, (p,), direction, rank, attr)
            banned = related[p]
            if banned is None:
                banned = related[p] = self._banned((p,))
            possible, definite = fn(heads & ~banned)
            if possible and possible == definite and possible & (possible - 1) == 0:
                got = ids[possible.bit_length() - 1]
                if got != answer:
                    return True
        return False

    def text_resolvable(self, queries: list[Query], targets: list, *,
                        max_scenarios: int = 4096, rounds: list[int] | None = None) -> list[bool]:
        """As :func:`segllm.data.world.language.text_resolvable` (with ``rounds``, only those
        0-indexed rounds' answers: :func:`~segllm.data.world.language.resolvability`)."""
        return resolvability(queries, targets, self.resolve, self.is_unique,
                             max_scenarios=max_scenarios, rounds=rounds)
