"""Released SegLLM conversation records <-> :class:`segllm.conversation.Conversation`.

Reading (:func:`released_to_conversation`): a record's human turn becomes a round's question
(macros removed, text kept, ``[REF:1]``-style brackets included); its MASK-ENCODE / BOX-ENCODE
macros become the round's ``refs``: each encode is tied to the earlier round whose MASK-DECODE
target id equals the encoded mask id (as the original's evaluation does), falling back to the
turn's ``ind`` when no earlier decode has that id. The gpt turn becomes the answer, each
MASK-DECODE replaced by ``<seg>``, with the masks looked up by target id.

Writing (:func:`conversation_to_released`): a Conversation becomes a released record the original
code trains on; its masks are either given as ids of an existing dataset or stored in a
:class:`MaskStore`, saved as a ``description_based_coco`` (or ``visual_genome``-style) file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segllm.conversation import SEG, Conversation, Round, load_image
from segllm.data.records import RecordError, Skipped
from segllm.data.released.macros import (
    DecodeMacro,
    EncodeMacro,
    ImageMacro,
    MaskId,
    ParsedRecord,
    canonical_image_name,
    format_id,
    parse_record,
    plain_text,
    resolve_image_path,
)
from segllm.data.released.masks import EVAL_SUFFIX, MaskLookup
from segllm.errors import SegLLMError

TASK = "segmentation"
MAX_TRAIN_ROUNDS = 6  # the original cuts training conversations to 6 rounds (12 turns)


@dataclass
class ReleasedInfo:
    """What a converted record came from: the image path and, per round, the decoded masks' ids."""

    image: str
    image_file: Path
    dataset: list[list[str]] = field(default_factory=list)  # per round, per mask: dataset name
    mask_ids: list[list[MaskId]] = field(default_factory=list)  # per round, per mask: target id
    ref_ids: list[list[MaskId]] = field(default_factory=list)  # per round, per mask: the decode's ref id


def _base_name(dataset: str) -> str:
    return dataset[: -len(EVAL_SUFFIX)] if dataset.endswith(EVAL_SUFFIX) else dataset


def released_to_conversation(
    record: dict[str, Any] | ParsedRecord,
    *,
    images_root: str | Path,
    lookup: MaskLookup,
    max_rounds: int | None = None,
) -> Conversation:
    """Convert one released record to a :class:`Conversation` (see the module docstring).

    Raises :class:`RecordError` naming the round, macro and problem.
    """
    return released_to_conversation_with_info(record, images_root=images_root, lookup=lookup, max_rounds=max_rounds)[0]


