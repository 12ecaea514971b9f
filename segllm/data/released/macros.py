"""Parse the bracket macros of SegLLM's released conversation files, and write them back.

A released record is ``{"task": "segmentation", "base": ..., "conversations": [turn, ...],
"conv_id"?: ...}`` with turns ``{"from": "human" | "gpt", "value": str, "ind"?: int | [int]}``.
Inside a turn's text, a bracket matching ``\\[[^\\]]+\\]`` is a macro when it contains one of
``IMAGE256``, ``MASK-ENCODE``, ``BOX-ENCODE`` or ``MASK-DECODE``; any other bracket (``[REF:1]``,
``[sic]``) is ordinary text.

=================  ==================================================================  ===========
macro              payload                                                             model input
=================  ==================================================================  ===========
IMAGE256           image path relative to the images folder                            256 slots
MASK-ENCODE        ``image|dataset|mask_id``                                           1 slot
BOX-ENCODE         ``image|dataset|mask_id``                                           1 slot
MASK-DECODE (old)  ``image|dataset|tgt_id``                                            ``<seg>``
MASK-DECODE (new)  ``task:ref_id:tgt_id:image:dataset`` or                             ``<seg>``
                   ``task:ref_id:ref_id2:tgt_id:image:dataset``
=================  ==================================================================  ===========

Ids: ``''``, ``"'"`` and ``'none'`` mean no id; an id containing ``_`` or ``-`` stays a string;
any other id must be an integer. A reference id of 0 counts as none.

:func:`parse_record` turns a record into a :class:`ParsedRecord` (turns made of text pieces
and macro objects); :meth:`ParsedRecord.to_record` writes it back. Parsed macros remember their
source text, so an unedited record is written back unchanged; macros built in code are written
in a canonical form (:meth:`format`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from segllm.data.records import RecordError

MaskId = int | str | None

BRACKET = re.compile(r"\[[^\]]+\]")
MACRO_NAMES = ("IMAGE256", "MASK-ENCODE", "BOX-ENCODE", "MASK-DECODE")
NONE_IDS = ("", "'", "none")
IMAGE_SLOTS = 256  # placeholders an IMAGE256 macro stands for
# characters that would break a macro if they appeared inside one of its fields
_FORBIDDEN_IN_FIELDS = "[]|:"


# ----------------------------------------------------------------------------------- ids


def parse_id(text: str, *, what: str = "mask id", macro: str = "") -> MaskId:
    """Parse an id field as the original code does: none / string (with '_' or '-') / int."""
    if text is None:
        return None
    if text in NONE_IDS:
        return None
    if "_" in text or "-" in text:
        return text
    try:
        return int(text)
    except ValueError:
        where = f"{macro}: " if macro else ""
        raise RecordError(
            f"{where}{what} {text!r} is not a number, not 'none'/''/\"'\", and has no '_' or '-' to mark it a string id"
        ) from None


def parse_ref_id(text: str, *, macro: str = "") -> MaskId:
    """A reference id: like :func:`parse_id`, and 0 also means none."""
    v = parse_id(text, what="reference id", macro=macro)
    return None if v == 0 else v


def format_id(mask_id: MaskId, *, none: str = "none") -> str:
    """Write an id so that :func:`parse_id` reads it back unchanged."""
    if mask_id is None:
        return none
    if isinstance(mask_id, bool) or not isinstance(mask_id, (int, str)):
        raise RecordError(f"mask id {mask_id!r} must be an int, a str or None")
    text = str(mask_id)
    if isinstance(mask_id, str):
        if not ("_" in text or "-" in text):
            raise RecordError(f"string mask id {mask_id!r} must contain '_' or '-' (else it reads back as a number)")
        _check_field(text, "mask id")
    return text


def _check_field(text: str, what: str) -> None:
    bad = [c for c in _FORBIDDEN_IN_FIELDS if c in text]
    if bad:
        raise RecordError(f"{what} {text!r} contains {''.join(bad)!r}, which cannot appear inside a macro")
    if not text:
        raise RecordError(f"{what} is empty")


# -------------------------------------------------------------------------------- macros


@dataclass(frozen=True)
class ImageMacro:
    """``[IMAGE256:path]``: the conversation's image (256 placeholder slots)."""

    path: str
    source: str | None = field(default=None, compare=False)

    name = "IMAGE256"

    def format(self) -> str:
        if not self.path or "]" in self.path or "[" in self.path:
            raise RecordError(f"image path {self.path!r} cannot be written in an IMAGE256 macro")
        return f"[IMAGE256:{self.path}]"


