"""A conversation about one image, round by round: what the CLI, the web demo and evaluation use.

``Session`` holds what earlier rounds computed so that a new round costs only its new work (a
:class:`segllm.model.rounds.Dialogue`; the rounds themselves are run by
:class:`segllm.model.rounds.RoundEngine`, the Session adds the history, references and exports):

- the image's vision tokens and the mask decoder's image features, computed once per image;
- the LLM's key/value cache over everything said so far; a new round feeds only its own
  tokens (the question, the placeholders of the earlier masks it refers to, the answer);
- the memory tokens of each earlier mask, computed once when first referred to;
- only the new round's masks are decoded.

``undo`` and ``reset`` cut the cache back. ``incremental=False`` runs the old way (the whole
conversation from scratch every round, as the released demo does); both give the same
answers and masks (up to float rounding), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from segllm.config import MAX_NEW_TOKENS
from segllm.conversation import Conversation, Round, load_image, parse_refs
from segllm.decoders.base import mask_to_frame
from segllm.default import load_model
from segllm.errors import ConversationError, MaskError
from segllm.export import save_masks, session_to_coco
from segllm.model.memory import mask_boxes
from segllm.model.rounds import Dialogue, RoundEngine, masks_referable
from segllm.viz import mask_labels, overlay


@dataclass
class Reply:
    """One round's result.

    Attributes:
        round: 1-indexed round number.
        question: the question as the model read it (``[REF:k]`` macros removed).
        refs: the earlier rounds whose masks were fed back.
        text: the answer, with ``<seg>`` where masks were produced.
        masks: [S, H, W] bool at the image's resolution, one per ``<seg>``.
        boxes: [S, 4] (x0, y0, x1, y1) pixels, exclusive end.
        scores: [S] predicted IoU of each mask.
        forced: the model answered without ``<seg>`` and one mask was asked for explicitly.
        frame_masks: [S, Sd, Sd] bool, the masks in the mask decoder's square input frame (the
            padding included), which models whose memory crops earlier masks in that frame (the
            released SegLLM) feed back; None where a round was answered by a full recompute.
        user: the round's mask was given by the user (:meth:`Session.add_region`), not predicted.
    """

    round: int
    question: str
    refs: tuple[int, ...]
    text: str
    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    forced: bool = False
    frame_masks: np.ndarray | None = None
    user: bool = False

    def memory_masks(self, frame_memory: bool) -> np.ndarray:
        """The masks as the mask memory reads them: ``frame_masks`` where it crops in the
        decoder frame (``RoundEngine.frame_memory``, the released memory path), else ``masks``."""
        return self.frame_masks if frame_memory else self.masks

    def memory_input(self, j: int, frame_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The j-th mask as the memory reads it and its box: what ``RoundEngine.extend`` asks for."""
        return torch.tensor(self.memory_masks(frame_memory)[j]), torch.as_tensor(self.boxes[j])


REGION_QUESTION = "Segment {label}."  # how a user's region round reads in the conversation text
REGION_LABEL = "the region I marked"


