"""SceneIndex (the per-scene precomputed checker) answers as language.evaluate does, and the
generator's cheaper draws take from numpy's generator what the calls they replace took."""

from __future__ import annotations

import bisect
import itertools

import numpy as np

from segllm.data.world import World, WorldConfig
from segllm.data.world import language as L
from segllm.data.world.dataset import _choice_p, _normalised
from segllm.data.world.scene_index import SceneIndex


def _state(rng: np.random.Generator):
    return rng.bit_generator.state


def test_draws_equal_numpy_choice() -> None:
    for seed in range(300):
        a, b = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
        a.permutation(5)
        b.permutation(5)
        before = _state(a)
        a.permutation(1)
        a.permutation(0)
        assert _state(a) == before  # permutation(1) draws nothing: heads skip it
        seq = ("left", "right", "top", "bottom")
        assert str(a.choice(seq)) == seq[int(b.integers(len(seq)))]
        w = (3.0, 1.0, 4.0, 12.0, 1.0)[: 1 + seed % 5]
        assert int(a.choice(len(w), p=np.array(w) / np.sum(w))) == _choice_p(b, _normalised(w))
        assert int(a.choice([2, 3], p=[0.7, 0.3])) == (2, 3)[_choice_p(b, (0.7, 0.3))]
        assert _state(a) == _state(b)
    assert bisect.bisect_right([0.5, 1.0], 0.5) == 1


def test_index_answers_as_evaluate() -> None:
    world = World(WorldConfig(), seed=3)
    rels = [r for fam in (L.NO_REF_RELATIONS, L.REF_RELATIONS) for rs in fam.values() for r in rs]
    n = 0
    for i in range(6):
        s = world.sample("train", i)
        objs, m = s.objects, world.margins
        index = SceneIndex(objs, m)
        ids = [o.id for o in objs]
        heads = [L.Head(), L.Head(shape=objs[0].shape), L.Head(colour=objs[-1].colour),
                 L.Head(size="small"), L.Head(texture="solid", shape=objs[1].shape)]
        for rel, head, (a, b) in itertools.product(rels, heads, itertools.permutations(ids[:5], 2)):
            for direction, rank in (("left", 2), ("bottom", 1)):
                q = L.Query("x", rel, head, (1, 2), direction=direction, rank=rank,
                            attr="colour" if rel == "bigger" else None, part="roof", colour="red")
                targets = [a, b]
                assert index.resolve(q, targets) == L.resolve(q, objs, targets, m)
                assert index.is_unique(q, targets) == L.is_unique(q, objs, targets, m)
                n += 1
        assert index.text_resolvable(s.queries, s.targets) == L.text_resolvable(s.queries, objs, s.targets, m)
        for k, q in enumerate(s.queries):
            assert index.needs_memory(q, s.targets[:k]) == L.needs_memory(q, objs, s.targets[:k], m)
    assert n > 1000


def test_reach_holds_every_answer_any_head_gives() -> None:
    # the generator skips the head search of a candidate outside reach(): that is exact only if
    # no head, of any attributes, makes a question of the relation denote an object outside it
    world = World(WorldConfig(), seed=5)
    rels = [r for rs in L.REF_RELATIONS.values() for r in rs if r not in ("part_name", "part_colour", "part_extreme", "whole")]
    narrowed = answered = 0
    for i in range(8):
        s = world.sample("train", i)
        index = SceneIndex(s.objects, world.margins)
        values = set(index.values)
        heads = {tuple(v if keep else None for v, keep in zip(vals, mask))
                 for vals in values for mask in itertools.product((False, True), repeat=4)}
        for rel, refs, (direction, rank, attr) in itertools.product(
                rels, itertools.permutations(range(min(4, len(s.objects))), 2),
                (("left", 2, None), ("top", 1, "colour"), ("right", 3, "shape"))):
            memo, answer = index.answers(rel, refs, direction, rank, attr)
            reach = index.reach(rel, refs, direction, rank, attr)
            got = {u for hk in heads if (u := answer(hk)) is not None}
            answered += len(got)
            if reach is not None:
                assert got <= reach, (rel, refs, got - reach)
                narrowed += len(reach) < len(s.objects)
        index.release()
    assert narrowed > 100 and answered > 1000, (narrowed, answered)
    # the relations that compare along the whole image are not narrowed
    index = SceneIndex(s.objects, world.margins)
    index.answers("extreme", (), "left", None, None)
    assert index.reach("extreme", (), "left", None, None) is None