@dataclass(frozen=True)
class EncodeMacro:
    """``[MASK-ENCODE:image|dataset|mask_id]`` or ``[BOX-ENCODE:...]``: an earlier mask fed back in."""

    kind: Literal["mask", "box"]
    image: str
    dataset: str
    mask_id: MaskId
    source: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return "MASK-ENCODE" if self.kind == "mask" else "BOX-ENCODE"

    def format(self) -> str:
        _check_field(self.image, "image path")
        _check_field(self.dataset, "dataset name")
        # the original's encode path reads '' and "'" as none but not 'none', so write ''
        return f"[{self.name}:{self.image}|{self.dataset}|{format_id(self.mask_id, none='')}]"


@dataclass(frozen=True)
class DecodeMacro:
    """``[MASK-DECODE:...]``: one output mask (``<seg>``), the target ``tgt_id`` of ``dataset``.

    ``form`` is ``"old"`` (``image|dataset|tgt_id``, no reference), ``"new"``
    (``task:ref_id:tgt_id:image:dataset``) or ``"new2"`` (with a second, unused, reference id).
    """

    image: str
    dataset: str
    tgt_id: MaskId
    ref_id: MaskId = None
    ref_id2: MaskId = None
    task: str = "none"
    form: Literal["old", "new", "new2"] = "new"
    source: str | None = field(default=None, compare=False)

    name = "MASK-DECODE"

    def format(self) -> str:
        _check_field(self.image, "image path")
        _check_field(self.dataset, "dataset name")
        if self.form == "old":
            if self.ref_id is not None or self.ref_id2 is not None:
                raise RecordError("the old MASK-DECODE form (image|dataset|tgt_id) has no reference id")
            return f"[MASK-DECODE:{self.image}|{self.dataset}|{format_id(self.tgt_id, none='')}]"
        _check_field(self.task, "task")
        ids = [format_id(self.ref_id)]
        if self.form == "new2":
            ids.append(format_id(self.ref_id2))
        elif self.ref_id2 is not None:
            raise RecordError("a second reference id needs form='new2'")
        ids.append(format_id(self.tgt_id))
        return f"[MASK-DECODE:{self.task}:{':'.join(ids)}:{self.image}:{self.dataset}]"


Macro = ImageMacro | EncodeMacro | DecodeMacro
Piece = str | ImageMacro | EncodeMacro | DecodeMacro


def is_macro_bracket(bracket: str) -> bool:
    """Whether a ``[...]`` bracket is a macro (contains one of :data:`MACRO_NAMES`)."""
    return any(n in bracket for n in MACRO_NAMES)


def parse_macro(bracket: str) -> Macro:
    """Parse one macro bracket, e.g. ``"[MASK-ENCODE:coco/x.jpg|refcoco|12]"``.

    Raises :class:`RecordError` naming the macro and what is wrong with it.
    """
    if not (bracket.startswith("[") and bracket.endswith("]")):
        raise RecordError(f"{bracket!r}: a macro is written [NAME:payload]")
    inner = bracket[1:-1]
    name = next((n for n in MACRO_NAMES if inner.startswith(n + ":")), None)
    if name is None:
        found = [n for n in MACRO_NAMES if n in inner]
        if not found:
            raise RecordError(f"{bracket!r}: not a macro (none of {', '.join(MACRO_NAMES)})")
        raise RecordError(f"{bracket!r}: malformed {found[0]} macro (expected [{found[0]}:payload])")
    payload = inner[len(name) + 1 :]
    if not payload:
        raise RecordError(f"{bracket!r}: the {name} macro has an empty payload")
    if name == "IMAGE256":
        return ImageMacro(payload, source=bracket)
    if name in ("MASK-ENCODE", "BOX-ENCODE"):
        parts = payload.split("|")
        if len(parts) != 3:
            raise RecordError(f"{bracket!r}: {name} needs 3 fields image|dataset|mask_id, found {len(parts)}")
        image, dataset, mid = parts
        _need(bracket, image, "image path")
        _need(bracket, dataset, "dataset name")
        kind = "mask" if name == "MASK-ENCODE" else "box"
        return EncodeMacro(kind, image, dataset, parse_id(mid, macro=bracket), source=bracket)
    # MASK-DECODE: the original tests ':' first, then '|'
    if ":" in payload:
        parts = payload.split(":")
        if len(parts) == 5:
            task, ref, tgt, image, dataset = parts
            ref2, form = None, "new"
        elif len(parts) == 6:
            task, ref, ref2, tgt, image, dataset = parts
            form = "new2"
        else:
            raise RecordError(
                f"{bracket!r}: MASK-DECODE needs task:ref_id:tgt_id:image:dataset (or with a second ref_id), "
                f"found {len(parts)} ':'-separated fields"
            )
        _need(bracket, image, "image path")
        _need(bracket, dataset, "dataset name")
        return DecodeMacro(
            image,
            dataset,
            parse_id(tgt, what="target id", macro=bracket),
            ref_id=parse_ref_id(ref, macro=bracket),
            ref_id2=None if ref2 is None else parse_ref_id(ref2, macro=bracket),
            task=task,
            form=form,
            source=bracket,
        )
    if "|" in payload:
        parts = payload.split("|")
        if len(parts) != 3:
            raise RecordError(
                f"{bracket!r}: old-form MASK-DECODE needs image|dataset|tgt_id, found {len(parts)} fields"
            )
        image, dataset, tgt = parts
        _need(bracket, image, "image path")
        _need(bracket, dataset, "dataset name")
        return DecodeMacro(image, dataset, parse_id(tgt, what="target id", macro=bracket), form="old", source=bracket)
    raise RecordError(f"{bracket!r}: MASK-DECODE payload has neither ':' nor '|' separators")


