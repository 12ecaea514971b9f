"""The multi-round conversation generator, on miniature RefCOCO, PACO and COCO data built here."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segllm.cli import main
from segllm.conversation import parse_refs
from segllm.data.generate import GenerateError, generate_from_coco
from segllm.data.records import ConversationFolder
from segllm.data.released.convert import ReleasedConversations

H, W = 72, 120
NAMES = {1: "dog", 2: "cat", 3: "ball"}
OUTPUTS = ("annotations.json", "conversations.jsonl", "released.json", "meta.json")
POSITIONAL = re.compile(r"the (?P<head>.+?) (?:to the )?(?P<rel>left of|right of|above|below) instance (?P<k>\d+)")


# ------------------------------------------------------------------------------ builders


def rect_poly(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def rect_mask(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def save_image(path, h=H, w=W, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def scene_objects(rng):
    """Non-overlapping rectangles in a 3 x 4 grid of cells, each a random category."""
    cells = rng.choice(12, size=int(rng.integers(4, 8)), replace=False)
    out = []
    for c in sorted(cells):
        row, col = divmod(int(c), 4)
        x0, y0 = col * 30 + int(rng.integers(1, 6)), row * 24 + int(rng.integers(1, 5))
        out.append((int(rng.integers(1, 4)), x0, y0, x0 + int(rng.integers(12, 22)), y0 + int(rng.integers(10, 16))))
    return out


@pytest.fixture
def coco_data(tmp_path):
    """A COCO instances file over 8 good images (polygon and RLE masks, a crowd, a tiny object) and 4 bad ones."""
    images_root = tmp_path / "images"
    rng = np.random.default_rng(123)
    images, anns = [], []
    ann_id = 100
    for i in range(1, 9):
        name = f"train/img{i:03d}.png"
        save_image(images_root / name, seed=i)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        for j, (cat, x0, y0, x1, y1) in enumerate(scene_objects(rng)):
            ann_id += 1
            seg = rect_poly(x0, y0, x1, y1) if j % 2 == 0 else rle(rect_mask(x0, y0, x1, y1))
            if j % 2 == 0:
                seg = [seg]
            anns.append({"id": ann_id, "image_id": i, "category_id": cat, "segmentation": seg, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))})
        # a tiny object (never a target) in the bottom-right corner
        ann_id += 1
        anns.append({"id": ann_id, "image_id": i, "category_id": 3, "segmentation": rle(rect_mask(117, 70, 119, 72)),
                     "iscrowd": 0, "bbox": [117, 70, 2, 2], "area": 4.0})
    # image 1 also has a crowd annotation (uncompressed RLE, as COCO writes crowds)
    crowd_seg = {"size": [H, W], "counts": [int(v) for v in _uncompressed_counts(rect_mask(0, 0, 3, 3))]}
    assert mask_utils.decode(mask_utils.frPyObjects(crowd_seg, H, W)).sum() == 9
    anns.append({"id": 999, "image_id": 1, "category_id": 1, "segmentation": crowd_seg, "iscrowd": 1,
                 "bbox": [0, 0, 3, 3], "area": 9.0})
    # bad images: missing file, unreadable file, unknown category, wrong size
    for i, problem in ((20, "missing"), (21, "corrupt"), (22, "category"), (23, "size")):
        name = f"train/img{i:03d}.png"
        if problem == "corrupt":
            (images_root / name).write_bytes(b"this is not a PNG")
        elif problem == "size":
            save_image(images_root / name, h=H + 1, seed=i)
        elif problem == "category":
            save_image(images_root / name, seed=i)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        for k, (x0, x1) in enumerate(((5, 30), (60, 90))):
            cat = 77 if (problem == "category" and k == 0) else 1 + k
            anns.append({"id": 1000 + 10 * i + k, "image_id": i, "category_id": cat, "iscrowd": 0,
                         "segmentation": [rect_poly(x0, 10, x1, 40)], "bbox": [x0, 10, x1 - x0, 30], "area": 750.0})
    anns.append({"id": 5000, "category_id": 1, "segmentation": []})  # no image_id: skipped and counted
    anns.append({"id": 5001, "image_id": 404, "category_id": 1, "segmentation": []})  # an image not listed
    data = {"images": images, "annotations": anns,
            "categories": [{"id": k, "name": v, "supercategory": "thing"} for k, v in NAMES.items()]}
    path = tmp_path / "refcoco" / "instances.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path, images_root, data


def _uncompressed_counts(mask):
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


@pytest.fixture
def refs_file(coco_data):
    """A REFER refs pickle: a few refs per good image (val for images 1-6, train for 7-8)."""
    path, _, data = coco_data
    refs, sent_id = [], 0
    for a in data["annotations"]:
        i = a.get("image_id")
        if not isinstance(i, int) or i > 8 or a["iscrowd"] or a["area"] < 100 or a["id"] % 2:
            continue
        sentences = []
        for text in (f"{NAMES[a['category_id']]} number {a['id']}", f"that {NAMES[a['category_id']]} there"):
            sent_id += 1
            sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
        refs.append({"ref_id": len(refs) + 1, "ann_id": a["id"], "image_id": i, "split": "val" if i <= 6 else "train",
                     "category_id": a["category_id"], "sent_ids": [s["sent_id"] for s in sentences],
                     "file_name": f"COCO_{a['id']}.jpg", "sentences": sentences})
    refs.append({"ref_id": 900, "ann_id": 424242, "image_id": 1, "split": "val", "category_id": 1, "sent_ids": [],
                 "file_name": "x.jpg", "sentences": [{"sent": "ghost"}]})  # its annotation does not exist
    out = path.parent / "refs(unc).p"
    with open(out, "wb") as f:
        pickle.dump(refs, f)
    return out


@pytest.fixture
def paco_data(tmp_path):
    """A PACO-LVIS style file: mugs and knives with parts (obj_ann_id names the object)."""
    images_root = tmp_path / "coco"
    images, anns = [], []
    next_id = 1
    for i in range(1, 5):
        name = f"train2017/{i:012d}.jpg"
        save_image(images_root / name, seed=40 + i)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        for j, (cat, x0) in enumerate(((1, 4), (2, 44), (1, 84))[: 2 + i % 2]):
            obj = next_id
            next_id += 1
            anns.append({"id": obj, "image_id": i, "category_id": cat, "obj_ann_id": obj, "iscrowd": 0,
                         "segmentation": [rect_poly(x0, 10 + 4 * j, x0 + 30, 60)], "bbox": [x0, 10, 30, 50]})
            parts = ((2000, x0, x0 + 10), (2001, x0 + 10, x0 + 30)) if cat == 1 else ((2002, x0, x0 + 30),)
            for pcat, px0, px1 in parts:
                seg = rle(rect_mask(px0, 30, px1, 60)) if pcat != 2001 else [rect_poly(px0, 30, px1, 60)]
                anns.append({"id": next_id, "image_id": i, "category_id": pcat, "obj_ann_id": obj, "iscrowd": 0,
                             "segmentation": seg, "bbox": [px0, 30, px1 - px0, 30]})
                next_id += 1
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "mug"}, {"id": 2, "name": "knife"}],
            "part_categories": [{"id": 2000, "name": "mug:handle"}, {"id": 2001, "name": "mug:body"},
                                {"id": 2002, "name": "knife:blade"}]}
    path = tmp_path / "paco.json"
    path.write_text(json.dumps(data))
    return path, images_root, data


def run_refcoco(coco_data, refs_file, out, **kw):
    path, images_root, _ = coco_data
    kw.setdefault("min_area", 50)
    return generate_from_coco(path, images_root, out, refs=refs_file, split="val", kind="refcoco", **kw)


def records(out):
    return [json.loads(line) for line in (out / "conversations.jsonl").read_text().splitlines()]


def boxes_of(data, image_id):
    """Independent geometry: every annotation's mask box (x0, y0, x1, y1 exclusive) and category, via pycocotools."""
    out = {}
    for a in data["annotations"]:
        if a.get("image_id") != image_id:
            continue
        seg = a["segmentation"]
        r = mask_utils.merge(mask_utils.frPyObjects(seg, H, W)) if isinstance(seg, list) else (
            mask_utils.frPyObjects(seg, H, W) if isinstance(seg["counts"], list) else seg)
        m = mask_utils.decode(r).astype(bool)
        ys, xs = np.nonzero(m)
        out[a["id"]] = ((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), NAMES[a["category_id"]])
    return out


