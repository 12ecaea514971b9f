"""The released SegLLM data formats, on miniature datasets built in the real layouts."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segllm.conversation import Conversation
from segllm.data.released import (
    DecodeMacro,
    EncodeMacro,
    ImageMacro,
    MaskLookup,
    MaskStore,
    RecordError,
    Refer,
    ReleasedConversations,
    conversation_to_released,
    image_path_candidates,
    load_instances,
    load_refs,
    parse_macro,
    parse_record,
    released_to_conversation,
    split_text,
)
from segllm.errors import ConfigError

IMG1 = "coco/train2014/COCO_train2014_000000000001.jpg"  # 12 x 16
IMG2 = "coco/train2014/COCO_train2014_000000000002.jpg"  # 10 x 14
IMG9 = "coco/train2017/000000000009.jpg"  # 8 x 10 (PACO, LVIS, COCO-Stuff)
RS1 = "reason_seg/images/train/rs1.jpg"  # 20 x 20
ADE = "ade20k/images/training/ADE_train_00000001.jpg"  # 8 x 8
VG = "VG_100K/55.jpg"  # stored under vg/, 9 x 11


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def rect_poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# hand-made expected masks
EXP = {
    ("refcoco", 101): box(12, 16, 3, 7, 2, 8),  # polygon with corners on pixel edges
    ("refcoco", 102): box(10, 14, 1, 9, 5, 12),  # RLE
    ("refcoco", 103): box(12, 16, 0, 3, 10, 16),
    ("paco_lvis", 201): box(8, 10, 1, 7, 1, 9),  # an object
    ("paco_lvis", 202): box(8, 10, 1, 3, 6, 9),  # its part
    ("paco_lvis_eval", 301): box(8, 10, 0, 2, 0, 2),
    ("lvis", 401): box(8, 10, 2, 6, 2, 6),
    ("ade20k", 0): box(8, 8, 0, 4, 0, 8),
    ("ade20k", 4): box(8, 8, 5, 8, 2, 6),
    ("cocostuff", 0): box(8, 10, 0, 8, 0, 3),
    ("cocostuff", 17): box(8, 10, 4, 8, 3, 10),
    ("visual_genome", "55_1"): box(9, 11, 2, 5, 3, 9),
    ("pascal", "2008_000001_3"): box(9, 11, 0, 9, 0, 2),
    ("description_based_coco", "d_1"): box(10, 14, 2, 6, 2, 9),  # polygon
    ("description_based_coco", "d_2"): box(10, 14, 6, 10, 0, 4),  # compressed RLE
    ("description_based_coco", "d-3"): box(10, 14, 0, 2, 12, 14),  # uncompressed RLE
}
# ReasonSeg: target 2..15 square (inclusive, points 2.7 truncate to 2), ignore square 5..8 inside,
# a second target 17..18, a flag elsewhere
RS_TARGET = box(20, 20, 2, 16, 2, 16) | box(20, 20, 17, 19, 17, 19)
RS_IGNORE = box(20, 20, 5, 9, 5, 9)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _save_image(root, rel, h, w, seed):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _coco(images, anns, **extra):
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}], **extra}


def _turn(who, value, ind=None):
    t = {"from": who, "value": value}
    if ind is not None:
        t["ind"] = ind
    return t


def _records():
    i1 = IMG1
    r0 = {  # refcoco: old and new MASK-DECODE, the 6-field form, ind int and list, [REF:1] as text
        "task": "segmentation",
        "base": None,
        "conv_id": 17,
        "conversations": [
            _turn("human", f"[IMAGE256:{i1}] Segment the dog."),
            _turn("gpt", f"[MASK-DECODE:{i1}|refcoco|101]."),
            _turn(
                "human",
                f"[MASK-ENCODE:{i1}|refcoco|101][BOX-ENCODE:{i1}|refcoco|101] Segment the cup near instance 1 [REF:1].",
                ind=1,
            ),
            _turn("gpt", "Sure, [MASK-DECODE:relational:101:103:coco/val2014/COCO_val2014_000000000001.jpg:refcoco]."),
            _turn(
                "human",
                f"[MASK-ENCODE:{i1}|refcoco|103][BOX-ENCODE:{i1}|refcoco|103] [MASK-ENCODE:{i1}|refcoco|101]"
                f"[BOX-ENCODE:{i1}|refcoco|101] Segment the one left of both.",
                ind=[2, 1],
            ),
            _turn("gpt", f"It is [MASK-DECODE:attribute:103:0:101:{i1}:refcoco]."),
        ],
    }
    r1 = {  # visual genome: string id, path under vg/
        "task": "segmentation",
        "base": None,
        "conversations": [
            _turn("human", f"[IMAGE256:{VG}] Segment the man."),
            _turn("gpt", f"[MASK-DECODE:none:none:55_1:{VG}:visual_genome]"),
            _turn(
                "human",
                f"[MASK-ENCODE:{VG}|visual_genome|55_1][BOX-ENCODE:{VG}|visual_genome|55_1] And the sky?",
                ind=[1],
            ),
            _turn("gpt", f"[MASK-DECODE:none:none:2008_000001_3:{VG}:pascal]"),
        ],
    }
    r2 = {  # reason_seg: ids "'" and '' are none
        "task": "segmentation",
        "base": None,
        "conversations": [
            _turn("human", f"[IMAGE256:{RS1}] What can hold water?"),
            _turn("gpt", f"[MASK-DECODE:none:none:':{RS1}:reason_seg]"),
            _turn("human", "Again please."),
            _turn("gpt", f"[MASK-DECODE:{RS1}|reason_seg|]"),
        ],
    }
    r3 = {  # ade20k then cocostuff-free; class id 0 is a real class
        "task": "segmentation",
        "base": None,
        "conversations": [
            _turn("human", f"[IMAGE256:{ADE}] Segment the wall."),
            _turn("gpt", f"[MASK-DECODE:none:none:0:{ADE}:ade20k]"),
            _turn(
                "human",
                f"[MASK-ENCODE:{ADE}|ade20k|0][BOX-ENCODE:{ADE}|ade20k|0] Segment the bed below instance 1.",
                ind=[1],
            ),
            _turn("gpt", f"[MASK-DECODE:positional:0:4:{ADE}:ade20k]"),
        ],
    }
    i9 = IMG9
    r4 = {  # cocostuff + PACO (object then part) on one image; IMAGE256 names val2017 (fix-up)
        "task": "segmentation",
        "base": None,
        "conversations": [
            _turn("human", "[IMAGE256:coco/val2017/000000000009.jpg] Segment the grass."),
            _turn("gpt", f"[MASK-DECODE:none:none:17:{i9}:cocostuff]"),
            _turn("human", "Segment the mug."),
            _turn("gpt", f"[MASK-DECODE:none:none:201:{i9}:paco_lvis]"),
            _turn(
                "human",
                f"[MASK-ENCODE:{i9}|paco_lvis|201][BOX-ENCODE:{i9}|paco_lvis|201] Segment the handle of instance 2.",
                ind=[2],
            ),
            _turn("gpt", f"[MASK-DECODE:hierarchical:201:202:{i9}:paco_lvis]"),
        ],
    }
    r5 = {  # description_based_coco
        "task": "segmentation",
        "base": None,
        "conversations": [
            _turn("human", f"[IMAGE256:{IMG2}] Segment the red thing."),
            _turn(
                "gpt",
                f"[MASK-DECODE:none:none:d_1:{IMG2}:description_based_coco] and [MASK-DECODE:none:none:d_2:{IMG2}:description_based_coco]",
            ),
        ],
    }

    def one_round(dataset, mid, image=IMG1):
        return {
            "task": "segmentation",
            "base": None,
            "conversations": [
                _turn("human", f"[IMAGE256:{image}] Segment it."),
                _turn("gpt", f"[MASK-DECODE:none:none:{mid}:{image}:{dataset}]"),
            ],
        }

    bad = [
        one_round("foo_dataset", 5),  # 6: unknown dataset
        one_round("refcoco", 101, image="coco/train2014/missing.jpg"),  # 7: missing image
        one_round("refcoco", 999),  # 8: id not in annotations
        one_round("refcoco", 104),  # 9: empty mask
        {
            "task": "segmentation",
            "base": None,
            "conversations": [  # 10: malformed macro
                _turn("human", f"[IMAGE256:{IMG1}] Segment it."),
                _turn("gpt", "[MASK-DECODE:a:b:c]"),
            ],
        },
    ]
    return [r0, r1, r2, r3, r4, r5, *bad]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    images, ann = root / "images_folder", root / "annotations_folder"
    for rel, (h, w), seed in [
        (IMG1, (12, 16), 1),
        (IMG2, (10, 14), 2),
        (IMG9, (8, 10), 9),
        (RS1, (20, 20), 3),
        (ADE, (8, 8), 4),
        ("vg/" + VG, (9, 11), 5),
    ]:
        _save_image(images, rel, h, w, seed)

    # refcoco: COCO instances with a polygon and RLE annotations, plus REFER pickles
    coco_imgs = [
        {"id": 1, "file_name": IMG1.rsplit("/", 1)[1], "height": 12, "width": 16},
        {"id": 2, "file_name": IMG2.rsplit("/", 1)[1], "height": 10, "width": 14},
    ]
    coco_anns = [
        {
            "id": 101,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [2, 3, 6, 4],
            "area": 24,
            "segmentation": [rect_poly(2, 3, 8, 7)],
        },
        {
            "id": 102,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [5, 1, 7, 8],
            "area": 56,
            "segmentation": rle(EXP["refcoco", 102]),
        },
        {
            "id": 103,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [10, 0, 6, 3],
            "area": 18,
            "segmentation": rle(EXP["refcoco", 103]),
        },
        {
            "id": 104,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [0, 0, 0, 0],
            "area": 0,
            "segmentation": rle(np.zeros((12, 16), bool)),
        },
    ]
    _write_json(ann / "refcoco" / "instances.json", _coco(coco_imgs, coco_anns))
    refs = [
        {
            "ref_id": 7,
            "ann_id": 101,
            "image_id": 1,
            "split": "train",
            "category_id": 1,
            "sent_ids": [70, 71],
            "file_name": "COCO_train2014_000000000001_7.jpg",
            "sentences": [
                {"tokens": ["left", "dog"], "raw": "Left dog", "sent_id": 70, "sent": "left dog"},
                {"tokens": ["dog"], "raw": "dog", "sent_id": 71, "sent": "dog"},
            ],
        },
        {
            "ref_id": 8,
            "ann_id": 102,
            "image_id": 2,
            "split": "testA",
            "category_id": 1,
            "sent_ids": [80],
            "file_name": "COCO_train2014_000000000002_8.jpg",
            "sentences": [{"tokens": ["man"], "raw": "man", "sent_id": 80, "sent": "man"}],
        },
    ]
    (ann / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "evil.p").write_bytes(pickle.dumps([{"ref_id": 1}, _Evil()]))

    # PACO-LVIS (object + part with obj_ann_id), its val file, and LVIS
    paco_img = [{"id": 9, "file_name": "train2017/000000000009.jpg", "height": 8, "width": 10}]
    paco = _coco(
        paco_img,
        [
            {
                "id": 201,
                "image_id": 9,
                "category_id": 1,
                "bbox": [1, 1, 8, 6],
                "area": 48,
                "obj_ann_id": 201,
                "attribute_ids": [],
                "segmentation": rle(EXP["paco_lvis", 201]),
            },
            {
                "id": 202,
                "image_id": 9,
                "category_id": 2001,
                "bbox": [6, 1, 3, 2],
                "area": 6,
                "obj_ann_id": 201,
                "attribute_ids": [3],
                "segmentation": [rect_poly(6, 1, 9, 3)],
            },
        ],
        part_categories=[{"id": 2001, "name": "mug:handle"}],
        attributes=[],
        attr_type_to_attr_idxs={},
    )
    _write_json(ann / "paco_lvis/annotations/paco_lvis_v1_train.json", paco)
    _write_json(
        ann / "paco_lvis/annotations/paco_lvis_v1_val.json",
        _coco(
            paco_img,
            [
                {
                    "id": 301,
                    "image_id": 9,
                    "category_id": 1,
                    "bbox": [0, 0, 2, 2],
                    "area": 4,
                    "obj_ann_id": 301,
                    "segmentation": [rect_poly(0, 0, 2, 2)],
                }
            ],
        ),
    )
    _write_json(
        ann / "lvis/lvis_v1_train.json",
        _coco(
            [
                {
                    "id": 9,
                    "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
                    "height": 8,
                    "width": 10,
                    "neg_category_ids": [],
                    "not_exhaustive_category_ids": [],
                }
            ],
            [
                {
                    "id": 401,
                    "image_id": 9,
                    "category_id": 1,
                    "bbox": [2, 2, 4, 4],
                    "area": 16,
                    "segmentation": [rect_poly(2, 2, 6, 6)],
                }
            ],
        ),
    )

    # ReasonSeg: one JSON per image, target / ignore / flag polygons (LabelMe layout)
    _write_json(
        ann / "reason_seg/annotations/train/rs1.json",
        {
            "text": ["What can hold water?"],
            "is_sentence": True,
            "shapes": [
                {"label": "flag", "points": [[0, 17], [3, 17], [3, 19], [0, 19]]},
                {"label": "target", "points": [[2.7, 2.2], [15.9, 2.0], [15.5, 15.9], [2.0, 15.0]]},
                {"label": "ignore", "points": [[5, 5], [8, 5], [8, 8], [5, 8]]},
                {"label": "target", "points": [[17, 17], [18, 17], [18, 18], [17, 18]]},
            ],
        },
    )

    # ADE20K: PNG of class ids + 1 (0 = ignore); COCO-Stuff: PNG of class ids (255 unlabeled)
    ade = np.zeros((8, 8), np.uint8)
    ade[0:4] = 1
    ade[5:8, 2:6] = 5
    (ann / "ade20k/annotations/training").mkdir(parents=True)
    Image.fromarray(ade).save(ann / "ade20k/annotations/training/ADE_train_00000001.png")
    stuff = np.full((8, 10), 255, np.uint8)
    stuff[:, 0:3] = 0
    stuff[4:8, 3:10] = 17
    (ann / "cocostuff/train2017").mkdir(parents=True)
    Image.fromarray(stuff).save(ann / "cocostuff/train2017/000000000009.png")

    # Visual Genome / PASCAL: id -> compressed RLE; description_based_coco: id -> {segmentation, image_dim}
    _write_json(ann / "visual_genome/vg_masks_train_new.json", {"55_1": rle(EXP["visual_genome", "55_1"])})
    _write_json(ann / "pascal/pascal_labels.json", {"2008_000001_3": rle(EXP["pascal", "2008_000001_3"])})
    d3 = EXP["description_based_coco", "d-3"]
    flat = d3.flatten(order="F").astype(np.uint8)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    _write_json(
        ann / "description_based_coco/seg_mask_per_instance.json",
        {
            "d_1": {"segmentation": [rect_poly(2, 2, 9, 6)], "image_dim": [10, 14]},
            "d_2": {"segmentation": rle(EXP["description_based_coco", "d_2"]), "image_dim": [10, 14]},
            "d-3": {"segmentation": {"size": [10, 14], "counts": runs}, "image_dim": [10, 14]},
        },
    )

    convs = root / "conversations_folder/all_data_mix_train/mix.json"
    _write_json(convs, _records())
    return {"root": root, "images": images, "ann": ann, "convs": convs}


# ------------------------------------------------------------------------------ macros


def test_parse_every_macro_form():
    assert parse_macro(f"[IMAGE256:{IMG1}]") == ImageMacro(IMG1)
    assert parse_macro("[MASK-ENCODE:a.jpg|refcoco|12]") == EncodeMacro("mask", "a.jpg", "refcoco", 12)
    assert parse_macro("[BOX-ENCODE:a.jpg|visual_genome|55_1]") == EncodeMacro("box", "a.jpg", "visual_genome", "55_1")
    assert parse_macro("[MASK-ENCODE:a.jpg|reason_seg|']").mask_id is None
    old = parse_macro("[MASK-DECODE:a.jpg|refcoco|7]")
    assert (old.form, old.tgt_id, old.ref_id, old.task) == ("old", 7, None, "none")
    new = parse_macro("[MASK-DECODE:relational:12:0034:a.jpg:refcoco]")
    assert (new.form, new.task, new.ref_id, new.tgt_id, new.image, new.dataset) == (
        "new",
        "relational",
        12,
        34,
        "a.jpg",
        "refcoco",
    )
    six = parse_macro("[MASK-DECODE:attribute:12:0:x-9:a.jpg:pascal]")
    assert (six.form, six.ref_id, six.ref_id2, six.tgt_id) == ("new2", 12, None, "x-9")
    for none in ("none", "", "'", "0"):
        assert parse_macro(f"[MASK-DECODE:none:{none}:5:a.jpg:refcoco]").ref_id is None
    assert parse_macro("[MASK-DECODE:none:none:0:a.jpg:ade20k]").tgt_id == 0  # a target id 0 is a class


def test_non_macro_brackets_stay_text_and_round_trip_exactly():
    text = "[MASK-ENCODE:a.jpg|refcoco|3][BOX-ENCODE:a.jpg|refcoco|3] Segment the one near [REF:1] [sic]."
    pieces = split_text(text)
    assert [type(p).__name__ for p in pieces] == ["EncodeMacro", "EncodeMacro", "str"]
    assert pieces[2] == " Segment the one near [REF:1] [sic]."
    rec = _records()[0]
    parsed = parse_record(rec)
    assert parsed.to_record() == rec  # unedited records are written back unchanged
    assert parsed.turns[2].ind == (1,) and parsed.turns[4].ind == (2, 1)
    assert parsed.turns[2].text == "Segment the cup near instance 1 [REF:1]."
    assert parsed.image == ImageMacro(IMG1)
    # canonical formats read back to the same macros
    for m in (
        EncodeMacro("mask", "a.jpg", "refcoco", None),
        DecodeMacro("a.jpg", "vg", "5_1", ref_id=3, task="relational"),
        DecodeMacro("a.jpg", "vg", 4, ref_id=None, ref_id2=None, form="new2"),
        DecodeMacro("a.jpg", "refcoco", 4, form="old"),
    ):
        assert parse_macro(m.format()) == m


@pytest.mark.parametrize(
    "bracket, reason",
    [
        ("[MASK-DECODE:a:b:c]", "3 ':'-separated fields"),
        ("[MASK-DECODE:a.jpg|refcoco]", "needs image|dataset|tgt_id"),
        ("[MASK-DECODE:nothing]", "neither ':' nor '|'"),
        ("[MASK-ENCODE:a.jpg|refcoco|1|2]", "3 fields"),
        ("[BOX-ENCODE:a.jpg||1]", "dataset name is empty"),
        ("[IMAGE256]", "malformed IMAGE256"),
        ("[IMAGE256:]", "empty payload"),
        ("[see MASK-ENCODE:a|b|1]", "malformed MASK-ENCODE"),
        ("[MASK-ENCODE:a.jpg|refcoco|abc]", "'abc' is not a number"),
    ],
)
def test_malformed_macros_name_macro_and_reason(bracket, reason):
    with pytest.raises(RecordError) as e:
        split_text(f"Segment {bracket} it")
    assert bracket in str(e.value) and reason in str(e.value)


def test_path_fixups():
    assert (
        image_path_candidates("coco/val2014/COCO_val2014_1.jpg", decode_rules=True)[0]
        == "coco/train2014/COCO_train2014_1.jpg"
    )
    assert image_path_candidates("new_x/VG_100K/1.jpg", decode_rules=True)[0] == "vg/x/VG_100K/1.jpg"
    c = image_path_candidates("coco/val2017/9.jpg")
    assert c[0] == "coco/val2017/9.jpg" and "coco/train2017/9.jpg" in c


# ------------------------------------------------------------------------------- masks


def test_every_mask_lookup_matches_hand_made_masks(setup):
    lookup = MaskLookup(setup["ann"])
    images = {
        "refcoco": IMG1,
        "paco_lvis": IMG9,
        "paco_lvis_eval": IMG9,
        "lvis": IMG9,
        "ade20k": ADE,
        "cocostuff": IMG9,
        "visual_genome": VG,
        "pascal": VG,
        "description_based_coco": IMG2,
    }
    for (name, mid), want in EXP.items():
        got = lookup(name, images.get(name, IMG2), mid, image_size=want.shape)
        assert got.dtype == bool and np.array_equal(got, want), (name, mid)
    # ReasonSeg: SegLLM drops ignore polygons to background (the target polygon keeps them); LISA marks them 255
    rs = lookup.get("reason_seg", RS1, None, image_size=(20, 20))
    assert np.array_equal(rs, RS_TARGET)
    assert np.array_equal(lookup.reason_seg_ignore(RS1, image_size=(20, 20)), RS_IGNORE)
    labels = lookup.reason_seg_labels(RS1, image_size=(20, 20))
    assert np.array_equal(labels == 1, RS_TARGET & ~RS_IGNORE)
    # files are read once and cached; is_eval switches to the evaluation file
    assert len(lookup._cache) == 7
    assert MaskLookup(setup["ann"], is_eval=True).path("paco_lvis").name == "paco_lvis_v1_val.json"
    assert MaskLookup(setup["ann"], is_eval=True).path("refcoco").name == "instances.json"


def test_lookup_errors_name_the_problem(setup):
    lookup = MaskLookup(setup["ann"])
    cases = [
        (("foo", IMG1, 1), "unknown dataset name 'foo'"),
        (("refcoco", IMG1, 999), "annotation id 999 not found"),
        (("refcoco", IMG1, 104), "is empty"),
        (("refcoco", IMG1, "5_1"), "not a COCO annotation id"),
        (("visual_genome", VG, "nope_1"), "'nope_1' not found"),
        (("ade20k", "ade20k/images/training/missing.jpg", 1), "annotation file not found"),
        (("cocostuff", IMG9, 255), "unlabeled"),
        (("refcocog", IMG1, 1), "annotation file not found"),
        (("reason_seg_eval", RS1, None), "annotation file not found"),
    ]
    for args, msg in cases:
        with pytest.raises(RecordError, match=msg):
            lookup(*args)
    with pytest.raises(RecordError, match="is .12, 16., the image"):
        lookup("refcoco", IMG1, 101, image_size=(5, 5))
    with pytest.raises(ConfigError, match="unknown dataset 'bogus'"):
        MaskLookup(setup["ann"], overrides={"bogus": "x.json"})
    over = MaskLookup(setup["ann"], overrides={"reason_seg_eval": "reason_seg/annotations/train"})
    assert over("reason_seg_eval", RS1, "", image_size=(20, 20)).sum() == RS_TARGET.sum()


# ------------------------------------------------------------------------------- refer


def test_refer_pickles_and_instances(setup):
    refer = Refer(setup["ann"] / "refcoco")
    assert refer.split_by == "unc" and len(refer) == 2 and refer.splits == ["testA", "train"]
    (train,) = refer.refs("train")
    assert refer.sentences(train) == ["left dog", "dog"] and refer.ann_id(train) == 101
    assert refer.ann_id(8) == 102 and refer.image_file(8) == IMG2.rsplit("/", 1)[1]
    assert np.array_equal(refer.mask(7), EXP["refcoco", 101])
    with pytest.raises(RecordError, match="no split 'val'"):
        refer.refs("val")
    assert len(load_instances(setup["ann"] / "refcoco/instances.json")["annotations"]) == 4


def test_malicious_pickle_is_refused(setup, capfd):
    with pytest.raises(RecordError, match=r"refused to load global (posix|os|nt)\.system"):
        load_refs(setup["root"] / "evil.p")
    assert "pwned" not in capfd.readouterr().out


# ------------------------------------------------------------------------ conversions


def _same(a: Conversation, b: Conversation):
    assert np.array_equal(a.image, b.image)
    assert [r.question for r in a.rounds] == [r.question for r in b.rounds]
    assert [r.answer for r in a.rounds] == [r.answer for r in b.rounds]
    assert [r.refs for r in a.rounds] == [r.refs for r in b.rounds]
    for ra, rb in zip(a.rounds, b.rounds):
        assert len(ra.masks) == len(rb.masks) and all(np.array_equal(x, y) for x, y in zip(ra.masks, rb.masks))


def test_released_to_conversation(setup):
    ds = ReleasedConversations(setup["convs"], setup["images"], setup["ann"])
    assert len(ds) == 11
    c0 = ds[0]
    assert c0.size == (12, 16)
    assert [r.question for r in c0.rounds] == [
        "Segment the dog.",
        "Segment the cup near instance 1 [REF:1].",
        "Segment the one left of both.",
    ]
    assert [r.answer for r in c0.rounds] == ["<seg>.", "Sure, <seg>.", "It is <seg>."]
    assert [r.refs for r in c0.rounds] == [(), (1,), (1, 2)]
    want = [EXP["refcoco", 101], EXP["refcoco", 103], EXP["refcoco", 101]]
    assert all(np.array_equal(r.masks[0], m) for r, m in zip(c0.rounds, want))
    c1 = ds[1]  # VG image found under vg/; pascal mask on the same image
    assert c1.size == (9, 11) and c1.rounds[1].refs == (1,)
    assert np.array_equal(c1.rounds[1].masks[0], EXP["pascal", "2008_000001_3"])
    c2 = ds[2]
    assert all(np.array_equal(r.masks[0], RS_TARGET) for r in c2.rounds) and c2.rounds[1].question == "Again please."
    c3 = ds[3]
    assert np.array_equal(c3.rounds[0].masks[0], EXP["ade20k", 0]) and c3.rounds[1].refs == (1,)
    c4 = ds[4]
    assert c4.size == (8, 10) and [r.refs for r in c4.rounds] == [(), (), (2,)]
    assert np.array_equal(c4.rounds[2].masks[0], EXP["paco_lvis", 202])
    c5 = ds[5]
    assert c5.rounds[0].answer == "<seg> and <seg>" and len(c5.rounds[0].masks) == 2
    assert len(ReleasedConversations(setup["convs"], setup["images"], setup["ann"], max_rounds=1)[0].rounds) == 1


def test_round_trip(setup, tmp_path):
    ds = ReleasedConversations(setup["convs"], setup["images"], setup["ann"])
    store = MaskStore()
    for i in range(6):
        conv, info = ds.convert(i)
        # masks already in their datasets: ids written back as they were
        if len({d.removesuffix("_eval") for r in info.dataset for d in r}) == 1:
            rec = conversation_to_released(conv, image=info.image, dataset=info.dataset[0][0], mask_ids=info.mask_ids)
            _same(conv, released_to_conversation(rec, images_root=setup["images"], lookup=ds.lookup))
        # any conversation: masks into a store the original reads as description_based_coco
        rec = conversation_to_released(conv, image=info.image, store=store, conv_id=i)
        assert rec["task"] == "segmentation" and "base" in rec
        assert parse_record(rec).to_record() == rec
        path = store.save(tmp_path / "store.json")
        lookup = MaskLookup(setup["ann"], overrides={"description_based_coco": path})
        conv2 = released_to_conversation(rec, images_root=setup["images"], lookup=lookup)
        _same(conv, conv2)
        rec2 = conversation_to_released(
            conv2,
            image=info.image,
            conv_id=i,
            mask_ids=[
                [f"conv_{i}_r{n}_m{k + 1}" for k in range(len(r.masks))] for n, r in enumerate(conv2.rounds, start=1)
            ],
        )
        assert rec2 == rec
    relational = conversation_to_released(ds[0], image=IMG1, store=MaskStore(), id_prefix="x")["conversations"]
    assert relational[2]["ind"] == [1]
    assert relational[3]["value"] == f"Sure, [MASK-DECODE:relational:x_r1_m1:x_r2_m1:{IMG1}:description_based_coco]."
    with pytest.raises(RecordError, match="either mask_ids .* or a MaskStore"):
        conversation_to_released(ds[0], image=IMG1)


def test_bad_records_raise_and_skip_with_the_record_named(setup):
    ds = ReleasedConversations(setup["convs"], setup["images"], setup["ann"])
    expected = {
        6: "unknown dataset name 'foo_dataset'",
        7: "image 'coco/train2014/missing.jpg' not found",
        8: "annotation id 999 not found",
        9: "is empty",
        10: "[MASK-DECODE:a:b:c]",
    }
    for i, msg in expected.items():
        with pytest.raises(RecordError) as e:
            ds[i]
        assert f"mix.json[{i}]" in str(e.value) and msg in str(e.value)
        assert ds.get(i) is None
    assert len(ds.skipped) == len(expected)
    where, reason = ds.skipped.items[0]
    assert where.endswith("mix.json[6]") and "foo_dataset" in reason
    assert ds.where(0).endswith("mix.json[0] (conv_id 17)")


def test_structural_errors():
    lookup = MaskLookup("/nonexistent")
    base = _records()[0]
    cases = [
        ({**base, "task": "any2any"}, "only 'segmentation'"),
        ({**base, "conversations": base["conversations"][:3]}, "no gpt answer"),
        ({**base, "conversations": [base["conversations"][1], base["conversations"][0]]}, "must alternate"),
        (
            {
                **base,
                "conversations": [
                    _turn("human", f"[IMAGE256:{IMG1}] a"),
                    _turn("gpt", "[MASK-DECODE:x.jpg|refcoco|1]"),
                    _turn("human", "[MASK-ENCODE:x.jpg|refcoco|1] b", ind=[3]),
                    _turn("gpt", "ok"),
                ],
            },
            "not an earlier round",
        ),
    ]
    for rec, msg in cases:
        with pytest.raises(RecordError, match=msg):
            released_to_conversation(rec, images_root="/nonexistent", lookup=lookup)


def test_encode_ties_and_image_checks(setup, tmp_path):
    lookup = MaskLookup(setup["ann"])

    def conv(turn3, gpt2=f"[MASK-DECODE:none:none:101:{IMG1}:refcoco]"):
        rec = {
            "task": "segmentation",
            "base": None,
            "conversations": [_turn("human", f"[IMAGE256:{IMG1}] a"), _turn("gpt", gpt2), turn3, _turn("gpt", "ok")],
        }
        return released_to_conversation(rec, images_root=setup["images"], lookup=lookup)

    # an encoded id no earlier round decoded: the turn's ind decides, else it is an error
    assert conv(_turn("human", f"[MASK-ENCODE:{IMG1}|refcoco|103] b", ind=1)).rounds[1].refs == (1,)
    with pytest.raises(RecordError, match="mask 103 is no earlier round's MASK-DECODE target"):
        conv(_turn("human", f"[MASK-ENCODE:{IMG1}|refcoco|103] b"))
    # an encode without ind ties by its id alone
    assert conv(_turn("human", f"[BOX-ENCODE:{IMG1}|refcoco|101] b")).rounds[1].refs == (1,)
    with pytest.raises(RecordError, match="differs from the conversation's"):
        conv(_turn("human", "b"), gpt2=f"[MASK-DECODE:none:none:101:{IMG2}:refcoco]")
    with pytest.raises(RecordError, match="only MASK-DECODE macros may appear in a gpt turn"):
        conv(_turn("human", "b"), gpt2=f"[IMAGE256:{IMG1}]")
    # the visual_genome / pascal layout of a MaskStore
    ds = ReleasedConversations(setup["convs"], setup["images"], setup["ann"])
    c1, info = ds.convert(1)
    store = MaskStore(layout="rle")
    rec = conversation_to_released(c1, image=info.image, dataset="pascal", store=store, id_prefix="p")
    path = store.save(tmp_path / "pascal.json")
    _same(
        c1,
        released_to_conversation(
            rec, images_root=setup["images"], lookup=MaskLookup(setup["ann"], overrides={"pascal": path})
        ),
    )
