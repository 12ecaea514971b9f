"""scripts/relation_breakdown.py: log rows joined with the world's relations, counted per relation."""

from __future__ import annotations

import pytest

from segllm.data.world import World, WorldConfig
from tests.helpers import load_script

relation_breakdown = load_script("relation_breakdown")


def test_rows_are_counted_under_their_rounds_relation():
    world = World(WorldConfig(), seed=0)
    relations = {i: [q.relation for q in world.sample("test", i).queries] for i in range(4)}
    rows, want = {}, {}
    for i, rels in relations.items():
        rows[i] = []
        for n, rel in enumerate(rels, start=1):
            good = (i + n) % 2 == 0  # every other round grounded, IoU 0.8, else IoU 0.1
            inter, union = (8, 10) if good else (1, 10)
            rows[i].append((n, inter, union, inter / union, good, good, "family", True))
            w = want.setdefault(rel, [0, 0, 0, 0])
            w[0] += 1
            w[1] += good
            w[2] += inter
            w[3] += union
    got = relation_breakdown.breakdown(rows, relations.__getitem__)
    assert set(got) == set(want)
    for rel, (rounds, grounded, inter, union) in want.items():
        a = got[rel]["all"]
        assert (a["rounds"], a["grounded"]) == (rounds, grounded)
        assert a["p50"] == round(100 * grounded / rounds, 1)
        assert a["ciou"] == pytest.approx(100 * inter / union, abs=0.05)
    firsts = [rels[0] for rels in relations.values()]
    assert sum(v["round 1"]["rounds"] for v in got.values() if "round 1" in v) == len(firsts)
    assert {r for r, v in got.items() if "round 1" in v} == set(firsts)


def test_a_round_the_world_does_not_have_is_named():
    with pytest.raises(ValueError, match="round 3, but the world has 2 rounds"):
        relation_breakdown.breakdown({5: [(3, 1, 2, 0.5, True, True, "f", True)]}, lambda i: ["extreme", "pick"])