def beyond(box, anchor, rel):
    """Box lies entirely on side ``rel`` of the anchor box."""
    return {"left of": box[2] <= anchor[0], "right of": box[0] >= anchor[2],
            "above": box[3] <= anchor[1], "below": box[1] >= anchor[3]}[rel]


# --------------------------------------------------------------------------------- tests


def test_same_seed_same_files_other_seed_other_conversations(coco_data, refs_file, tmp_path):
    a = run_refcoco(coco_data, refs_file, tmp_path / "a", seed=5)
    b = run_refcoco(coco_data, refs_file, tmp_path / "b", seed=5)
    c = run_refcoco(coco_data, refs_file, tmp_path / "c", seed=6)
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "conversations.jsonl").read_text() != (c / "conversations.jsonl").read_text()
    # a conversation depends on its image only: a limit keeps the first conversations unchanged
    d = run_refcoco(coco_data, refs_file, tmp_path / "d", seed=5, limit=2)
    assert records(d) == records(a)[:2]


def test_rounds_are_well_formed_and_unique(coco_data, refs_file, tmp_path):
    _, _, data = coco_data
    refs = pickle.loads(refs_file.read_bytes())
    positional = 0
    for seed in range(4):
        out = run_refcoco(coco_data, refs_file, tmp_path / f"s{seed}", seed=seed, max_rounds=6)
        recs = records(out)
        assert recs and all(r["image_id"] <= 6 for r in recs)  # only val images
        for rec in recs:
            rounds = rec["rounds"]
            assert 2 <= len(rounds) <= 6
            geo = boxes_of(data, rec["image_id"])
            targets = [r["mask_ids"][0] for r in rounds]
            assert len(set(targets)) == len(targets)  # every round names a new object
            for n, r in enumerate(rounds, start=1):
                assert r["answer"].count("<seg>") == 1 and len(r["mask_ids"]) == 1
                assert r["mask_ids"][0] in geo and r["mask_ids"][0] != 999  # present, never the crowd
                assert parse_refs(r["question"])[1] == tuple(r["refs"])  # "instance k" matches refs
                assert all(1 <= k < n for k in r["refs"])
                if n == 1:  # a referring expression of a ref of that very object
                    assert r["relation"] == "sentence"
                    sents = [s["sent"] for x in refs if x["ann_id"] == targets[0] for s in x["sentences"]]
                    assert any(s in r["question"] for s in sents)
                m = POSITIONAL.search(r["question"])
                if m and r["relation"] in ("left_of", "right_of", "above", "below"):
                    positional += 1
                    anchor = geo[targets[int(m["k"]) - 1]][0]
                    group = [i for i, (_, name) in geo.items()
                             if i != targets[int(m["k"]) - 1] and m["head"] in ("object", name)]
                    hits = [i for i in group if beyond(geo[i][0], anchor, m["rel"])]
                    assert hits == [r["mask_ids"][0]], (r["question"], hits)
                if r["relation"] == "category":  # "the dog": the only dog of the image
                    name = geo[r["mask_ids"][0]][1]
                    assert f"the {name}" in r["question"]
                    assert sum(1 for _, nm in geo.values() if nm == name) == 1
                if r["relation"] == "same_category":
                    anchor = targets[r["refs"][0] - 1]
                    same = [i for i, (_, nm) in geo.items() if i != anchor and nm == geo[anchor][1]]
                    assert same == [r["mask_ids"][0]]
    assert positional > 0  # the positional check above did run