def _need(bracket: str, value: str, what: str) -> None:
    if not value:
        raise RecordError(f"{bracket!r}: the {what} is empty")


def split_text(text: str) -> list[Piece]:
    """Split a turn's text into text pieces and parsed macros, in order (non-macro brackets stay text)."""
    pieces: list[Piece] = []
    pos = 0
    for m in BRACKET.finditer(text):
        if not is_macro_bracket(m.group(0)):
            continue
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        pieces.append(parse_macro(m.group(0)))
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


def join_pieces(pieces: Sequence[Piece]) -> str:
    """Inverse of :func:`split_text`: parsed macros are written as their source text."""
    return "".join(p if isinstance(p, str) else (p.source or p.format()) for p in pieces)


def plain_text(pieces: Sequence[Piece], *, replace: Callable[[Macro], str] | None = None) -> str:
    """The text with macros removed (or replaced by ``replace(macro)``), spaces collapsed, stripped."""
    out = "".join(p if isinstance(p, str) else (replace(p) if replace else " ") for p in pieces)
    return re.sub(r"[ \t]{2,}", " ", out).strip()


# ----------------------------------------------------------------------------------- ind


NO_REFERENCE = -1  # the original's "this turn refers to no earlier round" (its demos write "ind": [-1])


def parse_ind(ind: Any) -> tuple[int, ...]:
    """A human turn's ``ind``: an int or a list of ints (1-based earlier rounds).

    ``-1`` means no reference: the original's inference code writes ``"ind": [-1]`` on a turn
    without MASK-ENCODE / BOX-ENCODE and pads its reference list with -1, so an ``ind`` of only
    -1 entries reads as ``()``. Mixed with round numbers it would shift which encode each number
    belongs to (the original indexes encodes by position), so that is refused.
    """
    items = ind if isinstance(ind, (list, tuple)) else [ind]
    out = []
    for x in items:
        if isinstance(x, bool):
            raise RecordError(f"'ind' entry {x!r} is not a round number")
        try:
            k = int(x)
        except (TypeError, ValueError):
            raise RecordError(f"'ind' entry {x!r} is not a round number") from None
        if isinstance(x, float) and k != x:
            raise RecordError(f"'ind' entry {x!r} is not a whole round number")
        if k < 1 and k != NO_REFERENCE:
            raise RecordError(f"'ind' entry {k} is not a 1-based round number (or -1 for no reference)")
        out.append(k)
    if NO_REFERENCE in out:
        if any(k != NO_REFERENCE for k in out):
            raise RecordError(f"'ind' {ind!r} mixes -1 (no reference) with round numbers")
        return ()
    return tuple(out)


# --------------------------------------------------------------------------------- record


@dataclass
class Turn:
    """One turn: speaker, its text split into text pieces and macros, and ``ind`` (human turns)."""

    speaker: Literal["human", "gpt"]
    pieces: list[Piece]
    ind: tuple[int, ...] | None = None
    raw_ind: Any = None  # the 'ind' value as stored, written back unchanged when unedited
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> str:
        return join_pieces(self.pieces)

    @property
    def macros(self) -> list[Macro]:
        return [p for p in self.pieces if not isinstance(p, str)]

    @property
    def text(self) -> str:
        """The text with every macro removed."""
        return plain_text(self.pieces)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"from": self.speaker, "value": self.value}
        if self.ind is not None:
            if self.raw_ind is not None and parse_ind(self.raw_ind) == self.ind:
                d["ind"] = self.raw_ind
            else:
                d["ind"] = list(self.ind)
        d.update(self.extra)
        return d


