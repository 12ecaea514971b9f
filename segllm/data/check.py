"""Is a data root ready for a run? What a benchmark or a training mix needs from the released layout
(conversation files, image sets, annotation files), which of it is there, how many records use
each, and where to download what is missing. No model is loaded: ``segllm data check`` prints it,
and ``segllm eval --benchmark`` and ``segllm train`` run the same check and stop before loading a
model when something is missing.

A need is *missing* when its file or folder is absent; single images missing from a present image
set, records of unknown datasets or unreadable records are reported as notes (those records are
skipped at run time, as before), since a whole run should not stop for a few of them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segllm.data.records import RecordError
from segllm.data.released.macros import DecodeMacro, EncodeMacro, ImageMacro, image_path_candidates, parse_record
from segllm.data.released.masks import EVAL_SUFFIX, MaskLookup
from segllm.errors import SegLLMError

__all__ = ["MIXES", "SOURCES", "DataCheck", "DataMissingError", "Need", "ReleasedMix", "check_conversation_files",
           "check_mix", "check_released_mix", "format_checks", "image_need", "path_need", "source_of"]

_HF_DATASET = "the Hugging Face dataset Marlo-Z/SegLLM_dataset (git lfs clone)"
# Where each thing the released setup reads comes from (the original's DATASET.md, in our words),
# keyed by image set (under images_folder/) or dataset name (under annotations_folder/).
SOURCES: dict[str, str] = {
    "conversations": f"{_HF_DATASET}: move its conversations_folder/ into the data root",
    "coco/train2014": "COCO train2014 images: http://images.cocodataset.org/zips/train2014.zip, unzipped to images_folder/coco/train2014/",
    "coco/train2017": "COCO train2017 images: http://images.cocodataset.org/zips/train2017.zip, unzipped to images_folder/coco/train2017/",
    "coco": "COCO images: http://images.cocodataset.org/zips/ (train2014.zip, train2017.zip), unzipped under images_folder/coco/",
    "reason_seg": "ReasonSeg (LISA's release, linked from https://github.com/dvlab-research/LISA#dataset; the original "
                  "points to a Google Drive folder): images to images_folder/reason_seg/images/<split>/, their .json "
                  "files to annotations_folder/reason_seg/annotations/<split>/",
    "vg": "Visual Genome images: https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip and images2.zip, "
          "unzipped to images_folder/vg/ (VG_100K/, VG_100K_2/)",
    "pascal": "PASCAL VOC 2010 trainval: http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar, "
              "extracted to images_folder/pascal/",
    "ade20k": "ADE20K (ADEChallengeData2016.zip, http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip; "
              "access terms at https://ade20k.csail.mit.edu/request_data/): images/training to "
              "images_folder/ade20k/images/training/, annotations/training to annotations_folder/ade20k/annotations/training/",
    "refcoco": "RefCOCO (REFER's refcoco.zip, archived at https://web.archive.org/web/20220413011718/"
               "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco.zip), unzipped to annotations_folder/refcoco/",
    "refcoco+": "RefCOCO+ (REFER's refcoco+.zip, archived at https://web.archive.org/web/20220413011656/"
                "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco+.zip), unzipped to annotations_folder/refcoco+/",
    "refcocog": "RefCOCOg (REFER's refcocog.zip, archived at https://web.archive.org/web/20220413012904/"
                "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip), unzipped to annotations_folder/refcocog/",
    "lvis": "LVIS v1 annotations (https://www.lvisdataset.org/dataset) to annotations_folder/lvis/",
    "paco_lvis": "PACO-LVIS v1 annotations (https://github.com/facebookresearch/paco/tree/main#dataset-setup) to "
                 "annotations_folder/paco_lvis/annotations/",
    "pascal_part": "PASCAL-Part labels (https://github.com/pmeletis/panoptic_parts); the original reads them as "
                   "annotations_folder/pascal/pascal_labels.json (id -> RLE), which may come with " + _HF_DATASET,
    "cocostuff": "COCO-Stuff label PNGs (the original's DATASET.md names no source; COCO-Stuff's own release is "
                 "https://github.com/nightrome/cocostuff) to annotations_folder/cocostuff/train2017/",
    "visual_genome": f"made by SegLLM's authors: {_HF_DATASET}, its annotations_folder/visual_genome/",
    "description_based_coco": f"made by SegLLM's authors: {_HF_DATASET}, its annotations_folder/description_based_coco/",
}


def source_of(what: str, name: str) -> str:
    """Where to get a need: ``what`` is "conversations", "images" (``name`` an image set such as
    ``coco/train2014``) or "annotations" (``name`` a dataset name, ``_eval`` allowed)."""
    if what == "conversations":
        return SOURCES["conversations"]
    if what == "annotations":
        base = name[: -len(EVAL_SUFFIX)] if name.endswith(EVAL_SUFFIX) else name
        return SOURCES.get("pascal_part" if base == "pascal" else base, "")
    parts = name.split("/")
    for n in (2, 1):  # the longest known prefix: coco/train2014 before coco
        key = "/".join(parts[:n])
        if key in SOURCES:
            return SOURCES[key]
    return ""


@dataclass
class Need:
    """One thing a run reads from the data root.

    Attributes:
        what: "conversations" (a conversation file), "images" (an image set: a folder under the
            images root) or "annotations" (a dataset's annotation file or folder).
        name: how it is shown: a file name, an image set (``coco/train2014``) or a dataset name.
        path: where it was looked for.
        present: the file or folder exists.
        records: conversation records in the file, or records that use this image set or dataset
            (None where not counted).
        detail: more about it (e.g. refs and sentences of a split, images not found in a set).
        source: where to download it from.
    """

    what: str
    name: str
    path: Path
    present: bool
    records: int | None = None
    detail: str = ""
    source: str = ""


@dataclass
class DataCheck:
    """What one benchmark or training mix needs, and whether the data root has it."""

    name: str
    kind: str  # "benchmark" or "mix"
    needs: list[Need] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return all(n.present for n in self.needs)

    @property
    def missing(self) -> list[Need]:
        return [n for n in self.needs if not n.present]

    def add(self, need: Need) -> None:
        """Add a need, once per path (records add up)."""
        for n in self.needs:
            if n.what == need.what and n.path == need.path:
                if need.records is not None:
                    n.records = (n.records or 0) + need.records
                return
        self.needs.append(need)

    def message(self) -> str:
        """What is missing (all on the first line, so a one-line error names it) and, below, where to
        get each, for an error that stops a run."""
        what = [f"{n.what} {n.name} (" + (n.detail if n.path.exists() else "; ".join(
            filter(None, [f"not found at {n.path}", n.detail]))) + ")" for n in self.missing]
        lines = [f"{self.kind} {self.name} cannot run, missing from the data: " + "; ".join(what)]
        told: set[str] = set()
        for n in self.missing:
            if n.source and n.source not in told:
                lines.append(f"  get {n.name}: {n.source}")
                told.add(n.source)
        lines.append("  (`segllm data check DATA_ROOT` lists what every benchmark and training mix needs)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for n in d["needs"]:
            n["path"] = str(n["path"])
        d["runnable"] = self.runnable
        return d


class DataMissingError(SegLLMError):
    """A run needs data that the data root does not hold; the message lists it and its sources."""

    def __init__(self, check: DataCheck) -> None:
        super().__init__(check.message())
        self.check = check


@dataclass(frozen=True)
class ReleasedMix:
    """A released recipe's data: its training conversation files (under
    ``conversations_folder/all_data_mix_train/``, the original's ``conversation_configs/train``
    list), its validation file (under ``conversations_folder/all_data_mix_val/``) and the datasets
    its annotation config lists (the original loads each of them before training starts)."""

    train: tuple[str, ...]
    val: str
    annotations: tuple[str, ...]


_REFCOCO_TRAIN = ("mr_refcoco_train.json", "mr_refcoco+_train.json", "mr_refcocog_train.json")
MIXES: dict[str, ReleasedMix] = {
    "mr_refcoco": ReleasedMix(
        (*_REFCOCO_TRAIN, "mr_refcoco_hard_train.json", "mr_refcoco+_hard_train.json", "mr_refcocog_hard_train.json"),
        "mr_refcoco_val.json", ("refcoco", "refcoco+", "refcocog")),
    "mr_paco": ReleasedMix(
        (*_REFCOCO_TRAIN, "mr_paco_train.json", "mr_lvis_train.json"),
        "mr_paco_val.json", ("refcoco", "refcoco+", "refcocog", "paco_lvis", "lvis")),
    "all_data_mix": ReleasedMix(
        ("reason_seg_train.json", "ade20k_train.json", "cocostuff_train.json", "llava_instruct_train.json",
         "attributes_train.json", *_REFCOCO_TRAIN, "mr_refcoco_hard_train.json", "mr_refcoco+_hard_train.json",
         "mr_refcocog_hard_train.json", "mr_paco_data.json", "mr_pascal_train.json", "mr_lvis_train.json",
         "mr_vg_train.json"),
        "reason_seg_test.json",
        ("refcoco", "refcoco+", "refcocog", "ade20k", "cocostuff", "description_based_coco", "reason_seg", "paco_lvis",
         "pascal", "lvis", "visual_genome")),
}


def path_need(what: str, name: str, path: Path, *, records: int | None = None, detail: str = "",
              key: str | None = None) -> Need:
    """A need for a file or folder, with its source (that of ``key``, default ``name``; see
    :func:`source_of`) filled in."""
    return Need(what, name, Path(path), Path(path).exists(), records, detail, source_of(what, key or name))


def image_need(images_root: Path, image_set: str, *, records: int | None = None) -> Need:
    """A need for an image set: a folder under the images root, e.g. ``coco/train2014``."""
    return path_need("images", image_set, Path(images_root) / image_set, records=records)


def _shown(dataset: str, path: Path, root: Path) -> str:
    """``dataset (file)``, the file relative to the annotations root where it lies under it."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        rel = Path(path)
    return f"{dataset} ({rel})"