def released_to_conversation_with_info(
    record: dict[str, Any] | ParsedRecord,
    *,
    images_root: str | Path,
    lookup: MaskLookup,
    max_rounds: int | None = None,
) -> tuple[Conversation, ReleasedInfo]:
    """Like :func:`released_to_conversation`, also returning the record's image path and mask ids."""
    parsed = record if isinstance(record, ParsedRecord) else parse_record(record)
    if parsed.task != TASK:
        raise RecordError(f"task is {parsed.task!r}; only {TASK!r} records hold masks")
    turns = parsed.turns
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if t.speaker != want:
            raise RecordError(
                f"turn {i + 1} is from {t.speaker!r}; turns must alternate human, gpt, starting with human"
            )
    if len(turns) % 2:
        raise RecordError(f"{len(turns)} turns: the last human turn has no gpt answer")
    if max_rounds is not None:
        turns = turns[: 2 * max_rounds]
    for r in range(len(turns) // 2):  # structure first, before any file is read
        n, human, gpt = r + 1, turns[2 * r], turns[2 * r + 1]
        for k in human.ind or ():
            if k >= n:
                raise RecordError(f"round {n}: 'ind' names round {k}, which is not an earlier round")
        for m in human.macros:
            if isinstance(m, DecodeMacro):
                raise RecordError(f"round {n}, {_text(m)}: MASK-DECODE belongs in the gpt turn")
        for m in gpt.macros:
            if not isinstance(m, DecodeMacro):
                raise RecordError(f"round {n}, {_text(m)}: only MASK-DECODE macros may appear in a gpt turn")

    # the conversation's image: the IMAGE256 macro, else the first MASK-DECODE's image
    img_macro = next((m for t in turns for m in t.macros if isinstance(m, ImageMacro)), None)
    if img_macro is not None:
        image_rel, decode_rules = img_macro.path, False
    else:
        dec = next((m for t in turns for m in t.macros if isinstance(m, DecodeMacro)), None)
        if dec is None:
            raise RecordError("no IMAGE256 or MASK-DECODE macro names the image")
        image_rel, decode_rules = dec.image, True
    image_file = resolve_image_path(images_root, image_rel, decode_rules=decode_rules)
    try:
        image = load_image(image_file)
    except SegLLMError as e:
        raise RecordError(str(e)) from e
    h, w = image.shape[:2]
    image_name = canonical_image_name(image_rel)
    info = ReleasedInfo(image_rel, image_file)

    def check_image(n: int, macro, path: str) -> None:
        if canonical_image_name(path) != image_name:
            raise RecordError(
                f"round {n}, {_text(macro)}: image {path!r} differs from the conversation's {image_rel!r}"
            )

    rounds: list[Round] = []
    decoded: list[list[tuple[str, MaskId]]] = []  # per earlier round: (dataset, tgt id) of its decodes
    for r in range(len(turns) // 2):
        n = r + 1
        human, gpt = turns[2 * r], turns[2 * r + 1]
        # --- question and references
        refs: set[int] = set()
        counters = {"mask": 0, "box": 0}
        ind = human.ind or ()
        for m in human.macros:
            if isinstance(m, ImageMacro):
                check_image(n, m, m.path)
                continue
            check_image(n, m, m.image)
            pos = counters[m.kind]
            counters[m.kind] += 1
            key = (_base_name(m.dataset), m.mask_id)
            matches = [k + 1 for k, ids in enumerate(decoded) if key in ids]
            hint = ind[pos] if pos < len(ind) else None
            if matches:
                refs.add(hint if hint in matches else matches[-1])
            elif hint is not None:
                refs.add(hint)
            else:
                raise RecordError(
                    f"round {n}, {_text(m)}: mask {m.mask_id!r} is no earlier round's MASK-DECODE target "
                    "and the turn has no 'ind' entry for it"
                )
        question = human.text
        if not question:
            raise RecordError(f"round {n}: the question has no text besides macros")
        # --- answer and masks
        masks, ids, datasets, ref_ids = [], [], [], []
        for m in gpt.macros:
            check_image(n, m, m.image)
            try:
                mask = lookup.get(m.dataset, m.image, m.tgt_id, image_size=(h, w))
            except RecordError as e:
                raise RecordError(f"round {n}, {_text(m)}: {e}") from None
            masks.append(mask)
            ids.append(m.tgt_id)
            datasets.append(m.dataset)
            ref_ids.append(m.ref_id)
        answer = plain_text(gpt.pieces, replace=lambda _m: SEG)
        rounds.append(Round(question, tuple(sorted(refs)), answer, masks))
        decoded.append(list(zip((_base_name(d) for d in datasets), ids)))
        info.mask_ids.append(ids)
        info.dataset.append(datasets)
        info.ref_ids.append(ref_ids)
    conv = Conversation(image, rounds)
    try:
        conv.validate()
    except SegLLMError as e:
        raise RecordError(str(e)) from e
    return conv, info


def _text(macro) -> str:
    return macro.source or macro.format()


# ---------------------------------------------------------------------------------- write


class MaskStore:
    """Masks to write for the original code, keyed by string ids (which contain '_').

    ``layout="described"`` writes the ``description_based_coco`` layout
    (id -> {"segmentation": RLE, "image_dim": [h, w]}); ``layout="rle"`` the
    ``visual_genome`` / ``pascal`` layout (id -> RLE). Point the original's annotation config
    (or a :class:`MaskLookup` override) for that dataset name at the saved file.
    """

    def __init__(self, layout: str = "described") -> None:
        if layout not in ("described", "rle"):
            raise RecordError(f"unknown MaskStore layout {layout!r} (described or rle)")
        self.layout = layout
        self.entries: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, mask_id: str) -> bool:
        return mask_id in self.entries

    def add(self, mask_id: str, mask: np.ndarray) -> str:
        format_id(mask_id)  # checks it reads back as the same string
        if mask_id in self.entries:
            raise RecordError(f"mask id {mask_id!r} is already in the store")
        m = np.asarray(mask)
        if m.ndim != 2 or not m.any():
            raise RecordError(f"mask {mask_id!r} must be a non-empty [H, W] mask")
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle = {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
        self.entries[mask_id] = rle if self.layout == "rle" else {"segmentation": rle, "image_dim": list(m.shape)}
        return mask_id

    def to_json(self) -> dict[str, Any]:
        return dict(self.entries)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.entries))
        return path


