"""Ground-truth masks of the released SegLLM setup, looked up by (dataset name, image, mask id).

Files sit under ``annotations_folder/`` as the released configuration names them
(:data:`DATASETS`); each can be overridden. Every file is read once, when first needed, and kept.

==========================  ========================================  =================================
name                        file (under annotations_folder)           mask id
==========================  ========================================  =================================
refcoco, refcoco+, refcocog  <name>/instances.json (COCO)              COCO annotation id
paco_lvis                   paco_lvis/annotations/paco_lvis_v1_*.json  COCO annotation id
lvis                        lvis/lvis_v1_*.json                        COCO annotation id
reason_seg                  reason_seg/annotations/<split>/<img>.json  none (all "target" polygons)
ade20k                      ade20k/annotations/training/<img>.png      class id (pixel value - 1)
cocostuff                   cocostuff/train2017/<img>.png              class id (pixel value)
visual_genome               visual_genome/vg_masks_train_new.json      key of a compressed RLE
pascal                      pascal/pascal_labels.json                  key of a compressed RLE
description_based_coco      description_based_coco/seg_mask_per_instance.json  key of {segmentation, image_dim}
==========================  ========================================  =================================

A name with an ``_eval`` suffix (or any name with ``is_eval=True``) uses the dataset's evaluation
file where the released configuration has one (reason_seg: val, paco_lvis, lvis, pascal: val).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segllm.data.records import RecordError
from segllm.errors import ConfigError

# name -> (kind, default path, default eval path or None), paths relative to annotations_folder
DATASETS: dict[str, tuple[str, str, str | None]] = {
    "refcoco": ("coco", "refcoco/instances.json", None),
    "refcoco+": ("coco", "refcoco+/instances.json", None),
    "refcocog": ("coco", "refcocog/instances.json", None),
    "paco_lvis": (
        "coco",
        "paco_lvis/annotations/paco_lvis_v1_train.json",
        "paco_lvis/annotations/paco_lvis_v1_val.json",
    ),
    "lvis": ("coco", "lvis/lvis_v1_train.json", "lvis/lvis_v1_val.json"),
    "reason_seg": ("reason_seg", "reason_seg/annotations/train", "reason_seg/annotations/val"),
    "ade20k": ("ade20k", "ade20k/annotations/training", None),
    "cocostuff": ("cocostuff", "cocostuff/train2017", None),
    "visual_genome": ("rle", "visual_genome/vg_masks_train_new.json", None),
    "pascal": ("rle", "pascal/pascal_labels.json", "pascal/pascal_labels_val.json"),
    "description_based_coco": ("described", "description_based_coco/seg_mask_per_instance.json", None),
}
EVAL_SUFFIX = "_eval"
IGNORE = 255  # label of ignored pixels in LISA-style label maps


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        with open(path, encoding="cp1252") as f:  # some ReasonSeg files, as the original handles them
            return json.load(f)


def _quiet_coco(data: dict) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as bool [H, W]."""
    if isinstance(seg, list):
        if not seg:
            raise RecordError("segmentation is an empty polygon list")
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        rle = seg
    else:
        raise RecordError(f"segmentation is neither polygons nor RLE ({type(seg).__name__})")
    return np.ascontiguousarray(mask_utils.decode(rle).astype(bool))