def _image_set(images_root: Path, rel: str, *, decode_rules: bool) -> tuple[str, bool]:
    """(the image set an image path falls in, whether the image file is there), after the
    original's path fix-ups (the same candidates the reader tries)."""
    candidates = image_path_candidates(rel, decode_rules=decode_rules)
    for c in candidates:
        if (images_root / c).is_file():
            return str(Path(c).parent), True
    for c in candidates:  # the file is missing: name the set whose folder is there, if any
        if (images_root / c).parent.is_dir():
            return str(Path(c).parent), False
    # no folder either: name the one the original's fix-ups point to (vg/VG_100K, coco/train2014)
    return str(Path(image_path_candidates(rel, decode_rules=True)[0]).parent), False


def _scan_records(records: list[Any], images_root: Path, lookup: MaskLookup, check: DataCheck, label: str) -> None:
    """Add the image sets and annotation datasets that ``records`` use to ``check``."""
    sets: Counter[str] = Counter()
    absent: Counter[str] = Counter()
    datasets: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    bad = 0
    for rec in records:
        try:
            parsed = parse_record(rec)
        except RecordError:
            bad += 1
            continue
        if parsed.task != "segmentation":
            tasks[str(parsed.task)] += 1
        macros = [m for t in parsed.turns for m in t.macros]
        image = next((m for m in macros if isinstance(m, ImageMacro)), None)
        decode = next((m for m in macros if isinstance(m, DecodeMacro)), None)
        if image is not None or decode is not None:
            rel, rules = (image.path, False) if image is not None else (decode.image, True)
            s, found = _image_set(images_root, rel, decode_rules=rules)
            sets[s] += 1
            absent[s] += not found
        datasets.update({m.dataset for m in macros if isinstance(m, EncodeMacro | DecodeMacro)})
    for s, n in sets.items():
        need = image_need(images_root, s, records=n)
        if need.present and absent[s]:
            check.notes.append(f"{label}: {absent[s]} of {n} records' images are not in {s} (those records are skipped)")
        check.add(need)
    unknown = []
    for d, n in sorted(datasets.items()):
        try:
            path = lookup.path(d)
        except RecordError:
            unknown.append(f"{d} ({n})")
            continue
        check.add(path_need("annotations", _shown(d, path, lookup.root), path, records=n, key=d))
    if unknown:
        check.notes.append(f"{label}: records name unknown datasets, skipped: {', '.join(unknown)}")
    if tasks:
        check.notes.append(f"{label}: records of other tasks than segmentation, skipped: "
                           + ", ".join(f"{t} ({n})" for t, n in sorted(tasks.items())))
    if bad:
        check.notes.append(f"{label}: {bad} malformed record(s), skipped")


