"""The package's own conversation records, and datasets of them.

A dataset folder (written by ``segllm world``, or by a user) holds:

- ``annotations.json``: COCO instances (images, annotations with polygon or RLE masks);
- ``conversations.jsonl``: one record per line::

    {"id": "train-000001", "image": "images/train_000001.png", "image_id": 1,
     "rounds": [{"question": "Segment the red circle.", "refs": [], "answer": "<seg>",
                 "mask_ids": [17]}, ...]}

  ``mask_ids`` are COCO annotation ids, one per ``<seg>`` of the answer; ``refs`` are the
  1-indexed earlier rounds the question refers to.

A malformed record is skipped with a message naming the file, line and problem; the dataset
counts what it skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from segllm.conversation import Conversation, Round, load_image
from segllm.data.world import World, WorldConfig
from segllm.errors import SegLLMError

log = logging.getLogger(__name__)


class RecordError(SegLLMError):
    """A conversation record that cannot be used."""


def record_to_conversation(record: dict[str, Any], image: np.ndarray, get_mask: Callable[[Any], np.ndarray]) -> Conversation:
    """Build a :class:`Conversation` from a record, its image and a mask lookup (id -> [H, W] bool)."""
    rounds_data = record.get("rounds")
    if not isinstance(rounds_data, list) or not rounds_data:
        raise RecordError("record has no rounds")
    rounds = []
    for n, r in enumerate(rounds_data, start=1):
        if not isinstance(r, dict):
            raise RecordError(f"round {n} is not an object")
        try:
            question, answer = r["question"], r["answer"]
            refs = tuple(int(k) for k in r.get("refs", []))
            mask_ids = list(r["mask_ids"])
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"round {n}: missing or malformed field {e}") from e
        if not isinstance(question, str) or not isinstance(answer, str):
            raise RecordError(f"round {n}: question and answer must be text")
        if answer.count("<seg>") != len(mask_ids):
            raise RecordError(f"round {n}: {answer.count('<seg>')} <seg> in the answer but {len(mask_ids)} mask id(s)")
        masks = []
        for mid in mask_ids:
            m = get_mask(mid)
            if m.shape != image.shape[:2]:
                raise RecordError(f"round {n}: mask {mid} is {m.shape}, the image is {image.shape[:2]}")
            if not m.any():
                raise RecordError(f"round {n}: mask {mid} is empty")
            masks.append(m)
        rounds.append(Round(question, refs, answer, masks))
    conv = Conversation(image, rounds)
    try:
        conv.validate()
    except SegLLMError as e:
        raise RecordError(str(e)) from e
    return conv


@dataclass
class Skipped:
    """Records a dataset could not use: (where, reason) pairs."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.items.append((where, reason))
        log.warning("skipped %s: %s", where, reason)

    def __len__(self) -> int:
        return len(self.items)


class SkippingGet:
    """``get(i)``: the conversation, or None with the record's place and reason added to
    ``self.skipped``, for datasets whose ``__getitem__`` raises :class:`RecordError` messages
    that start with ``where(i)``."""

    skipped: Skipped

    def get(self, index: int) -> Conversation | None:
        try:
            return self[index]  # type: ignore[index]
        except RecordError as e:
            where = self.where(index)  # type: ignore[attr-defined]
            self.skipped.add(where, str(e).removeprefix(where + ": "))
            return None


class ConversationFolder(SkippingGet):
    """Conversations stored in a dataset folder (see the module docstring).

    ``dataset[i]`` returns a :class:`Conversation`, or raises :class:`RecordError` naming the
    record; :meth:`get` returns None instead and counts it in ``skipped``.
    """

    def __init__(self, root: str | Path, *, max_rounds: int | None = None) -> None:
        self.root = Path(root)
        ann = self.root / "annotations.json"
        convs = self.root / "conversations.jsonl"
        for f in (ann, convs):
            if not f.is_file():
                raise RecordError(f"dataset folder {self.root} has no {f.name}")
        self.max_rounds = max_rounds
        self.skipped = Skipped()
        self.records: list[tuple[int, dict]] = []
        for line_no, line in enumerate(convs.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self.skipped.add(f"{convs}:{line_no}", f"malformed JSON ({e})")
                continue
            self.records.append((line_no, rec))
        if not self.records:
            raise RecordError(f"{convs} has no usable conversation records")
        self._convs_file = convs

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(ann))

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        line_no, rec = self.records[index]
        return f"{self._convs_file}:{line_no} (id {rec.get('id', '?')})"

    def __getitem__(self, index: int) -> Conversation:
        _, rec = self.records[index]
        try:
            image = load_image(self.root / str(rec.get("image", "")))
        except SegLLMError as e:
            raise RecordError(f"{self.where(index)}: {e}") from e

        def get_mask(mid):
            if mid not in self.coco.anns:
                raise RecordError(f"mask id {mid} is not in annotations.json")
            return self.coco.annToMask(self.coco.anns[mid]).astype(bool)

        try:
            conv = record_to_conversation(rec, image, get_mask)
        except RecordError as e:
            raise RecordError(f"{self.where(index)}: {e}") from e
        return conv.truncated(self.max_rounds) if self.max_rounds else conv



class WorldConversations:
    """Conversations of the procedural world, generated on demand (deterministic by index)."""

    def __init__(self, split: str, size: int, *, seed: int = 0, config=None, max_rounds: int | None = None) -> None:
        self.world = World(config or WorldConfig(), seed=seed)
        self.split = split
        self.size = size
        self.max_rounds = max_rounds
        self.skipped = Skipped()

    def __len__(self) -> int:
        return self.size

    def where(self, index: int) -> str:
        return f"world {self.split}[{index}]"

    def __getitem__(self, index: int) -> Conversation:
        s = self.world.sample(self.split, index)
        conv = record_to_conversation(s.record, s.image, lambda mid: s.masks[mid])
        return conv.truncated(self.max_rounds) if self.max_rounds else conv

    def get(self, index: int) -> Conversation | None:
        try:
            return self[index]
        except RecordError as e:
            self.skipped.add(self.where(index), str(e))
            return None