def _polygon_mask(points: Any, height: int, width: int) -> np.ndarray:
    """Outline and fill one polygon (points truncated to ints, as the original's np.int32 cast)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2).astype(np.int32)
    im = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(im)
    xy = [(int(x), int(y)) for x, y in pts]
    if len(xy) >= 3:
        draw.polygon(xy, fill=1, outline=1)
    elif len(xy) == 2:
        draw.line(xy, fill=1, width=1)
    elif len(xy) == 1:
        draw.point(xy, fill=1)
    return np.asarray(im, dtype=np.uint8)


def reason_seg_label_map(anno: dict, height: int, width: int, *, with_ignore: bool) -> np.ndarray:
    """A ReasonSeg label map, uint8 [H, W]: 0 background, 1 target, 255 ignore.

    Polygons labelled "flag" are skipped; the rest are drawn largest first (so a smaller
    polygon inside a larger one wins). ``with_ignore=False`` is SegLLM's rule (ignore polygons
    are not drawn: they stay background); ``with_ignore=True`` is LISA's (drawn as 255).
    """
    shapes = anno.get("shapes")
    if not isinstance(shapes, list):
        raise RecordError("ReasonSeg annotation has no 'shapes' list")
    polys, areas = [], []
    for i, s in enumerate(shapes):
        try:
            label = str(s["label"]).lower()
            pm = _polygon_mask(s["points"], height, width)
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"ReasonSeg shape {i}: malformed ({e})") from None
        if label == "flag":  # deprecated annotations, as in LISA
            continue
        polys.append((label, pm))
        areas.append(int(pm.sum()))
    out = np.zeros((height, width), np.uint8)
    for idx in np.argsort(areas)[::-1]:  # same ordering call as the original (ties included)
        label, pm = polys[int(idx)]
        if "ignore" in label:
            if with_ignore:
                out[pm > 0] = IGNORE
            continue
        out[pm > 0] = 1
    return out


class MaskLookup:
    """Masks of the released datasets: ``lookup(dataset, image, mask_id) -> bool [H, W]``.

    Args:
        annotations_root: the ``annotations_folder``.
        overrides: dataset name (``"lvis"``, ``"reason_seg_eval"``, ...) -> file or folder to
            use instead of the default; relative paths are under ``annotations_root``.
        is_eval: plain names use the evaluation file where there is one (the original's
            ``is_eval`` flag).

    Unknown names, missing files, ids that are not there and empty masks raise
    :class:`RecordError` naming the dataset, file and id.
    """

    def __init__(
        self,
        annotations_root: str | Path,
        *,
        overrides: Mapping[str, str | Path] | None = None,
        is_eval: bool = False,
    ) -> None:
        self.root = Path(annotations_root)
        self.is_eval = is_eval
        self.overrides: dict[str, Path] = {}
        for name, p in (overrides or {}).items():
            base = name[: -len(EVAL_SUFFIX)] if name.endswith(EVAL_SUFFIX) else name
            if base not in DATASETS:
                raise ConfigError(f"override for unknown dataset {name!r}; known: {', '.join(DATASETS)}")
            self.overrides[name] = Path(p)
        self._cache: dict[Path, Any] = {}

    # ----------------------------------------------------------------------- locations

    @staticmethod
    def names() -> list[str]:
        """Every dataset name accepted (each also with an ``_eval`` suffix)."""
        return list(DATASETS)

    def resolve(self, dataset: str) -> tuple[str, str, Path]:
        """(kind, registry name, path) for a dataset name as it appears in a macro."""
        if not isinstance(dataset, str):
            raise RecordError(f"dataset name {dataset!r} is not text")
        base = dataset[: -len(EVAL_SUFFIX)] if dataset.endswith(EVAL_SUFFIX) else dataset
        if base not in DATASETS:
            raise RecordError(f"unknown dataset name {dataset!r}; known: {', '.join(DATASETS)} (or with '_eval')")
        kind, train_path, eval_path = DATASETS[base]
        want_eval = dataset.endswith(EVAL_SUFFIX) or self.is_eval
        key = base + EVAL_SUFFIX
        if want_eval and key in self.overrides:
            return kind, key, self.root / self.overrides[key]
        if want_eval and eval_path is not None:
            return kind, key, self.root / eval_path
        if base in self.overrides:
            return kind, base, self.root / self.overrides[base]
        return kind, base, self.root / train_path

    def path(self, dataset: str) -> Path:
        """The annotation file or folder a dataset name reads."""
        return self.resolve(dataset)[2]

    # ------------------------------------------------------------------------- lookups

    def __call__(
        self, dataset: str, image: str, mask_id: Any, *, image_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        return self.get(dataset, image, mask_id, image_size=image_size)

    def get(self, dataset: str, image: str, mask_id: Any, *, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The mask ``mask_id`` of ``dataset`` for ``image`` (the macro's image path), bool [H, W].

        ``image_size`` (H, W) is needed for reason_seg (polygons are drawn at that size, else
        the JSON's imageHeight/imageWidth are used) and, where given, is checked against the
        mask for the other datasets.
        """
        kind, name, path = self.resolve(dataset)
        what = f"{dataset} mask {mask_id!r}"
        if kind == "coco":
            mask = self._coco_mask(name, path, mask_id)
        elif kind == "reason_seg":
            mask = self.reason_seg_labels(image, image_size=image_size, dataset=dataset, with_ignore=False) == 1
            what = f"{dataset} mask of {image!r}"
        elif kind == "ade20k":
            labels = self._png(name, path, image)
            cid = self._class_id(dataset, mask_id)
            mask = (labels != 0) & (labels.astype(np.int64) - 1 == cid)  # 0 is ignore, then value - 1
        elif kind == "cocostuff":
            labels = self._png(name, path, image)
            cid = self._class_id(dataset, mask_id)
            if cid == IGNORE:
                raise RecordError(f"{dataset}: class id 255 is 'unlabeled', not a class")
            mask = labels.astype(np.int64) == cid
        elif kind == "rle":
            mask = self._rle_mask(name, path, mask_id)
        else:  # described
            mask = self._described_mask(name, path, mask_id)
        if image_size is not None and tuple(mask.shape) != tuple(image_size):
            raise RecordError(f"{what} in {path} is {tuple(mask.shape)}, the image {image!r} is {tuple(image_size)}")
        if not mask.any():
            raise RecordError(f"{what} in {path} is empty (zero area)")
        return np.ascontiguousarray(mask, dtype=bool)

    def reason_seg_labels(
        self,
        image: str,
        *,
        image_size: tuple[int, int] | None = None,
        dataset: str = "reason_seg",
        with_ignore: bool = True,
    ) -> np.ndarray:
        """ReasonSeg label map uint8 [H, W] (0 background, 1 target, 255 ignore where ``with_ignore``).

        ``with_ignore=True`` is LISA's map (pixels to leave out of its metrics); SegLLM's ground
        truth is ``labels == 1`` of the map drawn with ``with_ignore=False``.
        """
        kind, name, folder = self.resolve(dataset)
        if kind != "reason_seg":
            raise RecordError(f"{dataset!r} is not a ReasonSeg dataset name")
        json_path = folder / (Path(_basename(image)).with_suffix(".json").name)
        anno = self._load(json_path, dataset, _read_json, cache=False)
        if image_size is None:
            try:
                image_size = (int(anno["imageHeight"]), int(anno["imageWidth"]))
            except (KeyError, TypeError, ValueError):
                raise RecordError(
                    f"{json_path}: no image size given and the JSON has no imageHeight/imageWidth"
                ) from None
        h, w = image_size
        try:
            return reason_seg_label_map(anno, h, w, with_ignore=with_ignore)
        except RecordError as e:
            raise RecordError(f"{json_path}: {e}") from None

    def reason_seg_ignore(
        self, image: str, *, image_size: tuple[int, int] | None = None, dataset: str = "reason_seg"
    ) -> np.ndarray:
        """LISA's ignore region of a ReasonSeg image (bool [H, W]); SegLLM treats it as background."""
        return self.reason_seg_labels(image, image_size=image_size, dataset=dataset, with_ignore=True) == IGNORE

    # ------------------------------------------------------------------------- helpers

    def _load(self, path: Path, dataset: str, reader, *, cache: bool = True) -> Any:
        if cache and path in self._cache:
            return self._cache[path]
        if not path.is_file():
            raise RecordError(f"{dataset}: annotation file not found: {path}")
        try:
            data = reader(path)
        except (OSError, ValueError) as e:
            raise RecordError(f"{dataset}: cannot read {path}: {e}") from e
        if cache:
            self._cache[path] = data
        return data

    def _coco_mask(self, dataset: str, path: Path, mask_id: Any) -> np.ndarray:
        def read(p: Path):
            data = _read_json(p)
            if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
                raise ValueError("not a COCO-style file (no 'annotations' list)")
            data.setdefault("images", [])
            return _quiet_coco(data)

        coco = self._load(path, dataset, read)
        if isinstance(mask_id, bool) or not isinstance(mask_id, int):
            raise RecordError(f"{dataset}: mask id {mask_id!r} is not a COCO annotation id (an integer)")
        ann = coco.anns.get(mask_id)
        if ann is None:
            raise RecordError(f"{dataset}: annotation id {mask_id} not found in {path}")
        if not ann.get("segmentation"):
            raise RecordError(f"{dataset}: annotation {mask_id} in {path} has no segmentation")
        if ann.get("image_id") not in coco.imgs:
            raise RecordError(f"{dataset}: annotation {mask_id} refers to image {ann.get('image_id')!r}, not in {path}")
        try:
            return coco.annToMask(ann).astype(bool)
        except Exception as e:  # pycocotools raises bare Exceptions / TypeErrors on malformed shapes
            raise RecordError(f"{dataset}: cannot decode annotation {mask_id} in {path}: {e}") from e

    def _png(self, dataset: str, folder: Path, image: str) -> np.ndarray:
        png = folder / Path(_basename(image)).with_suffix(".png").name

        def read(p: Path) -> np.ndarray:
            with Image.open(p) as im:
                return np.array(im)

        arr = self._load(png, dataset, read, cache=False)
        if arr.ndim != 2:
            raise RecordError(f"{dataset}: label image {png} is not single-channel (shape {arr.shape})")
        return arr

    @staticmethod
    def _class_id(dataset: str, mask_id: Any) -> int:
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
            raise RecordError(f"{dataset}: mask id {mask_id!r} is not a class id (a non-negative integer)")
        return mask_id

    def _entry(self, dataset: str, path: Path, mask_id: Any) -> Any:
        def read(p: Path):
            data = _read_json(p)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object of mask id -> mask")
            return data

        data = self._load(path, dataset, read)
        if mask_id is None:
            raise RecordError(f"{dataset}: no mask id given")
        entry = data.get(mask_id) if isinstance(mask_id, str) else None
        if entry is None:
            entry = data.get(str(mask_id))
        if entry is None:
            raise RecordError(f"{dataset}: mask id {mask_id!r} not found in {path}")
        return entry

    def _rle_mask(self, dataset: str, path: Path, mask_id: Any) -> np.ndarray:
        rle = self._entry(dataset, path, mask_id)
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise RecordError(f"{dataset}: mask {mask_id!r} in {path} is not an RLE {{size, counts}}")
        try:
            h, w = (int(v) for v in rle["size"])
            return decode_segmentation(rle, h, w)
        except RecordError as e:
            raise RecordError(f"{dataset}: mask {mask_id!r} in {path}: {e}") from None
        except Exception as e:
            raise RecordError(f"{dataset}: cannot decode mask {mask_id!r} in {path}: {e}") from e

    def _described_mask(self, dataset: str, path: Path, mask_id: Any) -> np.ndarray:
        entry = self._entry(dataset, path, mask_id)
        try:
            seg = entry["segmentation"]
            h, w = (int(v) for v in entry["image_dim"])
        except (KeyError, TypeError, ValueError):
            raise RecordError(
                f"{dataset}: mask {mask_id!r} in {path} needs 'segmentation' and 'image_dim' [h, w]"
            ) from None
        try:
            return decode_segmentation(seg, h, w)
        except RecordError as e:
            raise RecordError(f"{dataset}: mask {mask_id!r} in {path}: {e}") from None
        except Exception as e:
            raise RecordError(f"{dataset}: cannot decode mask {mask_id!r} in {path}: {e}") from e


def _basename(image: str) -> str:
    # the original looks masks up by the macro's own image file name (no path fix-ups)
    name = str(image).replace("\\", "/").rsplit("/", 1)[-1]
    if not name:
        raise RecordError(f"image path {image!r} has no file name")
    return name