def check_conversation_files(check: DataCheck, files: Sequence[tuple[str, Path]], images_root: Path,
                             annotations_root: Path, *, is_eval: bool,
                             overrides: Mapping[str, str | Path] | None = None) -> DataCheck:
    """Add to ``check`` each released conversation file of ``files`` ((shown name, path) pairs)
    with its record count, and the image sets and annotations its records use (masks looked up
    as :class:`MaskLookup` with ``overrides`` and ``is_eval`` would). Returns ``check``."""
    lookup = MaskLookup(annotations_root, overrides=overrides, is_eval=is_eval)
    for label, path in files:
        path = Path(path)
        if not path.is_file():
            check.add(path_need("conversations", label, path))
            continue
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            check.add(Need("conversations", label, path, False, detail=f"cannot read {path}: {e}"))
            continue
        if not isinstance(records, list):
            check.add(Need("conversations", label, path, False, detail="expected a JSON list of conversation records"))
            continue
        check.add(Need("conversations", label, path, True, len(records)))
        _scan_records(records, Path(images_root), lookup, check, label)
    return check


def check_mix(name: str, train: Sequence[str | Path], val: str | Path | None, images_root: str | Path,
              annotations_root: str | Path, *, annotations: Sequence[str] = (),
              overrides: Mapping[str, str | Path] | None = None) -> DataCheck:
    """What training on the released conversation files ``train`` (validating on ``val``) needs:
    the files, the datasets ``annotations`` (those an annotation config loads up front) and the
    image sets and annotations their records use. Validation reads evaluation annotations
    (``path_eval``), as the original's evaluation does."""
    check = DataCheck(name, "mix")
    lookup = MaskLookup(annotations_root, overrides=overrides)
    for d in annotations:
        check.add(path_need("annotations", _shown(d, lookup.path(d), lookup.root), lookup.path(d), key=d))
    check_conversation_files(check, [(Path(f).name, Path(f)) for f in train], Path(images_root), Path(annotations_root),
                             is_eval=False, overrides=overrides)
    if val is not None:
        check_conversation_files(check, [(f"{Path(val).name} (validation)", Path(val))], Path(images_root),
                                 Path(annotations_root), is_eval=True, overrides=overrides)
    return check