def test_folder_and_released_files_load(coco_data, refs_file, tmp_path):
    path, images_root, _ = coco_data
    out = run_refcoco(coco_data, refs_file, tmp_path / "out", seed=1, max_rounds=4)
    folder = ConversationFolder(out)
    convs = [folder[i] for i in range(len(folder))]
    assert len(convs) == len(records(out)) > 0
    # the released file, with annotations laid out as MaskLookup expects for "refcoco"
    ann_root = tmp_path / "annotations_folder"
    (ann_root / "refcoco").mkdir(parents=True)
    shutil.copy(out / "annotations.json", ann_root / "refcoco" / "instances.json")
    released = ReleasedConversations(out / "released.json", images_root, ann_root)
    assert len(released) == len(convs)
    for i, conv in enumerate(convs):
        got = released[i]
        assert [r.question for r in got.rounds] == [r.question for r in conv.rounds]
        assert [r.refs for r in got.rounds] == [r.refs for r in conv.rounds]
        for a, b in zip(got.rounds, conv.rounds):
            assert np.array_equal(a.masks[0], b.masks[0])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["conversations"] == len(convs)
    assert meta["counts"]["rounds"] == sum(len(c.rounds) for c in convs)
    assert meta["released"]["dataset_name"] == "refcoco"


def test_paco_part_rounds_target_parts_of_the_referenced_object(paco_data, tmp_path):
    path, images_root, data = paco_data
    anns = {a["id"]: a for a in data["annotations"]}
    parts = {c["id"]: c["name"].split(":")[1] for c in data["part_categories"]}
    part_rounds = 0
    for seed in range(3):
        out = generate_from_coco(path, images_root, tmp_path / f"p{seed}", kind="paco", seed=seed, min_area=20)
        for rec in records(out):
            targets = [r["mask_ids"][0] for r in rec["rounds"]]
            assert anns[targets[0]]["category_id"] in (1, 2)  # round 1 is an object
            for r in rec["rounds"]:
                if r["relation"] != "part":
                    assert anns[r["mask_ids"][0]]["category_id"] in (1, 2)
                    continue
                part_rounds += 1
                (k,) = r["refs"]
                part = anns[r["mask_ids"][0]]
                assert part["obj_ann_id"] == targets[k - 1]  # a part of the referenced object
                assert f"the {parts[part['category_id']]} of instance {k}" in r["question"]
        folder = ConversationFolder(out)
        assert all(folder[i] is not None for i in range(len(folder)))
    assert part_rounds > 0
    ann_root = tmp_path / "annotations_folder" / "paco_lvis" / "annotations"
    ann_root.mkdir(parents=True)
    shutil.copy(path, ann_root / "paco_lvis_v1_train.json")
    released = ReleasedConversations(tmp_path / "p0" / "released.json", images_root, tmp_path / "annotations_folder")
    assert all(released[i].rounds for i in range(len(released)))


