"""Tests of the procedural multi-round reasoning world (segllm.data.world)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segllm.data.world import (
    COLOURS,
    FAMILIES,
    SPLITS,
    World,
    WorldConfig,
    default_margins,
    heldout_pairs,
    is_unique,
    resolve,
    write_split,
)
from segllm.data.world.scene import texture_colour
from segllm.errors import ConfigError

SEED = 123


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(), seed=SEED)


@pytest.fixture(scope="module")
def train_samples(world: World) -> list:
    return [world.sample("train", i) for i in range(120)]


def test_determinism(world: World) -> None:
    a = world.sample("train", 5)
    b = World(WorldConfig(), seed=SEED).sample("train", 5)
    world.sample("val", 9)  # other items in between change nothing
    c = world.sample("train", 5)
    for other in (b, c):
        assert a.image.tobytes() == other.image.tobytes()
        assert a.record == other.record
        assert a.masks.keys() == other.masks.keys()
        assert all(np.array_equal(a.masks[k], other.masks[k]) for k in a.masks)
    d = world.sample("train", 6)
    assert a.image.tobytes() != d.image.tobytes()
    e = World(WorldConfig(), seed=SEED + 1).sample("train", 5)
    assert a.image.tobytes() != e.image.tobytes()
    f = world.sample("val", 5)
    assert a.image.tobytes() != f.image.tobytes()


def test_record_format(train_samples: list) -> None:
    cfg = WorldConfig()
    for s in train_samples[:20]:
        r = s.record
        assert r["id"] == f"train-{s.index:06d}"
        assert r["image"] == f"images/train_{s.index:06d}.png"
        assert r["image_id"] == s.index + 1
        assert s.image.dtype == np.uint8 and s.image.shape == (128, 128, 3)
        for rd in r["rounds"]:
            assert set(rd) == {"question", "refs", "answer", "mask_ids", "relation"}
            assert rd["answer"] in cfg.answers and rd["answer"].count("<seg>") == 1
            assert len(rd["mask_ids"]) == 1
            assert rd["relation"] in FAMILIES
            assert rd["question"][0].isupper() and rd["question"][-1] in ".?"
            for k in rd["refs"]:
                assert f"instance {k}" in rd["question"]


def test_masks_and_refs(train_samples: list) -> None:
    cfg = WorldConfig()
    for s in train_samples:
        rounds = s.record["rounds"]
        assert cfg.min_rounds <= len(rounds) <= cfg.max_rounds
        targets = [rd["mask_ids"][0] for rd in rounds]
        assert len(set(targets)) == len(targets)  # every round a new object
        for i, rd in enumerate(rounds, start=1):
            for mid in rd["mask_ids"]:
                assert mid in s.masks and s.masks[mid].any()
            assert all(1 <= k < i for k in rd["refs"])
        assert all(m.dtype == bool and m.shape == s.image.shape[:2] for m in s.masks.values())


def test_masks_disjoint_and_agree_with_pixels(train_samples: list) -> None:
    for s in train_samples[:60]:
        by_id = {o.id: o for o in s.objects}
        top = [o for o in s.objects if o.parent is None]
        cover = np.zeros(s.image.shape[:2], dtype=np.int32)
        for o in top:
            cover += s.masks[o.id]
        assert cover.max() <= 1  # visible pixels of different objects never overlap
        for o in s.objects:
            m = s.masks[o.id]
            assert m.sum() == o.area
            if o.kind == "composite":
                parts = [s.masks[p] for p in o.parts]
                assert np.array_equal(np.logical_or.reduce(parts), m)
                assert sum(p.sum() for p in parts) == m.sum()  # parts disjoint
                assert all(by_id[p].parent == o.id for p in o.parts)
                continue
            px = s.image[m]
            main = np.all(px == COLOURS[o.colour], axis=1)
            if o.texture == "solid":
                assert main.all(), (s.index, o.id)
            else:
                second = np.all(px == texture_colour(o.colour), axis=1)
                assert (main | second).all() and main.any()


def test_memory_needed(world: World, train_samples: list) -> None:
    later = [(s, i) for s in train_samples for i in range(1, len(s.record["rounds"]))]
    with_refs = sum(bool(s.record["rounds"][i]["refs"]) for s, i in later)
    assert with_refs / len(later) >= 0.8
    memory = sum(s.needs_memory[i] for s, i in later)
    assert memory / len(later) >= 0.6
    families = {rd["relation"] for s in train_samples for rd in s.record["rounds"]}
    assert families == set(FAMILIES)
    # chains: a round referring to a round that itself referred to an earlier one
    chains = 0
    for s in train_samples:
        rds = s.record["rounds"]
        chains += any(rds[k - 1]["refs"] for rd in rds for k in rd["refs"])
    assert chains > 10


def test_uniqueness_rechecked(world: World, train_samples: list) -> None:
    margins = default_margins(world.config.image_size)
    checked = 0
    for s in train_samples[:80]:
        targets = s.targets
        for i, (q, rd) in enumerate(zip(s.queries, s.record["rounds"])):
            assert list(q.refs) == rd["refs"] and q.family == rd["relation"]
            earlier = targets[:i]
            assert resolve(q, s.objects, earlier, margins) == [targets[i]]
            assert is_unique(q, s.objects, earlier, margins) == targets[i]
            checked += 1
    assert checked > 200


def test_heldout_pairs(world: World) -> None:
    pairs = heldout_pairs(0.1)
    assert pairs == world.heldout_pairs and 8 <= len(pairs) <= 12
    for split in ("train", "val", "test"):
        for i in range(100 if split == "train" else 60):
            s = world.sample(split, i)
            for o in s.objects:
                assert (o.colour, o.shape) not in pairs
    for i in range(40):
        s = world.sample("heldout", i)
        held = {o.id for o in s.objects if (o.colour, o.shape) in pairs}
        assert held
        assert any(rd["mask_ids"][0] in held for rd in s.record["rounds"])


def test_config_rounds_and_size() -> None:
    cfg = WorldConfig(image_size=64, min_objects=4, max_objects=6, min_rounds=3, max_rounds=4,
                      answers=["Sure, <seg>."])
    w = World(cfg, seed=1)
    for i in range(15):
        s = w.sample("test", i)
        assert s.image.shape == (64, 64, 3)
        assert 3 <= len(s.record["rounds"]) <= 4
        assert 4 <= sum(o.parent is None for o in s.objects) <= 6
        assert all(rd["answer"] == "Sure, <seg>." for rd in s.record["rounds"])
    with pytest.raises(ConfigError):
        WorldConfig(answers=["no seg here"])
    with pytest.raises(ConfigError):
        WorldConfig(min_rounds=5, max_rounds=2)
    with pytest.raises(ValueError):
        w.sample("nope", 0)


def test_write_split_roundtrip(tmp_path, world: World) -> None:
    from pycocotools.coco import COCO

    n = 6
    out = write_split(tmp_path, "val", n, seed=SEED, config=WorldConfig())
    assert out == tmp_path / "val"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == SEED and meta["split"] == "val" and meta["n"] == n
    assert meta["config"]["image_size"] == 128 and meta["version"]
    coco = COCO(str(out / "annotations.json"))
    raw = json.loads((out / "annotations.json").read_text())
    ann_ids = [a["id"] for a in raw["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    assert {c["name"] for c in raw["categories"]} >= {"circle", "house", "roof"}
    records = [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]
    assert len(records) == n
    from PIL import Image

    for rec in records:
        idx = int(rec["id"].split("-")[1])
        s = world.sample("val", idx)
        img = np.asarray(Image.open(out / rec["image"]).convert("RGB"))
        assert np.array_equal(img, s.image)
        info = coco.loadImgs(rec["image_id"])[0]
        assert info["file_name"] == rec["image"] and info["height"] == 128
        anns = coco.loadAnns(coco.getAnnIds(imgIds=rec["image_id"]))
        assert len(anns) == len(s.masks)
        # local ids map to global ids in order
        local_to_global = dict(zip(sorted(s.masks), sorted(a["id"] for a in anns)))
        for a in anns:
            local = {v: k for k, v in local_to_global.items()}[a["id"]]
            assert np.array_equal(coco.annToMask(a).astype(bool), s.masks[local])
            assert a["area"] == s.masks[local].sum() and a["iscrowd"] == 0
            assert set(a["attributes"]) == {"colour", "shape", "size", "texture"}
            parent = next(o.parent for o in s.objects if o.id == local)
            assert a["parent_id"] == (None if parent is None else local_to_global[parent])
        assert len(rec["rounds"]) == len(s.record["rounds"])
        for rd, rd_mem in zip(rec["rounds"], s.record["rounds"]):
            assert rd["mask_ids"] == [local_to_global[m] for m in rd_mem["mask_ids"]]
            assert all(m in coco.anns for m in rd["mask_ids"])
            assert {k: v for k, v in rd.items() if k != "mask_ids"} == \
                {k: v for k, v in rd_mem.items() if k != "mask_ids"}


def test_splits_known() -> None:
    assert set(SPLITS) == {"train", "val", "test", "heldout"}