def conversation_to_released(
    conv: Conversation,
    *,
    image: str,
    dataset: str = "description_based_coco",
    mask_ids: Sequence[Sequence[MaskId]] | None = None,
    store: MaskStore | None = None,
    id_prefix: str | None = None,
    conv_id: Any = None,
    box_encode: bool = True,
    base: Any = None,
) -> dict[str, Any]:
    """Write a Conversation as a released record (new MASK-DECODE form).

    Args:
        conv: the conversation (every round answered).
        image: its image path relative to the original's images folder.
        dataset: the dataset name the masks are looked up in.
        mask_ids: per round, one id per mask, when the masks already are in ``dataset``;
            otherwise every mask is added to ``store`` under ``{id_prefix}_r{round}_m{k}``.
        box_encode: write a BOX-ENCODE after each MASK-ENCODE, as the released data does.

    A round's references become MASK-ENCODE (+ BOX-ENCODE) macros of the referenced rounds'
    masks in front of its question, with ``ind`` naming those rounds (one entry per encoded
    mask); its MASK-DECODE's task is ``relational`` with the first referenced mask as ref id,
    else ``none``.
    """
    try:
        conv.validate()
    except SegLLMError as e:
        raise RecordError(f"cannot write the conversation: {e}") from e
    if mask_ids is None:
        if store is None:
            raise RecordError("give either mask_ids (masks already in a dataset) or a MaskStore to put them in")
        prefix = id_prefix if id_prefix is not None else (f"conv_{conv_id}" if conv_id is not None else "conv")
        ids = [
            [store.add(f"{prefix}_r{n}_m{k}", m) for k, m in enumerate(r.masks, start=1)]
            for n, r in enumerate(conv.rounds, start=1)
        ]
    else:
        ids = [list(x) for x in mask_ids]
        if len(ids) != len(conv.rounds) or any(len(a) != len(r.masks) for a, r in zip(ids, conv.rounds)):
            raise RecordError("mask_ids must give one id per mask of every round")
    turns = []
    for n, (rnd, round_ids) in enumerate(zip(conv.rounds, ids), start=1):
        head = [ImageMacro(image).format()] if n == 1 else []
        ind = []
        for k in rnd.refs:
            for mid in ids[k - 1]:
                head.append(EncodeMacro("mask", image, dataset, mid).format())
                if box_encode:
                    head.append(EncodeMacro("box", image, dataset, mid).format())
                ind.append(int(k))
        human: dict[str, Any] = {"from": "human", "value": "".join(head) + (" " if head else "") + rnd.question}
        if ind:
            human["ind"] = ind
        ref_id = ids[rnd.refs[0] - 1][0] if rnd.refs else None
        task = "relational" if rnd.refs else "none"
        pieces = rnd.answer.split(SEG)
        answer = pieces[0]
        for mid, rest in zip(round_ids, pieces[1:]):
            answer += DecodeMacro(image, dataset, mid, ref_id=ref_id, task=task, form="new").format() + rest
        turns += [human, {"from": "gpt", "value": answer}]
    rec: dict[str, Any] = {"task": TASK, "base": base, "conversations": turns}
    if conv_id is not None:
        rec["conv_id"] = conv_id
    return rec


# -------------------------------------------------------------------------------- dataset


class ReleasedConversations:
    """A released conversation file (a JSON list of records) as Conversations.

    ``dataset[i]`` returns a :class:`Conversation` or raises :class:`RecordError` naming the
    file, the record index and the reason; :meth:`get` returns None instead and records the
    skip in ``skipped``.
    """

    def __init__(
        self,
        json_path: str | Path,
        images_root: str | Path,
        annotations_root: str | Path,
        max_rounds: int | None = None,
        *,
        overrides: dict[str, str | Path] | None = None,
        is_eval: bool = False,
        lookup: MaskLookup | None = None,
    ) -> None:
        self.json_path = Path(json_path)
        self.images_root = Path(images_root)
        self.max_rounds = max_rounds
        self.lookup = lookup or MaskLookup(annotations_root, overrides=overrides, is_eval=is_eval)
        self.skipped = Skipped()
        if not self.json_path.is_file():
            raise RecordError(f"conversation file not found: {self.json_path}")
        try:
            with open(self.json_path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise RecordError(f"cannot read {self.json_path}: {e}") from e
        if not isinstance(data, list):
            raise RecordError(f"{self.json_path}: expected a JSON list of conversation records")
        self.records: list[Any] = data

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        rec = self.records[index]
        cid = rec.get("conv_id") if isinstance(rec, dict) else None
        return f"{self.json_path}[{index}]" + (f" (conv_id {cid})" if cid is not None else "")

    def convert(self, index: int) -> tuple[Conversation, ReleasedInfo]:
        """Record ``index`` as a Conversation, with its image path and mask ids."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range ({len(self)} records)")
        index %= len(self)
        try:
            return released_to_conversation_with_info(
                self.records[index], images_root=self.images_root, lookup=self.lookup, max_rounds=self.max_rounds
            )
        except RecordError as e:
            raise RecordError(f"{self.where(index)}: {e}") from None

    def __getitem__(self, index: int) -> Conversation:
        return self.convert(index)[0]

    def get(self, index: int) -> Conversation | None:
        try:
            return self[index]
        except RecordError as e:
            where = self.where(index % len(self))
            msg = str(e)
            self.skipped.add(where, msg[len(where) + 2 :] if msg.startswith(where + ": ") else msg)
            return None
