"""The package's own conversation records, and datasets of them.

A dataset folder (written by ``segllm world``, or by a user) holds:

- ``annotations.json``: COCO instances (images, annotations with polygon or RLE masks);
- ``conversations.jsonl``: one record per line::

    {"id": "train-000001", "image": "images/train_000001.png", "image_id": 1,
     "rounds": [{"question": "Segment the red circle.", "refs": [], "answer": "<seg>",
                 "mask_ids": [17]}, ...]}

  ``mask_ids`` are COCO annotation ids, one per ``<seg>`` of the answer; ``refs`` are the
  1-indexed earlier rounds the question refers to. Optional per-round fields (the world writes
  them; a reader accepts records without them, see :func:`round_meta`): ``relation`` (the
  question family), ``kind`` ("query"; "pick": a deliberately ambiguous question whose
  recorded answer is one of several valid ones; or "all": a question for several objects, one
  mask id each, left to right), ``alternatives`` (the COCO ids of every valid
  answer of a pick round) and ``text_resolvable`` (whether the questions' text alone
  determines the answer).

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
from segllm.data.world.dense import dense_labels, named_labels
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
            refs = tuple(map(int, r.get("refs", ())))
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
            if not np.count_nonzero(m):  # m.any() without its Python wrapper
                raise RecordError(f"round {n}: mask {mid} is empty")
            masks.append(m)
        rounds.append(Round(question, refs, answer, masks))
    conv = Conversation(image, rounds)
    try:
        # every mask was found non-empty above, so a reference needs only a round with masks
        # (validate's own check would count each referenced mask's pixels again)
        conv.validate(check_refs=False)
    except SegLLMError as e:
        raise RecordError(str(e)) from e
    for n, rnd in enumerate(rounds, start=1):
        for k in rnd.refs:
            if not rounds[k - 1].masks:
                raise RecordError(f"round {n} refers to round {k}, which has no mask")
    return conv


ROUND_KINDS = ("query", "pick", "all")


@dataclass(frozen=True)
class RoundMeta:
    """Per-round metadata of a record, beside what a :class:`Conversation` holds.

    Attributes:
        kind: "query" (one right answer), "pick" (any of ``alternatives`` is right; the
            recorded mask is the one later rounds assume) or "all" (several targets, one mask
            each: "segment all the red objects").
        relation: the question family ("attribute", "positional", ...), or None.
        text_resolvable: whether the questions' text alone determines the answer (None:
            not recorded).
        alternatives: mask ids of every valid answer (pick rounds; empty otherwise).
    """

    kind: str = "query"
    relation: str | None = None
    text_resolvable: bool | None = None
    alternatives: tuple = ()


def round_meta(record: dict[str, Any]) -> list[RoundMeta]:
    """The :class:`RoundMeta` of every round of a record; missing optional fields take their
    defaults (old files, user data).

    Raises:
        RecordError: a field present with an unusable value (naming round and field).
    """
    out = []
    for n, r in enumerate(record.get("rounds") or [], start=1):
        if not isinstance(r, dict):
            raise RecordError(f"round {n} is not an object")
        kind = r.get("kind", "query")
        if kind not in ROUND_KINDS:
            raise RecordError(f"round {n}: kind must be one of {ROUND_KINDS}, got {kind!r}")
        relation = r.get("relation")
        if relation is not None and not isinstance(relation, str):
            raise RecordError(f"round {n}: relation must be text, got {relation!r}")
        tr = r.get("text_resolvable")
        if tr is not None and not isinstance(tr, bool):
            raise RecordError(f"round {n}: text_resolvable must be true or false, got {tr!r}")
        alts = r.get("alternatives", [])
        if not isinstance(alts, list):
            raise RecordError(f"round {n}: alternatives must be a list of mask ids, got {alts!r}")
        if kind == "pick" and not alts:
            alts = list(r.get("mask_ids", []))  # no alternatives recorded: the target only
        out.append(RoundMeta(kind, relation, tr, tuple(alts)))
    return out


@dataclass
class SceneAnnotations:
    """What evaluation diagnostics need of one conversation beyond its masks.

    Attributes:
        rounds: per round, its :class:`RoundMeta` (as many as the conversation's rounds).
        masks: every annotated object and part of the image: id -> [H, W] bool.
        top_level: ids of the objects that are not parts of another (the question-blind
            baseline predicts their union).
        mask_ids: per round, the ids (keys of ``masks``) of its ground-truth masks.
    """

    rounds: list[RoundMeta]
    masks: dict[Any, np.ndarray]
    top_level: list[Any]
    mask_ids: list[list[Any]] = field(default_factory=list)


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
        # lines dropped while reading: no index reaches them, so an evaluation counts them from here
        self.unreadable: list[tuple[str, str]] = list(self.skipped.items)
        self._convs_file = convs

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(ann))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
            # pycocotools reports a malformed file by whatever its indexing trips over
            raise RecordError(f"cannot read {ann}: {type(e).__name__}: {e} (expected COCO instances JSON)") from e

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
            try:
                return self.coco.annToMask(self.coco.anns[mid]).astype(bool)
            except Exception as e:  # a malformed polygon or RLE trips pycocotools in several ways
                raise RecordError(f"mask id {mid}: unreadable segmentation in annotations.json ({type(e).__name__}: {e})") from e

        try:
            conv = record_to_conversation(rec, image, get_mask)
        except RecordError as e:
            raise RecordError(f"{self.where(index)}: {e}") from e
        return conv.truncated(self.max_rounds) if self.max_rounds else conv

    def scene(self, index: int) -> SceneAnnotations:
        """Round metadata and every annotated mask of conversation ``index``'s image (all COCO
        annotations of its ``image_id``; a part is an annotation with a ``parent_id``)."""
        _, rec = self.records[index]
        try:
            meta = round_meta(rec)
        except RecordError as e:
            raise RecordError(f"{self.where(index)}: {e}") from e
        anns = self.coco.imgToAnns.get(rec.get("image_id"), [])
        masks = {}
        for a in anns:
            try:
                masks[a["id"]] = self.coco.annToMask(a).astype(bool)
            except Exception as e:  # a malformed polygon or RLE trips pycocotools in several ways
                # the scene only serves diagnostics (grounding); a conversation that uses this mask
                # was already skipped by get(), so one bad annotation must not stop an evaluation
                log.warning("%s: annotation %s left out of the scene: unreadable segmentation (%s: %s)",
                            self.where(index), a.get("id"), type(e).__name__, e)
        anns = [a for a in anns if a["id"] in masks]
        top = [a["id"] for a in anns if a.get("parent_id") is None]
        ids = [list(r.get("mask_ids", [])) for r in rec["rounds"]]
        cut = self.max_rounds or len(meta)
        return SceneAnnotations(meta[:cut], masks, top, ids[:cut])



class WorldConversations:
    """Conversations of the procedural world, generated on demand (deterministic by index)."""

    def __init__(self, split: str, size: int, *, seed: int = 0, config=None, max_rounds: int | None = None) -> None:
        self.world = World(config or WorldConfig(), seed=seed)
        self.split = split
        self.size = size
        self.max_rounds = max_rounds
        self.skipped = Skipped()
        self._last = None  # (index, Sample): evaluation reads a conversation, then its scene

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int):
        """The world :class:`segllm.data.world.Sample` of ``index`` (the last one is kept)."""
        if self._last is None or self._last[0] != index:
            self._last = (index, self.world.sample(self.split, index))
        return self._last[1]

    def where(self, index: int) -> str:
        return f"world {self.split}[{index}]"

    def __getitem__(self, index: int) -> Conversation:
        s = self.sample(index)
        conv = record_to_conversation(s.record, s.image, lambda mid: s.masks[mid])
        conv.dense = dense_labels(s.objects, s.masks)
        conv.named = [named_labels(q.head) for q in s.queries]
        ids = sorted(s.masks)
        conv.candidates = np.stack([s.masks[i] for i in ids])
        parents = {o.id: o.parent for o in s.objects}
        conv.candidate_groups = np.array([0 if parents.get(i) is None else 1 for i in ids], np.int64)
        position = {i: k for k, i in enumerate(ids)}
        conv.alternatives = {r: [position[a] for a in alts] for r, alts in enumerate(s.alternatives) if len(alts) > 1}
        if self.max_rounds and len(conv.rounds) > self.max_rounds:  # else a copy (dataclasses.replace) of the same
            conv = conv.truncated(self.max_rounds)
        return conv

    def scene(self, index: int) -> SceneAnnotations:
        """Round metadata and every object's and part's mask of sample ``index`` (generated
        again: deterministic by index)."""
        s = self.sample(index)
        meta = round_meta(s.record)
        cut = self.max_rounds or len(meta)
        return SceneAnnotations(meta[:cut], s.masks, [o.id for o in s.objects if o.parent is None],
                                [list(r["mask_ids"]) for r in s.record["rounds"]][:cut])

    def get(self, index: int) -> Conversation | None:
        try:
            return self[index]
        except RecordError as e:
            self.skipped.add(self.where(index), str(e))
            return None