def test_coco_kind_names_categories_only_when_unique_and_stores_masks(coco_data, tmp_path):
    path, images_root, data = coco_data
    out = generate_from_coco(path, images_root, tmp_path / "o", kind="coco", seed=2, min_area=50, copy_images=True)
    recs = records(out)
    assert recs
    for rec in recs:
        assert rec["image"].startswith("images/") and (out / rec["image"]).is_file()
        geo = boxes_of(data, rec["image_id"])
        r1 = rec["rounds"][0]
        assert r1["refs"] == [] and r1["relation"] != "sentence"
        if r1["relation"] == "category":
            name = geo[r1["mask_ids"][0]][1]
            assert sum(1 for _, nm in geo.values() if nm == name) == 1
    folder = ConversationFolder(out)
    assert len([folder[i] for i in range(len(folder))]) == len(recs)
    # the default released dataset stores the masks in this folder, in the description_based_coco layout
    assert (out / "description_based_coco" / "seg_mask_per_instance.json").is_file()
    released = ReleasedConversations(out / "released.json", out / "images", out)
    assert [len(released[i].rounds) for i in range(len(released))] == [len(r["rounds"]) for r in recs]


def test_bad_input_is_skipped_and_counted(coco_data, tmp_path, caplog):
    path, images_root, _ = coco_data
    out = generate_from_coco(path, images_root, tmp_path / "o", kind="coco", seed=0, min_area=50)
    meta = json.loads((out / "meta.json").read_text())
    skipped = meta["skipped"]
    assert skipped["images"]["image file missing"] == 1
    assert skipped["images"]["image unreadable"] == 1
    assert skipped["images"]["image size differs from its entry"] == 1
    assert skipped["images"]["malformed annotation"] == 1
    assert skipped["annotations"] == {"image not listed": 1, "malformed annotation": 1}
    used = {r["image_id"] for r in records(out)}
    assert used and not used & {20, 21, 22, 23}
    assert meta["counts"]["images_used"] == len(used)
    assert any("image 21" in e["where"] for e in meta["skipped_examples"])
    assert "image file missing: 1" in caplog.text  # reported on the terminal too