_TOP_KEYS = ("task", "base", "conversations", "conv_id")


@dataclass
class ParsedRecord:
    """A released conversation record in structured form."""

    turns: list[Turn]
    task: str | None = "segmentation"
    base: Any = None
    conv_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, kept as they are

    @property
    def image(self) -> ImageMacro | None:
        """The first IMAGE256 macro of the record."""
        for t in self.turns:
            for m in t.macros:
                if isinstance(m, ImageMacro):
                    return m
        return None

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        if self.task is not None:
            rec["task"] = self.task
        rec["base"] = self.base
        rec["conversations"] = [t.to_dict() for t in self.turns]
        if self.conv_id is not None:
            rec["conv_id"] = self.conv_id
        rec.update(self.extra)
        return rec


def parse_turn(turn: Any, index: int) -> Turn:
    if not isinstance(turn, dict):
        raise RecordError(f"turn {index + 1} is not an object")
    speaker = turn.get("from")
    if speaker not in ("human", "gpt"):
        raise RecordError(f"turn {index + 1}: 'from' is {speaker!r}, expected 'human' or 'gpt'")
    value = turn.get("value")
    if not isinstance(value, str):
        raise RecordError(f"turn {index + 1}: 'value' is not text")
    try:
        pieces = split_text(value)
        ind = parse_ind(turn["ind"]) if "ind" in turn and turn["ind"] is not None else None
    except RecordError as e:
        raise RecordError(f"turn {index + 1}: {e}") from None
    extra = {k: v for k, v in turn.items() if k not in ("from", "value", "ind")}
    return Turn(speaker, pieces, ind, turn.get("ind"), extra)


def parse_record(record: Any) -> ParsedRecord:
    """Parse a released record; raises :class:`RecordError` naming the turn and macro at fault."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a {type(record).__name__}, not an object")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError("record has no 'conversations' list")
    turns = [parse_turn(t, i) for i, t in enumerate(convs)]
    return ParsedRecord(
        turns,
        task=record.get("task"),
        base=record.get("base"),
        conv_id=record.get("conv_id"),
        extra={k: v for k, v in record.items() if k not in _TOP_KEYS},
    )


# ---------------------------------------------------------------------------- image paths


def image_path_candidates(path: str, *, decode_rules: bool = False) -> list[str]:
    """The relative paths the original code would try for an image, in order.

    For MASK-ENCODE / BOX-ENCODE / MASK-DECODE payloads (``decode_rules``) it always maps
    ``val2014`` to ``train2014``, drops ``new_`` and puts ``VG_100K*`` paths under ``vg/``;
    for IMAGE256 it uses the path as given. Then, when that file is missing, ``val2017`` ->
    ``train2017`` (and, as the original also does, ``images/`` -> ``object365/``). The other
    rule set follows as a last resort, so a path resolves whichever macro it came from.
    """

    def fixed(p: str) -> str:
        p = p.replace("val2014", "train2014").replace("new_", "")
        if "VG_100K" in p:
            q = p[2:] if p.startswith("./") else p
            if not q.startswith("vg/"):
                p = "vg/" + q
        return p

    def with_missing_rules(p: str) -> list[str]:
        return [
            p,
            p.replace("val2017", "train2017"),
            p.replace("val2017", "train2017").replace("images/", "object365/"),
        ]

    first, second = (fixed(path), path) if decode_rules else (path, fixed(path))
    out: list[str] = []
    for p in with_missing_rules(first) + with_missing_rules(second):
        if p not in out:
            out.append(p)
    return out


def resolve_image_path(images_root: str | Path, path: str, *, decode_rules: bool = False) -> Path:
    """The first existing file among :func:`image_path_candidates` under ``images_root``."""
    root = Path(images_root)
    for p in image_path_candidates(path, decode_rules=decode_rules):
        full = root / p
        if full.is_file():
            return full
    raise RecordError(f"image {path!r} not found under {root} (also tried the original's path fix-ups)")


def canonical_image_name(path: str) -> str:
    """The file name an image path refers to after the fix-ups (for comparing macro images)."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.replace("val2014", "train2014").replace("val2017", "train2017").replace("new_", "")