class Session:
    """Segment objects in one image through a conversation.

    Args:
        model: a :class:`segllm.SegLLM` (put in eval mode here).
        image: the image (path, PIL image or array); or call :meth:`set_image` later.
        incremental: reuse earlier rounds' work (default); False recomputes everything.
        max_new_tokens: longest answer generated per round.
        force_mask: when the model answers without ``<seg>``, ask for one mask anyway (as
            the released demo always does).
    """

    def __init__(self, model, image=None, *, incremental: bool = True, max_new_tokens: int = MAX_NEW_TOKENS, force_mask: bool = True) -> None:
        self.model = model.eval()
        self.incremental = incremental
        self.max_new_tokens = max_new_tokens
        self.force_mask = force_mask
        self.image: np.ndarray | None = None
        self.history: list[Reply] = []
        self._engine = RoundEngine(self.model)
        self._state: Dialogue | None = None  # the incremental state of the conversation
        if image is not None:
            self.set_image(image)

    @classmethod
    def from_pretrained(
        cls, path=None, image=None, *, revision: str | None = None, device: str | None = None, dtype=None,
        quantize: str | None = None, mask_region: str | None = None, compile: bool = False, edge_filter: bool | None = None,
        **kwargs
    ) -> Session:
        """A session on the model in folder ``path`` or at hub id ``path`` (``org/name[/subfolder][@revision]``,
        see :mod:`segllm.hub`); default: the bundled model. ``revision``, ``device``, ``dtype``,
        ``quantize``, ``mask_region``, ``compile`` and ``edge_filter`` go to :func:`segllm.default.load_model`, the
        other keywords to :class:`Session`."""
        model = load_model(path, revision=revision, device=device, dtype=dtype, quantize=quantize, mask_region=mask_region, compile=compile,
                           edge_filter=edge_filter)
        return cls(model, image, **kwargs)

    # -- exporting -------------------------------------------------------------------------
    def save_masks(self, folder) -> list:
        """Every round's masks as ``round{k}_mask{j}.png`` in ``folder``."""
        return save_masks(self.history, folder)

    def to_coco(self, *, file_name: str = "image.png") -> dict:
        """The session as COCO-style JSON data (masks as compressed RLE, one annotation per mask)."""
        self._need_image()
        return session_to_coco(self.history, self.image.shape[:2], file_name=file_name)

    def overlay(self, rounds=None):
        """The image with the masks of ``rounds`` (round numbers; default: every round), each round
        in its own colour and numbered (a round's several masks k.1, k.2, ... in the answer's
        order) (PIL image)."""
        self._need_image()
        if rounds is not None:
            rounds = set(rounds)
            missing = sorted(k for k in rounds if not 1 <= k <= len(self.history))
            if missing:
                raise ConversationError(f"no round {', '.join(map(str, missing))}: the conversation has {len(self.history)}")
        shown = [r for r in self.history if rounds is None or r.round in rounds]
        labels = [lab for r in shown for lab in mask_labels(r.round, len(r.masks))]
        return overlay(self.image, [(r.round, m) for r in shown for m in r.masks], labels=labels)

    # -- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_image(self, image) -> None:
        """Use a new image (and start a new conversation); its features are computed once here."""
        self.image = load_image(image)
        self.history = []
        self._state = self._engine.open(self._engine.encode_image(self.image)) if self.incremental else None

    def reset(self) -> None:
        """Forget every round (keep the image and its features)."""
        self._need_image()
        self.history = []
        if self._state is not None:
            self._state.truncate(0)

    def undo(self) -> Reply | None:
        """Drop the last round; returns it (None when there is none)."""
        if not self.history:
            return None
        last = self.history.pop()
        if self._state is not None:
            self._state.truncate(len(self.history))
        return last

    @property
    def conversation(self) -> Conversation:
        """The conversation so far (answers and masks are the model's own)."""
        self._need_image()
        return Conversation(self.image, [Round(r.question, r.refs, r.text, list(r.masks)) for r in self.history])

    # -- asking ----------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, question: str, refs=None, *, answer: str | None = None, exact_refs: bool = False) -> Reply:
        """Ask one round.

        Args:
            question: the text. ``[REF:k]`` macros are read as references and removed;
                "instance k" (kept in the text) refers to round k too.
            refs: earlier rounds (1-indexed) to feed back, in addition to those in the text.
                Without any reference, earlier rounds are seen as text only.
            answer: force this answer text (e.g. ``"<seg>"``) instead of generating one.
            exact_refs: the question is taken as is and ``refs`` are exactly the rounds fed
                back (no ``[REF:k]`` or "instance k" reading), as an evaluation replays a
                dataset's conversation.

        Raises:
            ConversationError: empty question, or a reference to a round that does not exist.
            MaskError: a reference to a round whose mask is empty.
            ContextTooLongError: the conversation no longer fits the LLM's context.
        """
        self._need_image()
        if not isinstance(question, str) or not question.strip():
            raise ConversationError("the question is empty")
        text, found = (question.strip(), ()) if exact_refs else parse_refs(question)
        all_refs = tuple(sorted(set(found) | {int(k) for k in (refs or ())}))
        n = len(self.history) + 1
        if not text:  # before validation, whose "the question is empty" would not say why
            raise ConversationError("the question is empty once [REF:k] is removed")
        conv = self.conversation
        conv.rounds.append(Round(text, all_refs))
        conv.validate(allow_open_last=True, check_refs=not self._frame_memory)  # names a missing round or an empty mask
        if self._frame_memory:
            # the memory reads the masks in the decoder frame, which may hold pixels in the padding
            for k in all_refs:
                if not self.referable(k):
                    raise MaskError(f"round {n} refers to round {k}, whose mask is empty (zero area)")
        # the engine answers the round (and, with force_mask, asks for a mask where the answer
        # has none); on an error it leaves the cache as it was
        options = dict(answer=answer, max_new_tokens=self.max_new_tokens, force_mask=self.force_mask)
        if self.incremental:
            r = self._engine.extend(self._state, conv, self._memory_mask, **options)
            frame_masks = r.frame_masks
        else:
            r = self._engine.recompute(conv, **options)
            frame_masks = None  # as documented on Reply: only incremental rounds keep them
        reply = Reply(r.round, text, all_refs, r.text, r.masks, r.boxes, r.scores, forced=r.forced, frame_masks=frame_masks)
        self.history.append(reply)
        assert reply.round == n
        return reply

    @torch.no_grad()
    def add_region(self, *, mask=None, box=None, point=None, label: str | None = None, point_radius: int | None = None) -> Reply:
        """Record a round whose mask the user gives; later rounds refer to it like any round
        (``refs=[k]``, ``[REF:k]`` or "instance k"), and the mask memory encodes it as it encodes
        the model's own masks.

        The round reads ``"Segment {label}."`` answered ``"<seg>"`` in the conversation's text,
        so the LLM's history holds an ordinary round; its mask is the user's, never predicted.

        Args:
            mask: [H, W] bool (or 0/1, or 0/255) at the image's resolution.
            box: (x0, y0, x1, y1) image pixels, x1/y1 exclusive: the region is the filled box
                (clipped to the image).
            point: (x, y) image pixels: the region is a disk of ``point_radius`` pixels around it
                (default 2% of the longest side, at least 2).
            label: what the region is, in words (default "the region I marked").

        Exactly one of ``mask``, ``box`` and ``point``.

        Raises:
            MaskError: none or several of mask/box/point, a mask of the wrong size or empty, a
                box or point outside the image.
        """
        self._need_image()
        region = _region_mask(self.image.shape[:2], mask=mask, box=box, point=point, radius=point_radius)
        label = (label or "").strip() or REGION_LABEL
        text = REGION_QUESTION.format(label=label)
        conv = self.conversation
        conv.rounds.append(Round(text, ()))
        frame_masks = None
        if self.incremental:
            # the round's tokens go into the LLM's cache like any round's; the mask the engine
            # decodes for its <seg> is replaced by the user's
            r = self._engine.extend(self._state, conv, self._memory_mask, answer="<seg>")
            frame = self._state.image.frame
            frame_masks = mask_to_frame(torch.from_numpy(region), frame).numpy()[None]
            answer = r.text
        else:
            answer = "<seg>"
        box_xyxy = mask_boxes(torch.from_numpy(region)[None])[0].numpy() if box is None else np.asarray(_clip_box(box, region.shape), np.float32)
        reply = Reply(len(self.history) + 1, text, (), answer, region[None], box_xyxy[None].astype(np.float32), np.ones(1, np.float32),
                      frame_masks=frame_masks, user=True)
        self.history.append(reply)
        return reply

    def referable(self, k: int) -> bool:
        """Whether a later round may refer to round ``k``: its masks, as the memory reads them
        (in the decoder frame or at image resolution), are not all empty."""
        return masks_referable(self.history[k - 1].memory_masks(self._frame_memory))

    @property
    def _frame_memory(self) -> bool:
        return self.incremental and self._engine.frame_memory

    def _memory_mask(self, k: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round k's j-th mask as the memory reads it, and its box (see ``RoundEngine.extend``)."""
        return self.history[k - 1].memory_input(j, self._frame_memory)

    def _need_image(self) -> None:
        if self.image is None:
            raise ConversationError("no image: call set_image() first")


def _clip_box(box, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) clipped to an image of ``shape`` (H, W); refused when nothing is left."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise MaskError(f"a box is four numbers (x0, y0, x1, y1), not {box!r}") from e
    h, w = shape
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
    if not (cx1 - cx0 >= 1 and cy1 - cy0 >= 1):
        raise MaskError(f"the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) covers no pixel of the {w}x{h} image")
    return cx0, cy0, cx1, cy1


def _region_mask(shape: tuple[int, int], *, mask=None, box=None, point=None, radius: int | None = None) -> np.ndarray:
    """A user's region as an [H, W] bool mask, from exactly one of a mask, a box or a point."""
    given = [name for name, v in (("mask", mask), ("box", box), ("point", point)) if v is not None]
    if len(given) != 1:
        raise MaskError(f"a region is exactly one of mask, box or point; got {', '.join(given) or 'none'}")
    h, w = shape
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 3 and m.shape[2] in (1, 3, 4):  # an image file's channels: any non-zero pixel counts
            m = m.any(axis=2)
        if m.shape != (h, w):
            raise MaskError(f"the region mask is {'x'.join(map(str, m.shape[::-1]))} but the image is {w}x{h}")
        m = m.astype(bool)
    elif box is not None:
        x0, y0, x1, y1 = _clip_box(box, shape)
        m = np.zeros((h, w), bool)
        m[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
    else:
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError) as e:
            raise MaskError(f"a point is two numbers (x, y), not {point!r}") from e
        if not (0 <= x < w and 0 <= y < h):
            raise MaskError(f"the point ({x:g}, {y:g}) is outside the {w}x{h} image")
        r = max(2, round(0.02 * max(h, w))) if radius is None else int(radius)
        yy, xx = np.mgrid[:h, :w]
        m = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r
        m[int(y), int(x)] = True
    if not m.any():
        raise MaskError("the region is empty (zero area)")
    return m


__all__ = ["Reply", "Session"]
