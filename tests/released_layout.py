"""A miniature of the released SegLLM data layout (images, annotations, conversation files),
built in the real formats with hand-made expected masks; the ``released_layout`` fixture of
tests/conftest.py builds it once per module for the data and benchmark tests."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

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


def turn(who, value, ind=None):
    t = {"from": who, "value": value}
    if ind is not None:
        t["ind"] = ind
    return t


def released_records():
    i1 = IMG1
    r0 = {  # refcoco: old and new MASK-DECODE, the 6-field form, ind int and list, [REF:1] as text
        "task": "segmentation",
        "base": None,
        "conv_id": 17,
        "conversations": [
            turn("human", f"[IMAGE256:{i1}] Segment the dog."),
            turn("gpt", f"[MASK-DECODE:{i1}|refcoco|101]."),
            turn(
                "human",
                f"[MASK-ENCODE:{i1}|refcoco|101][BOX-ENCODE:{i1}|refcoco|101] Segment the cup near instance 1 [REF:1].",
                ind=1,
            ),
            turn("gpt", "Sure, [MASK-DECODE:relational:101:103:coco/val2014/COCO_val2014_000000000001.jpg:refcoco]."),
            turn(
                "human",
                f"[MASK-ENCODE:{i1}|refcoco|103][BOX-ENCODE:{i1}|refcoco|103] [MASK-ENCODE:{i1}|refcoco|101]"
                f"[BOX-ENCODE:{i1}|refcoco|101] Segment the one left of both.",
                ind=[2, 1],
            ),
            turn("gpt", f"It is [MASK-DECODE:attribute:103:0:101:{i1}:refcoco]."),
        ],
    }
    r1 = {  # visual genome: string id, path under vg/
        "task": "segmentation",
        "base": None,
        "conversations": [
            turn("human", f"[IMAGE256:{VG}] Segment the man."),
            turn("gpt", f"[MASK-DECODE:none:none:55_1:{VG}:visual_genome]"),
            turn(
                "human",
                f"[MASK-ENCODE:{VG}|visual_genome|55_1][BOX-ENCODE:{VG}|visual_genome|55_1] And the sky?",
                ind=[1],
            ),
            turn("gpt", f"[MASK-DECODE:none:none:2008_000001_3:{VG}:pascal]"),
        ],
    }
    r2 = {  # reason_seg: ids "'" and '' are none
        "task": "segmentation",
        "base": None,
        "conversations": [
            turn("human", f"[IMAGE256:{RS1}] What can hold water?"),
            turn("gpt", f"[MASK-DECODE:none:none:':{RS1}:reason_seg]"),
            turn("human", "Again please."),
            turn("gpt", f"[MASK-DECODE:{RS1}|reason_seg|]"),
        ],
    }
    r3 = {  # ade20k then cocostuff-free; class id 0 is a real class
        "task": "segmentation",
        "base": None,
        "conversations": [
            turn("human", f"[IMAGE256:{ADE}] Segment the wall."),
            turn("gpt", f"[MASK-DECODE:none:none:0:{ADE}:ade20k]"),
            turn(
                "human",
                f"[MASK-ENCODE:{ADE}|ade20k|0][BOX-ENCODE:{ADE}|ade20k|0] Segment the bed below instance 1.",
                ind=[1],
            ),
            turn("gpt", f"[MASK-DECODE:positional:0:4:{ADE}:ade20k]"),
        ],
    }
    i9 = IMG9
    r4 = {  # cocostuff + PACO (object then part) on one image; IMAGE256 names val2017 (fix-up)
        "task": "segmentation",
        "base": None,
        "conversations": [
            turn("human", "[IMAGE256:coco/val2017/000000000009.jpg] Segment the grass."),
            turn("gpt", f"[MASK-DECODE:none:none:17:{i9}:cocostuff]"),
            turn("human", "Segment the mug."),
            turn("gpt", f"[MASK-DECODE:none:none:201:{i9}:paco_lvis]"),
            turn(
                "human",
                f"[MASK-ENCODE:{i9}|paco_lvis|201][BOX-ENCODE:{i9}|paco_lvis|201] Segment the handle of instance 2.",
                ind=[2],
            ),
            turn("gpt", f"[MASK-DECODE:hierarchical:201:202:{i9}:paco_lvis]"),
        ],
    }
    r5 = {  # description_based_coco
        "task": "segmentation",
        "base": None,
        "conversations": [
            turn("human", f"[IMAGE256:{IMG2}] Segment the red thing."),
            turn(
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
                turn("human", f"[IMAGE256:{image}] Segment it."),
                turn("gpt", f"[MASK-DECODE:none:none:{mid}:{image}:{dataset}]"),
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
                turn("human", f"[IMAGE256:{IMG1}] Segment it."),
                turn("gpt", "[MASK-DECODE:a:b:c]"),
            ],
        },
    ]
    return [r0, r1, r2, r3, r4, r5, *bad]


def build_released_layout(root: Path) -> dict[str, Path]:
    """Write the miniature under ``root``; returns its root, images, ann(otations) and convs file."""
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
    _write_json(convs, released_records())
    return {"root": root, "images": images, "ann": ann, "convs": convs}