def check_released_mix(name: str, conversations_root: str | Path, images_root: str | Path, annotations_root: str | Path,
                       *, overrides: Mapping[str, str | Path] | None = None) -> DataCheck:
    """:func:`check_mix` for a released recipe's mix (a name of :data:`MIXES`) in the released layout
    (``conversations_root`` is ``conversations_folder/``)."""
    if name not in MIXES:
        raise ValueError(f"unknown training mix {name!r}: one of {sorted(MIXES)}")
    mix, conv = MIXES[name], Path(conversations_root)
    return check_mix(name, [conv / "all_data_mix_train" / f for f in mix.train], conv / "all_data_mix_val" / mix.val,
                     images_root, annotations_root, annotations=mix.annotations, overrides=overrides)


_ORDER = {"conversations": 0, "images": 1, "annotations": 2}


def format_checks(checks: Sequence[DataCheck], *, root: Path | str | None = None) -> str:
    """A readable table: per benchmark or mix, each need with its state and record count, and for
    each missing one where to get it; a summary line last."""
    lines = [f"data root: {root}"] if root is not None else []
    for c in checks:
        state = "runnable" if c.runnable else f"NOT runnable ({len(c.missing)} missing)"
        lines.append(f"\n{c.kind} {c.name}: {state}")
        width = max((len(n.name) for n in c.needs), default=0)
        told: set[str] = set()
        for n in sorted(c.needs, key=lambda n: _ORDER.get(n.what, 3)):
            count = f"{n.records:,} record{'' if n.records == 1 else 's'}" if n.records is not None else ""
            extra = f"  {n.detail}" if n.detail else ""
            lines.append(f"  {n.what:<13} {n.name:<{width}}  {'ok' if n.present else 'MISSING':<7}  {count}{extra}".rstrip())
            if not n.present:
                lines.append(f"  {'':<13} looked for {n.path}")
                if n.source:
                    lines.append(f"  {'':<13} get it: {'as above' if n.source in told else n.source}")
                    told.add(n.source)
        lines += [f"  note: {note}" for note in c.notes]
    ok = [c.name for c in checks if c.runnable]
    not_ok = [c.name for c in checks if not c.runnable]
    lines.append(f"\nrunnable: {', '.join(ok) or 'none'}")
    if not_ok:
        lines.append(f"not runnable: {', '.join(not_ok)}")
    return "\n".join(lines)
