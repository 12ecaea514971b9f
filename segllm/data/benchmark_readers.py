"""Readers of the paper's single-round benchmarks, as datasets of Conversations.

- :class:`RefcocoSentences`: RefCOCO / RefCOCO+ / RefCOCOg from the REFER files (``instances.json``
  and the ``refs(*).p`` pickle, read with the restricted unpickler), one single-round
  conversation per referring sentence of a split, asked with a question template.
- :class:`ReasonSegData`: ReasonSeg's ``<name>.jpg`` + ``<name>.json`` folders, one conversation
  per image (its first text, as LISA evaluates), with the ignore regions for LISA's metric.

Both follow the dataset protocol of :func:`segllm.eval.evaluate.evaluate`: ``len``, ``get(i)``
(None for a record that cannot be used, reported in ``skipped``) and ``where(i)``.
The multi-round benchmarks (MR-RefCOCO/+/g, MR-PACO) are released conversation files, read by
:class:`segllm.data.released.convert.ReleasedConversations`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from segllm.conversation import Conversation, Round, image_size, load_image
from segllm.data.records import RecordError, Skipped, SkippingGet
from segllm.data.released.masks import reason_seg_label_map
from segllm.data.released.refer import load_refs
from segllm.errors import SegLLMError

__all__ = ["TEMPLATES", "ReasonSegData", "RefcocoSentences", "read_templates"]

# Question templates: {sent} is the referring expression or the ReasonSeg text.
TEMPLATES: dict[str, list[str]] = {
    # SegLLM's own single-round phrasing ("Segment the X.")
    "segllm": ["Segment the {sent}."],
    # LISA's evaluation question for a referring phrase
    "lisa": ["What is {sent} in this image? Please output segmentation mask."],
}
# LISA's question for a ReasonSeg entry that is a whole sentence
LISA_SENTENCE = "{sent} Please output segmentation mask."

# which refs file each RefCOCO-family dataset is evaluated with (REFER's splitBy)
REFS_FILE = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}


def read_templates(spec: str) -> list[str]:
    """Templates by name (see :data:`TEMPLATES`) or from a text file with one ``{sent}`` template
    per line (e.g. SESAME's question set, which users supply)."""
    if spec in TEMPLATES:
        return list(TEMPLATES[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown template set {spec!r}: use one of {sorted(TEMPLATES)} or a file of templates")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{sent}" not in ln]
    if not lines or bad:
        raise ValueError(f"{path}: every line must be a template with {{sent}}" + (f" (not: {bad[0]!r})" if bad else ""))
    return lines


def _as_question(template: str, sent: str) -> str:
    return template.replace("{sent}", sent.strip()).replace("..", ".")


class RefcocoSentences(SkippingGet):
    """One single-round conversation per referring sentence of a RefCOCO-family split.

    Args:
        annotations_root: the folder holding ``<dataset>/instances.json`` and the refs pickle.
        images_root: the folder the images' ``file_name`` is relative to (COCO train2014 images:
            ``images_root/coco/train2014/COCO_train2014_....jpg`` in the released layout, so
            pass ``images_folder/coco/train2014``).
        dataset: "refcoco", "refcoco+" or "refcocog".
        split: "val", "testA", "testB" (refcoco, refcoco+) or "val", "test" (refcocog).
        templates: question templates, used in turn (sentence i gets template i mod n).
    """

    def __init__(
        self,
        annotations_root: str | Path,
        images_root: str | Path,
        dataset: str = "refcoco",
        split: str = "val",
        *,
        templates: list[str] | None = None,
        refs_file: str | None = None,
    ) -> None:

        if dataset not in REFS_FILE:
            raise ValueError(f"unknown RefCOCO dataset {dataset!r}: one of {sorted(REFS_FILE)}")
        folder = Path(annotations_root) / dataset
        self.images_root = Path(images_root)
        self.templates = templates or TEMPLATES["segllm"]
        self.skipped = Skipped()
        refs = [r for r in load_refs(folder / (refs_file or REFS_FILE[dataset])) if r["split"] == split]
        if not refs:
            raise RecordError(f"{folder}: no refs in split {split!r}")
        instances = folder / "instances.json"
        if not instances.is_file():
            raise RecordError(f"{instances} not found")

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(instances))
        # (ref, sentence text) in file order: deterministic indices for resuming
        self.items: list[tuple[dict[str, Any], str]] = [
            (r, s.get("sent") or s.get("raw") or "") for r in refs for s in r["sentences"]
        ]
        self.name = f"{dataset} {split}"

    def __len__(self) -> int:
        return len(self.items)

    def where(self, index: int) -> str:
        ref, _ = self.items[index]
        return f"{self.name}[{index}] (ref {ref['ref_id']}, ann {ref['ann_id']})"

    def __getitem__(self, index: int) -> Conversation:
        ref, sent = self.items[index]
        where = self.where(index)
        if not sent.strip():
            raise RecordError(f"{where}: empty sentence")
        if ref["ann_id"] not in self.coco.anns:
            raise RecordError(f"{where}: annotation {ref['ann_id']} is not in instances.json")
        img_info = self.coco.imgs.get(ref["image_id"])
        if img_info is None:
            raise RecordError(f"{where}: image {ref['image_id']} is not in instances.json")
        try:
            image = load_image(self.images_root / img_info["file_name"])
        except SegLLMError as e:
            raise RecordError(f"{where}: {e}") from None
        mask = self.coco.annToMask(self.coco.anns[ref["ann_id"]]).astype(bool)
        if mask.shape != image.shape[:2]:
            raise RecordError(f"{where}: mask {mask.shape} does not fit the image {image.shape[:2]}")
        if not mask.any():
            raise RecordError(f"{where}: the ground-truth mask is empty")
        question = _as_question(self.templates[index % len(self.templates)], sent)
        return Conversation(image, [Round(question, (), "<seg>", [mask])])


class ReasonSegData(SkippingGet):
    """ReasonSeg ``<name>.jpg`` + ``<name>.json`` pairs of one split, one conversation per image.

    The question is LISA's: ``"{text} Please output segmentation mask."`` for a sentence,
    ``"What is {text} in this image? Please output segmentation mask."`` for a phrase, with the
    first text (LISA evaluates only ``text[0]``). The target is every "target" polygon;
    :meth:`ignore` gives the "ignore" polygons, which LISA's metric leaves out (SegLLM's own
    loader draws them as background, which is what the target mask alone gives).

    Args:
        images: the folder of the split's images (``<name>.jpg``).
        annotations: the folder of their JSON files (default: ``images``, LISA's layout).
    """

    def __init__(self, images: str | Path, annotations: str | Path | None = None) -> None:
        self.images = Path(images)
        self.annotations = Path(annotations) if annotations is not None else self.images
        if not self.annotations.is_dir():
            raise RecordError(f"ReasonSeg folder not found: {self.annotations}")
        self.names = sorted(p.stem for p in self.annotations.glob("*.json"))
        if not self.names:
            raise RecordError(f"{self.annotations} has no ReasonSeg .json files")
        self.skipped = Skipped()

    def __len__(self) -> int:
        return len(self.names)

    def where(self, index: int) -> str:
        return str(self.annotations / f"{self.names[index]}.json")

    def _image_path(self, name: str) -> Path:
        for ext in (".jpg", ".jpeg", ".png"):
            p = self.images / f"{name}{ext}"
            if p.is_file():
                return p
        return self.images / f"{name}.jpg"

    def __getitem__(self, index: int) -> Conversation:
        name, where = self.names[index], self.where(index)
        try:
            anno = json.loads(Path(where).read_text(encoding="utf-8"))
            image = load_image(self._image_path(name))
        except (OSError, ValueError) as e:
            raise RecordError(f"{where}: {e}") from None
        texts = anno.get("text") if isinstance(anno, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not isinstance(texts[0], str) or not texts[0].strip():
            raise RecordError(f"{where}: no text")
        h, w = image.shape[:2]
        try:
            labels = reason_seg_label_map(anno, h, w, with_ignore=True)
        except RecordError as e:
            raise RecordError(f"{where}: {e}") from None
        target = labels == 1
        if not target.any():
            raise RecordError(f"{where}: the ground-truth mask is empty")
        template = LISA_SENTENCE if anno.get("is_sentence") else TEMPLATES["lisa"][0]
        return Conversation(image, [Round(_as_question(template, texts[0]), (), "<seg>", [target])])

    def ignore(self, index: int) -> list[list[np.ndarray | None]]:
        """Per round, per mask: the ignore region of conversation ``index`` ([H, W] bool),
        recomputed from its JSON (cheap; keeping them all would hold every image's size)."""

        anno = json.loads(Path(self.where(index)).read_text(encoding="utf-8"))
        h, w = image_size(self._image_path(self.names[index]))  # as displayed, as __getitem__ reads it
        return [[reason_seg_label_map(anno, h, w, with_ignore=True) == 255]]