def test_bad_parameters_raise_clear_errors(coco_data, refs_file, tmp_path):
    path, images_root, _ = coco_data
    with pytest.raises(GenerateError, match="unknown kind 'lvis'"):
        generate_from_coco(path, images_root, tmp_path / "o", kind="lvis")
    with pytest.raises(GenerateError, match="only used with kind 'refcoco'"):
        generate_from_coco(path, images_root, tmp_path / "o", refs=refs_file, kind="coco")
    with pytest.raises(GenerateError, match="needs a refs pickle"):
        generate_from_coco(path, images_root, tmp_path / "o", kind="refcoco")
    with pytest.raises(GenerateError, match="instances file not found"):
        generate_from_coco(tmp_path / "nope.json", images_root, tmp_path / "o")
    with pytest.raises(GenerateError, match="no refs in split 'testB'"):
        generate_from_coco(path, images_root, tmp_path / "o", refs=refs_file, split="testB", kind="refcoco")
    with pytest.raises(GenerateError, match="part_categories"):
        generate_from_coco(path, images_root, tmp_path / "o", kind="paco")
    with pytest.raises(GenerateError, match="cannot hold generated masks"):
        generate_from_coco(path, images_root, tmp_path / "o", dataset_name="ade20k")


def test_cli_generate(coco_data, refs_file, tmp_path, capsys):
    path, images_root, _ = coco_data
    out = tmp_path / "cli"
    rc = main(["generate", str(path), "--images", str(images_root), "--out", str(out), "--refs", str(refs_file),
               "--split", "val", "--kind", "refcoco", "--seed", "3", "--max-rounds", "4", "--limit", "2",
               "--min-area", "50", "--dataset-name", "refcoco"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 2 conversations" in printed and "skipped" in printed
    assert len(records(out)) == 2
    assert main(["generate", str(path), "--images", str(images_root), "--out", str(out), "--refs", str(refs_file),
                 "--kind", "coco"]) == 2
    assert "only used with kind 'refcoco'" in capsys.readouterr().err


def test_generated_refcoco_and_paco_folders_train(coco_data, refs_file, paco_data, tmp_path):
    """The training command accepts MR-RefCOCO-style and MR-PACO-style generated folders."""
    from pathlib import Path

    from segllm.cli import main

    recipe = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.toml"
    rc_out = run_refcoco(coco_data, refs_file, tmp_path / "mr_refcoco")
    paco_path, paco_images, _ = paco_data
    paco_out = generate_from_coco(paco_path, paco_images, tmp_path / "mr_paco", kind="paco", seed=0, min_area=50)
    for folder in (rc_out, paco_out):
        run = tmp_path / f"run_{Path(folder).name}"
        args = ["train", str(recipe), "--set", f'data.train="{folder}"', "--set", f'data.val="{folder}"',
                "--set", "steps=2", "--set", "save_every=2", "--set", f'output_dir="{run}"']
        assert main(args) == 0
        assert (run / "checkpoint-last" / "model" / "model.safetensors").is_file()
