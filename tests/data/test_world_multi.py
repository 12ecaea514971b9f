"""Several-target rounds of the world ("Segment all the red objects."): behind
``WorldConfig.multi_target_prob``, off by default (the default world is pinned by
tests/data/test_world_golden.py)."""

from __future__ import annotations

import numpy as np
import pytest

from segllm.data.records import WorldConversations, round_meta
from segllm.data.world import World, WorldConfig
from segllm.data.world.language import ALL_RELATION, MAX_TARGETS, ONE_OF_RELATION, all_answer, all_targets
from segllm.errors import ConfigError

SEED = 5


@pytest.fixture(scope="module")
def samples() -> list:
    world = World(WorldConfig(multi_target_prob=0.4), seed=SEED)
    return [world.sample("train", i) for i in range(30)]


def _all_rounds(samples):
    for s in samples:
        for n, (rec, q) in enumerate(zip(s.record["rounds"], s.queries), start=1):
            if q.relation == ALL_RELATION:
                yield s, n, rec, q


def test_default_world_has_no_multi_target_rounds() -> None:
    world = World(WorldConfig(), seed=SEED)
    for i in range(20):
        s = world.sample("train", i)
        assert all(len(r["mask_ids"]) == 1 and r["kind"] != "all" for r in s.record["rounds"])
        assert all(q.relation not in (ALL_RELATION, ONE_OF_RELATION) for q in s.queries)


def test_config_checks_the_probability() -> None:
    with pytest.raises(ConfigError, match="multi_target_prob"):
        WorldConfig(multi_target_prob=1.5)
    assert WorldConfig.from_dict(WorldConfig(multi_target_prob=0.2).to_dict()).multi_target_prob == 0.2


def test_targets_are_exactly_the_matching_objects_left_to_right(samples) -> None:
    found = list(_all_rounds(samples))
    assert len(found) >= 10  # the option does produce them
    margin = World(WorldConfig()).margins.pixels
    for s, n, rec, q in found:
        by_id = {o.id: o for o in s.objects}
        matching = {o.id for o in s.objects if o.parent is None and q.head.matches(o)}
        assert set(rec["mask_ids"]) == matching, (s.index, n)
        assert 2 <= len(rec["mask_ids"]) <= MAX_TARGETS
        xs = [by_id[i].cx for i in rec["mask_ids"]]
        assert all(b - a > margin for a, b in zip(xs, xs[1:])), "left to right, clearly apart"
        assert rec["mask_ids"] == all_targets(q, s.objects)
        assert rec["answer"].count("<seg>") == len(rec["mask_ids"])
        assert "left to right" in rec["answer"]
        assert rec["kind"] == "all" and rec["refs"] == [] and rec["text_resolvable"] is True
        # the question names the head ("all the red objects", "every triangle")
        assert (q.head.shape or "object") in rec["question"]
        assert any(w in rec["question"] for w in ("all", "every", "each"))


def test_no_head_asked_twice_and_no_reference_but_one_of(samples) -> None:
    n_one_of = 0
    for s in samples:
        heads = [q.head for q in s.queries if q.relation == ALL_RELATION]
        assert len(heads) == len(set(heads))
        multi = {n for n, q in enumerate(s.queries, start=1) if q.relation == ALL_RELATION}
        for n, (rec, q) in enumerate(zip(s.record["rounds"], s.queries), start=1):
            if q.relation == ONE_OF_RELATION:
                n_one_of += 1
                (k,) = q.refs
                assert k in multi and k < n
                # the rank-th target of round k, counted from the left, as the question says
                assert rec["mask_ids"] == [s.record["rounds"][k - 1]["mask_ids"][q.rank - 1]]
                assert f"instance {k}" in rec["question"]
                assert rec["text_resolvable"] is True
            else:
                assert not set(q.refs) & multi, "only one-of rounds refer to an all round"
    assert n_one_of >= 3


def test_dataset_conversations_carry_one_mask_per_target(samples) -> None:
    data = WorldConversations("train", 30, seed=SEED, config=WorldConfig(multi_target_prob=0.4))
    s, n, rec, _ = next(_all_rounds(samples))
    conv = data[s.index]
    rnd = conv.rounds[n - 1]
    assert rnd.num_seg == len(rnd.masks) == len(rec["mask_ids"])
    for m, mid in zip(rnd.masks, rec["mask_ids"]):
        assert np.array_equal(m, s.masks[mid])
    assert [m.kind for m in round_meta(s.record)][n - 1] == "all"
    assert data.scene(s.index).mask_ids[n - 1] == rec["mask_ids"]


def test_all_answer_wording() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4):
        a = all_answer(n, rng)
        assert a.count("<seg>") == n
    with pytest.raises(ValueError):
        all_answer(0, rng)


def test_same_seed_same_conversations_whatever_was_sampled_before(samples) -> None:
    # the generator keeps caches across scenes (head orders, answers per head): a sample must
    # not depend on them, so a second world sampling in reverse order gives the same samples
    world = World(WorldConfig(multi_target_prob=0.4), seed=SEED)
    again = {i: world.sample("train", i) for i in reversed(range(len(samples)))}
    assert any(q.relation == ONE_OF_RELATION for s in samples for q in s.queries)
    for s in samples:
        t = again[s.index]
        assert t.record == s.record
        assert t.queries == s.queries and t.needs_memory == s.needs_memory
        assert t.text_resolvable == s.text_resolvable and t.alternatives == s.alternatives
        assert np.array_equal(t.image, s.image)
        assert t.masks.keys() == s.masks.keys()
        assert all(np.array_equal(t.masks[k], s.masks[k]) for k in s.masks)
    other = World(WorldConfig(multi_target_prob=0.4), seed=SEED + 1).sample("train", 0)
    assert other.record != samples[0].record  # the seed does matter
