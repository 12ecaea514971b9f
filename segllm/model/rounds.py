"""The round engine: one round of a conversation, from its question to its masks.

A round is: render its tokens (the template, the image placeholders before the first round, one
``<mask>``/``<box>`` per earlier mask it refers to), put the image and memory features into their
placeholders, run the LLM (over the whole conversation, or only the round's tokens on top of a
key/value cache), answer (greedy generation, or a given answer), take the LLM state that
predicted each ``<seg>`` (and, with ``prompt_head.attend_round``, the states of the round's
tokens before it), turn them into prompts and decode the masks.

Every inference path runs its rounds here:

- :class:`segllm.session.Session` keeps a :class:`Dialogue` (the cache, the encoded image and
  the encoded memory masks) and calls :meth:`RoundEngine.extend` once per round;
- full recomputation (:meth:`segllm.model.segllm.SegLLM.predict` and
  ``Session(incremental=False)``) calls :meth:`RoundEngine.recompute`;
- batch segmentation (:mod:`segllm.batch_segment`) and the own-history evaluation
  (:mod:`segllm.eval.evaluate`) keep many conversations in one :class:`BatchDialogue` and call
  :meth:`RoundEngine.extend_batch` once per round for all of them (given or generated answers);
- teacher-forced evaluation (:meth:`RoundEngine.segment`, every round of a batch of
  conversations in one LLM pass; :meth:`segllm.model.segllm.SegLLM.segment` calls it) and the
  training objective (:mod:`segllm.train.objective`) share :func:`seg_prompts`,
  :func:`seg_context`/:func:`round_context` and :func:`frame_and_image_masks` with the rounds.

The rules for answering live here once: without a given answer, a model that never writes text
answers ``template.fixed_answer`` (:meth:`RoundEngine.answer_to_use`), and with ``force_mask`` a
round so answered without any ``<seg>`` is undone and answered ``"<seg>"`` instead
(:meth:`RoundEngine._with_forced_mask`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache

from segllm.config import MASK_REGIONS, MAX_NEW_TOKENS, EdgeFilterConfig
from segllm.conversation import Conversation, Round
from segllm.decoders.base import (
    SEG,
    Frame,
    frame_to_image,
    image_to_frame,
    logits_to_frame,
    mask_to_output_frame,
    most_confident_region,
)
from segllm.decoders.edge_filter import colour_guided_filter
from segllm.errors import ConversationError, SegLLMError
from segllm.model.kv_cache import GrowingCache
from segllm.model.llm import attention_mask_for
from segllm.model.memory import mask_boxes
from segllm.model.prompt_head import PromptHead
from segllm.processor import Encoded, MemoryItem

if TYPE_CHECKING:  # the model imports this module; the engine only drives a built model
    from segllm.model.segllm import SegLLM

FORCED_ANSWER = "<seg>"  # what a round says when a mask is asked for explicitly


def _with_answer(conv: Conversation, answer: str) -> Conversation:
    """``conv`` with its last (open) round answered ``answer``: the form the processor renders an
    answer's tokens from (no masks: only referenced rounds' masks are read)."""
    last = conv.rounds[-1]
    return Conversation(conv.image, conv.rounds[:-1] + [Round(last.question, last.refs, answer, [])])


# -- shared by every path (and by training) --------------------------------------------------
def context_positions(spans: list[tuple[int, int]]) -> Tensor:
    """[S, T] long: for each ``<seg>`` given as (its round's first token, its own position), the
    positions of the round's tokens before it, -1 padded (T = the longest, at least 1)."""
    rows = [list(range(start, pos)) for start, pos in spans]
    t = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(1, t)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def seg_context(encs: list[Encoded]) -> Tensor:
    """[S, T] positions of each ``<seg>``'s round tokens before it (the user turn and the answer
    so far), -1 padded, for every ``<seg>`` of the rendered conversations in order."""
    return context_positions([(e.round_spans[item.round_index][0], item.pos) for e in encs for item in e.segs])


def round_context(hidden: Tensor, rows: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Gather LLM states [N, T, D] at ``positions`` [N, T] (-1 = padding) of conversations
    ``rows`` [N] from ``hidden`` [B, L, D]; returns them and the [N, T] bool mask of real ones."""
    mask = positions >= 0
    return hidden[rows[:, None], positions.clamp(min=0)], mask


def masks_referable(masks) -> bool:
    """Whether a later round may refer to a round whose masks (as the memory reads them) are
    ``masks`` ([S, H, W] bool): it has at least one and none is empty (an empty mask has no crop
    to encode)."""
    return len(masks) > 0 and all(m.any() for m in masks)


def _cat_contexts(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Round contexts of several groups of ``<seg>`` ([S_i, T_i, D] and mask [S_i, T_i] each) as
    one [S, T, D] and [S, T], T the longest (padding masked out)."""
    if len(parts) == 1:
        return parts[0]
    t = max(c.shape[1] for c, _ in parts)
    ctx = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, t - c.shape[1])) for c, _ in parts])
    return ctx, torch.cat([torch.nn.functional.pad(k, (0, t - k.shape[1])) for _, k in parts])


def seg_prompts(head: PromptHead, seg_hidden: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
    """The prompt tokens [S, K, d] of the ``<seg>`` states [S, D] (in the head's dtype).

    ``context`` [S, T, D] and ``context_mask`` [S, T]: each ``<seg>``'s round states (see
    :func:`round_context`); read only by a head with ``attend_round``, which needs them.
    """
    dtype = head.mlp[0].weight.dtype
    if head.config.attend_round and context is not None:
        return head(seg_hidden.to(dtype), context.to(dtype), context_mask)
    return head(seg_hidden.to(dtype))


def frame_and_image_masks(
    seg_logits: Tensor, frame: Frame, region: str = "all", *, edges: EdgeFilterConfig | None = None,
    frame_images: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """[S, h, w] [SEG] logits of one frame size -> (logits [S, Sd, Sd] in the decoder's square
    input frame, bool masks [S, H, W] at the image's resolution); the frame logits are computed
    once for both resolutions. With ``region="most_confident"`` (``SegLLMConfig.mask_region``)
    the logits outside each mask's most confident region (in the frame) are lowered to at most
    -1, so that both resolutions, and the memory of later rounds, keep only that region. With
    ``edges`` on (``SegLLMConfig.edge_filter``), each mask is then filtered along its image's
    colours; ``frame_images()`` gives the image(s) in the frame ([3, Sd, Sd] or [S, 3, Sd, Sd]
    uint8; called only then)."""
    frame_logits = logits_to_frame(seg_logits, frame)
    if region == "most_confident":
        keep = most_confident_region(frame_logits)
        frame_logits = torch.where(keep, frame_logits, frame_logits.clamp(max=-1.0))
    elif region not in MASK_REGIONS:
        raise ValueError(f"mask region must be one of {list(MASK_REGIONS)}, got {region!r}")
    if edges is not None and edges.on and frame_logits.shape[0]:
        if frame_images is None:
            raise ValueError("the edge filter needs the image in the frame (frame_images)")
        frame_logits = colour_guided_filter(
            frame_logits, frame_images(), iterations=edges.iterations, radius=edges.radius,
            sigma_space=edges.sigma_space, sigma_colour=edges.sigma_colour, margin=edges.margin)
    return frame_logits, frame_to_image(frame_logits, frame) > 0


def _image_in_frame(image: np.ndarray, frame: Frame) -> Tensor:
    """A conversation's image ([H, W, 3] uint8) in the decoder's frame: [3, Sd, Sd] uint8."""
    # (a read-only array, e.g. a decoded image's buffer, is copied: torch warns of those, though only read here)
    return image_to_frame(torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1), frame)


# -- the engine's state ----------------------------------------------------------------------
@dataclass
class EncodedImage:
    """An image encoded once for a whole conversation.

    Attributes:
        pixels: [3, H, W] uint8, the image (masked crops of earlier masks are cut from it).
        tokens: [N, D] the projected vision tokens that fill the image placeholders.
        features: the mask decoder's image features of a batch of one.
        frame: where the image sits in the decoder's square frame.
    """

    pixels: Tensor
    tokens: Tensor
    features: object
    frame: Frame
    _in_frame: Tensor | None = field(default=None, init=False, repr=False)

    def in_frame(self) -> Tensor:
        """The image in the decoder's frame, [3, Sd, Sd] uint8 (made once; for the edge filter)."""
        if self._in_frame is None:
            self._in_frame = image_to_frame(self.pixels, self.frame)
        return self._in_frame


@dataclass
class Dialogue:
    """What a conversation keeps between rounds: the LLM's key/value cache over everything said
    so far, the cache length after the prefix and after each round, and the memory tokens (mask
    [D], box [D]) of each earlier mask, keyed by (1-indexed round, mask index), made once; for a
    decoder that reads referenced masks, also each one's map in its output frame ([h, w])."""

    image: EncodedImage
    cache: DynamicCache
    lengths: list[int]
    memory: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    ref_maps: dict[tuple[int, int], Tensor] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        """How many rounds the cache holds."""
        return len(self.lengths) - 1

    def truncate(self, rounds: int) -> None:
        """Keep only the first ``rounds`` rounds (the cache and the memory of later rounds go)."""
        del self.lengths[rounds + 1 :]
        self.cache.crop(self.lengths[-1])
        for store in (self.memory, self.ref_maps):
            for key in [k for k in store if k[0] > rounds]:
                del store[key]


@dataclass
class Prediction:
    """The model's reply to one round.

    Attributes:
        round: 1-indexed round number.
        text: the answer text (with ``<seg>`` where masks were produced).
        masks: [S, H, W] bool, one per ``<seg>``, at the input image's resolution.
        boxes: [S, 4] float (x0, y0, x1, y1) pixels, x1/y1 exclusive; zeros for an empty mask.
        scores: [S] the decoder's predicted IoU (confidence) of each mask.
        token_ids: the answer's token ids (without the end-of-answer token).
    """

    round: int
    text: str
    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    token_ids: list[int]


@dataclass
class BatchDialogue:
    """B conversations in one key/value cache (batch segmentation; see
    :meth:`RoundEngine.extend_batch`).

    Attributes:
        images: each row's encoded image.
        features: [B, ...] the decoder's features of the B images.
        cache: the LLM's key/value cache over the tokens so far (padding included) of the rows
            in ``cached``, in that order (grown in place: :mod:`segllm.model.kv_cache`).
        attention: [len(cached), T] 1 for a real token of the cache, 0 for padding.
        lengths: each row's count of real tokens (its next token's position).
        cached: the rows the cache holds (all B at first; :meth:`end` drops rows).
        memory: (row, round, mask index) -> (mask token [D], box token [D]), encoded once.
        ref_maps: (row, round, mask index) -> that mask in the decoder's output frame [h, w], for
            a decoder that reads referenced masks.
    """

    images: list[EncodedImage]
    features: Tensor
    cache: Cache
    attention: Tensor
    lengths: list[int]
    cached: list[int] = field(default_factory=list)
    memory: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    ref_maps: dict[tuple[int, int, int], Tensor] = field(default_factory=dict)
    ending: set[int] = field(default_factory=set)
    # row -> (the cache column where its last round began, its length before it), for undo
    _last_round: dict[int, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cached:
            self.cached = list(range(len(self.images)))

    def end(self, rows) -> None:
        """Conversations ``rows`` are over: the next round's pass leaves them out of the cache
        (otherwise each would ride along as a row of padding in every later pass; batch
        segmentation's conversations have 1-8 rounds). An ended row cannot be asked again."""
        self.ending.update(int(b) for b in rows)

    def undo(self, rows) -> None:
        """Take back the last round of ``rows`` (each asked in :meth:`RoundEngine.extend_batch`
        since it last was undone): its tokens stay in the cache, masked out, and the
        row's positions continue from before it, so the row can be asked that round again (as a
        :class:`segllm.session.Session` undoes a round). Memory the round's masks would give is
        made only when a later round refers to them, so none exists yet."""
        for b in rows:
            if b not in self._last_round or b not in self.cached:
                raise ValueError(f"row {b} was not asked in the last round, or has ended: nothing to undo")
            col, length = self._last_round.pop(b)
            self.attention[self.cached.index(b), col:] = 0
            self.lengths[b] = length

    def _drop_ended(self) -> None:
        keep = [i for i, b in enumerate(self.cached) if b not in self.ending]
        if len(keep) == len(self.cached):
            return
        # a prefix (batch segmentation orders rows by their number of rounds) is a view
        index = slice(0, len(keep)) if keep == list(range(len(keep))) else torch.tensor(keep, device=self.attention.device)
        self.cache.batch_select_indices(index)
        self.attention = self.attention[index]
        self.cached = [self.cached[i] for i in keep]


@dataclass
class RoundResult:
    """One answered round.

    Attributes:
        round: 1-indexed round number.
        token_ids: the answer's token ids (without the end-of-answer token).
        text: the answer text, with ``<seg>`` where masks were produced.
        masks: [S, H, W] bool at the image's resolution, one per ``<seg>``.
        boxes: [S, 4] float32 (x0, y0, x1, y1) image pixels, x1/y1 exclusive.
        scores: [S] float32, the decoder's predicted IoU of each mask.
        frame_masks: [S, Sd, Sd] bool, the masks in the decoder's square input frame (padding
            included: a model whose memory crops in that frame feeds these back).
        forced: the answer had no ``<seg>`` and one mask was asked for explicitly.
    """

    round: int
    token_ids: list[int]
    text: str
    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    frame_masks: np.ndarray
    forced: bool = False


@dataclass
class _Answer:
    """The LLM's side of a round: answer token ids (no end token), the states [S, D] that
    predicted each ``<seg>``, and with ``attend_round`` their round contexts [S, T, D] and mask [S, T]."""

    token_ids: list[int]
    seg_hidden: Tensor
    context: Tensor | None = None
    context_mask: Tensor | None = None


@dataclass
class _RowPlan:
    """One row's round in :meth:`RoundEngine.extend_batch`: the tokens that go in one pass (the
    user turn, and a given answer's tokens with its end token), the memory items, the given
    answer's ``<seg>`` positions among those tokens and its token ids without the end token (or
    None and []: the answer is generated, up to ``budget`` tokens)."""

    ids: list[int]
    items: list[MemoryItem]
    seg_pos: list[int] | None
    answer_ids: list[int]
    budget: int


MaskSource = Callable[[int, int], tuple[Tensor, Tensor | None]]
"""(1-indexed round k, mask index j) -> round k's j-th mask as the memory reads it ([H, W] bool,
or [Sd, Sd] in the decoder frame) and its box ([4] image pixels, or None)."""


class RoundEngine:
    """Runs the rounds of a :class:`segllm.model.segllm.SegLLM` (see the module docstring).

    Holds no state of its own: a conversation's state is a :class:`Dialogue`.
    """

    def __init__(self, model: SegLLM) -> None:
        self.model = model

    @property
    def _attend(self) -> bool:
        return self.model.config.prompt_head.attend_round

    def _chunk_attention(self, attention: Tensor, width: int) -> Tensor:
        """The attention mask to give the LLM for a chunk of ``width`` tokens on a cache, from its
        [B, T] mask (:func:`segllm.model.llm.attention_mask_for`)."""
        return attention_mask_for(self.model.llm, attention, width)

    @property
    def frame_memory(self) -> bool:
        """Whether the memory crops earlier masks in the decoder's square frame
        (``memory.crop_frame = "decoder"``, the released model): a caller that keeps masks then
        feeds back ``RoundResult.frame_masks`` (padding included) through :meth:`extend`."""
        return self.model.config.memory.crop_frame == "decoder"

    def answer_to_use(self, answer: str | None) -> str | None:
        """The answer to force for a round: ``answer``, or the model's fixed answer (a model that
        never writes text), or None (generate)."""
        return answer if answer is not None else self.model.config.template.fixed_answer

    # -- per image ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> EncodedImage:
        """[H, W, 3] uint8 -> its vision tokens and mask-decoder features, computed once."""
        m = self.model
        pixels = torch.tensor(image).permute(2, 0, 1)  # a copy: the caller's array may be read-only
        tokens = m.image_features(m.vision.preprocess(pixels)[None].to(m.device))[0]
        dec, frame = m.decoder.preprocess(pixels)
        return EncodedImage(pixels, tokens, m.encode_decoder_image(dec[None].to(m.device)), frame)

    @torch.no_grad()
    def open(self, image: EncodedImage) -> Dialogue:
        """A conversation about ``image``: the tokens before the first round (the image's
        included) run through the LLM into a fresh key/value cache."""
        m = self.model
        ids, image_pos = m.processor.prefix_ids()
        rows = torch.zeros(len(image_pos), dtype=torch.long, device=m.device)
        slot = (m.processor.image_id, rows, torch.tensor(image_pos, device=m.device), image.tokens)
        embeds = m.inject(torch.tensor([ids], device=m.device), [slot])
        cache = DynamicCache()
        m.llm.get_decoder()(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        return Dialogue(image, cache, [len(ids)])

    @torch.no_grad()
    def encode_memory(self, image: EncodedImage, mask: Tensor, box: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One earlier mask's LLM tokens (mask [D], box [D]), at inference scale.

        ``mask``: [H, W] bool, or [Sd, Sd] in the decoder frame with ``memory.crop_frame =
        "decoder"``; ``box``: the decoder's box for it ([4] image pixels), used with
        ``memory.box_source = "decoder"``.
        """
        mask_tok, box_tok = self.encode_memories([(image, mask, box)])
        return mask_tok[0], box_tok[0]

    @torch.no_grad()
    def encode_memories(self, masks: Sequence[tuple[EncodedImage, Tensor, Tensor | None]]) -> tuple[Tensor, Tensor]:
        """Several earlier masks (each with its image and box, as :meth:`encode_memory` takes
        them) through the vision tower at once: (mask tokens [M, D], box tokens [M, D])."""
        m = self.model
        crops, boxes = zip(*(m.memory.inputs(image.pixels, mask, box, vision=m.vision) for image, mask, box in masks))
        return m.memory.tokens(torch.stack(crops).to(m.device), torch.stack(boxes), vision=m.vision, projector=m.projector, dtype=m.dtype)

    # -- one round, incrementally -----------------------------------------------------------
    @torch.no_grad()
    def extend(
        self, dialogue: Dialogue, conv: Conversation, masks: MaskSource | None, *, answer: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS, force_mask: bool = False,
    ) -> RoundResult:
        """Answer the last round of ``conv`` on top of ``dialogue``, which holds its earlier rounds.

        Only the round's own tokens run through the LLM; the memory tokens of the earlier masks
        it refers to are made once per mask (from ``masks``) and kept in ``dialogue``. On
        success the dialogue holds the round; on any error it is left as it was.

        Args:
            dialogue: the conversation's state (``dialogue.rounds == len(conv.rounds) - 1``).
            conv: the conversation, its last round open (earlier rounds answered, with masks).
            masks: where the memory reads earlier masks from (see :data:`MaskSource`; only called
                for masks not yet in ``dialogue.memory``, so None does for a round without refs).
            answer: force this answer; default the model's fixed answer, else generate.
            max_new_tokens: longest generated answer.
            force_mask: when a generated answer has no ``<seg>``, answer ``"<seg>"`` instead.
        """
        if dialogue.rounds != len(conv.rounds) - 1:
            raise ConversationError(f"the dialogue holds {dialogue.rounds} round(s); round {len(conv.rounds)} cannot follow them")
        try:
            result = self._with_forced_mask(
                lambda a: self._extend(dialogue, conv, masks, a, max_new_tokens), answer, force_mask,
                lambda: dialogue.cache.crop(dialogue.lengths[-1]),
            )
        except BaseException:
            dialogue.cache.crop(dialogue.lengths[-1])  # whatever failed, the dialogue stays as it was
            raise
        dialogue.lengths.append(dialogue.cache.get_seq_length())
        return result

    def _extend(self, dialogue: Dialogue, conv: Conversation, masks: MaskSource | None, answer: str | None, max_new_tokens: int) -> RoundResult:
        m = self.model
        proc, dev = m.processor, m.device
        i = len(conv.rounds) - 1
        offset = dialogue.lengths[-1]
        u_ids, items = proc.user_ids(conv, i, offset)
        slots = []
        if items:
            feats = [self._memory(dialogue, masks, it.ref_round, it.mask_index) for it in items]
            zeros = torch.zeros(len(items), dtype=torch.long, device=dev)
            slots.append((proc.mask_id, zeros, torch.tensor([it.mask_pos - offset for it in items], device=dev), torch.stack([f[0] for f in feats])))
            boxed = [(it, f) for it, f in zip(items, feats) if it.box_pos >= 0]
            if boxed:
                slots.append((proc.box_id, zeros[: len(boxed)], torch.tensor([it.box_pos - offset for it, _ in boxed], device=dev), torch.stack([f[1] for _, f in boxed])))
        if answer is None:
            embeds = m.inject(torch.tensor([u_ids], device=dev), slots)
            out = self._generate(embeds, dialogue.cache, max_new_tokens=max_new_tokens, past_length=offset, round_start=0, num_rounds=i + 1)
        else:
            forced = _with_answer(conv, answer)
            a_ids, segs = proc.answer_ids(forced, i, offset + len(u_ids))
            ids = u_ids + a_ids
            proc.check_length(offset + len(ids), i + 1, reserve=0)
            embeds = m.inject(torch.tensor([ids], device=dev), slots)
            out = self._teacher_forced(embeds, dialogue.cache, a_ids[:-1], [s.pos - offset for s in segs], round_start=0)
        refs = conv.rounds[i].refs
        ref_map = dialogue.ref_maps.get((refs[0], 0)) if refs else None
        return self._result(i + 1, out, dialogue.image.features, dialogue.image.frame, self._ref_maps(ref_map, out.seg_hidden.shape[0]),
                            dialogue.image.in_frame)

    def _memory(self, dialogue: Dialogue, masks: MaskSource | None, k: int, j: int) -> tuple[Tensor, Tensor]:
        if (k, j) not in dialogue.memory:
            if masks is None:
                raise ValueError(f"the round refers to round {k}'s masks, which the dialogue has not encoded: pass masks")
            mask, box = masks(k, j)
            dialogue.memory[(k, j)] = self.encode_memory(dialogue.image, mask, box)
            if self.model.uses_ref_masks:
                dialogue.ref_maps[(k, j)] = self.ref_map(mask, dialogue.image.frame)
        return dialogue.memory[(k, j)]

    def ref_map(self, mask: Tensor, frame: Frame) -> Tensor:
        """An earlier mask (as a :data:`MaskSource` gives it) as the decoder reads it: [h, w]
        float in its output frame, on the model's device."""
        return mask_to_output_frame(torch.as_tensor(mask).cpu(), frame, self.model.decoder.output_size).to(self.model.device)

    def _ref_maps(self, ref_map: Tensor | None, n: int) -> Tensor | None:
        """The decoder's ``ref_masks`` for n ``<seg>`` of one round: [n, h, w] (zeros where the
        round refers to nothing), or None for a model whose decoder does not read them."""
        if not self.model.uses_ref_masks:
            return None
        if ref_map is None:
            g = self.model.decoder.output_size
            return torch.zeros(n, g, g, device=self.model.device)
        return ref_map.expand(n, -1, -1)

    # -- one round, from scratch ------------------------------------------------------------
    @torch.no_grad()
    def recompute(self, conv: Conversation, *, answer: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS, force_mask: bool = False) -> RoundResult:
        """Answer the last round of ``conv`` running the whole conversation through the LLM.

        Earlier rounds must have their answers and masks; the last round's answer is ``answer``,
        else its own answer, else the model's fixed answer, else generated greedily.
        """
        if not conv.rounds:
            raise ConversationError("conversation has no rounds")
        own = conv.rounds[-1].answer
        return self._with_forced_mask(lambda a: self._recompute(conv, a, max_new_tokens), answer if answer is not None else own, force_mask)

    def _recompute(self, conv: Conversation, answer: str | None, max_new_tokens: int) -> RoundResult:
        m = self.model
        n = len(conv.rounds)
        last = conv.rounds[-1]
        if answer is not None:
            # placeholder masks only satisfy validation: the last round's masks are what we predict
            forced = Round(last.question, last.refs, answer, [np.ones(conv.size, bool)] * answer.count("<seg>"))
            conv = Conversation(conv.image, conv.rounds[:-1] + [forced])
        batch = m.prepare([conv], open_last=answer is None, targets=False).to(m.device)
        embeds = m.embed(batch)
        enc = batch.encoded[0]
        start = enc.round_spans[-1][0]
        if answer is None:
            out = self._generate(embeds, None, max_new_tokens=max_new_tokens, past_length=0, round_start=start, num_rounds=n)
        else:
            u_len = len(m.processor.user_ids(conv, n - 1, start)[0])
            seg_pos = [s.pos for s in enc.segs if s.round_index == n - 1]
            out = self._teacher_forced(embeds, None, enc.input_ids[start + u_len : -1], seg_pos, round_start=start)
        features = m.encode_decoder_image(batch.decoder_input()[:1]) if out.seg_hidden.shape[0] else None
        ref_map = self.ref_map(torch.as_tensor(np.asarray(conv.rounds[last.refs[0] - 1].masks[0])), batch.frames[0]) if last.refs and m.uses_ref_masks else None
        return self._result(n, out, features, batch.frames[0], self._ref_maps(ref_map, out.seg_hidden.shape[0]),
                            lambda: _image_in_frame(conv.image, batch.frames[0]))

    # -- the shared steps -------------------------------------------------------------------
    def _with_forced_mask(self, run: Callable[[str | None], RoundResult], answer: str | None, force_mask: bool, rewind: Callable[[], None] | None = None) -> RoundResult:
        """The round answered by ``run(answer)`` (``answer`` or the fixed answer; None generates);
        with ``force_mask``, a generated answer without ``<seg>`` is undone (``rewind``) and the
        round answered ``"<seg>"`` instead."""
        result = run(self.answer_to_use(answer))
        if force_mask and answer is None and result.masks.shape[0] == 0:
            if rewind is not None:
                rewind()
            result = run(FORCED_ANSWER)
            result.forced = True
        return result

    def _teacher_forced(self, embeds: Tensor, cache: DynamicCache | None, token_ids: list[int], seg_pos: list[int], *, round_start: int) -> _Answer:
        """One LLM pass over ``embeds`` [1, T, D] (on ``cache`` if given, which it extends), which
        end with the given answer; ``seg_pos``: the ``<seg>`` positions within ``embeds``."""
        decoder = self.model.llm.get_decoder()
        if cache is None:
            hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
        else:
            past, T = cache.get_seq_length(), embeds.shape[1]
            # on a filled cache, the causal mask with its offset given directly (see attention_mask_for)
            att = None
            if past and T > 1:
                att = self._chunk_attention(torch.ones(1, past + T, dtype=torch.long, device=embeds.device), T)
            hidden = decoder(inputs_embeds=embeds, attention_mask=att, past_key_values=cache, use_cache=True).last_hidden_state
        pos = torch.tensor(seg_pos, dtype=torch.long, device=hidden.device)
        out = _Answer(list(token_ids), hidden[0, pos - 1])
        if self._attend:
            out.context, out.context_mask = self._contexts(hidden[0, round_start:], [p - round_start for p in seg_pos])
        return out

    def _generate(
        self, embeds: Tensor, cache: DynamicCache | None, *, max_new_tokens: int, past_length: int, round_start: int, num_rounds: int,
    ) -> _Answer:
        """Greedy decoding from input embeddings [1, T, D] on top of ``cache`` (which holds
        ``past_length`` tokens; None: a fresh one); ``round_start``: where the round begins in
        ``embeds``.

        The answer always ends with the end-of-answer token, which is fed through the LLM too,
        so the cache afterwards covers exactly what the processor renders for the round.
        """
        m, proc = self.model, self.model.processor
        cache = cache if cache is not None else DynamicCache()
        decoder = m.llm.get_decoder()
        head = m.llm.get_output_embeddings()
        emb = m.llm.get_input_embeddings()
        proc.check_length(past_length + embeds.shape[1] + 1, num_rounds, reserve=0)
        budget = min(max_new_tokens, proc.max_length - past_length - embeds.shape[1] - 1)
        tokens: list[int] = []
        seg_hidden: list[Tensor] = []
        states: list[Tensor] = []  # the round's states so far, [t, D] pieces (for attend_round)
        seg_ends: list[int] = []  # how many of them each <seg> reads
        cur = embeds
        prefilled = False
        while len(tokens) < budget:
            out = decoder(inputs_embeds=cur, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            states.append(out.last_hidden_state[0, round_start:] if not prefilled else out.last_hidden_state[0])
            prefilled = True
            h = out.last_hidden_state[:, -1]
            nxt = int(head(h).argmax(-1))
            tokens.append(nxt)
            if nxt == proc.eos_id:
                break
            if nxt == proc.seg_id:
                seg_hidden.append(h[0])
                seg_ends.append(sum(s.shape[0] for s in states))
            cur = emb(torch.tensor([[nxt]], device=embeds.device))
        # the cache now holds embeds + tokens[:-1]; feed the rest, ending with the end token
        rest = tokens[-1:] if tokens else []
        if not tokens or tokens[-1] != proc.eos_id:
            tokens.append(proc.eos_id)
            rest = rest + [proc.eos_id]
        tail = emb(torch.tensor([rest], device=embeds.device))
        if not prefilled:
            tail = torch.cat([embeds, tail], dim=1)
        decoder(inputs_embeds=tail, past_key_values=cache, use_cache=True)
        hs = torch.stack(seg_hidden) if seg_hidden else embeds.new_zeros(0, embeds.shape[-1])
        answer = _Answer(tokens[:-1], hs)
        if self._attend and seg_hidden:
            answer.context, answer.context_mask = self._contexts(torch.cat(states), seg_ends)
        return answer

    @staticmethod
    def _contexts(states: Tensor, ends: list[int]) -> tuple[Tensor, Tensor]:
        """Each ``<seg>``'s round context from its round's states [T, D]: the first ``ends[s]``
        of them (those up to the state that predicted it): [S, T', D] and mask [S, T']."""
        positions = context_positions([(0, e) for e in ends]).to(states.device)
        return round_context(states[None], torch.zeros(len(ends), dtype=torch.long, device=states.device), positions)

    def _result(self, round_number: int, out: _Answer, features, frame: Frame, ref_masks: Tensor | None = None,
                frame_image: Callable[[], Tensor] | None = None) -> RoundResult:
        masks, boxes, scores, frame_masks = self.decode(out.seg_hidden, features, frame, out.context, out.context_mask, ref_masks,
                                                        frame_image=frame_image)
        return RoundResult(round_number, out.token_ids, self.answer_text(out.token_ids), masks, boxes, scores, frame_masks)

    @torch.no_grad()
    def decode(
        self, seg_hidden: Tensor, features, frame: Frame, context: Tensor | None = None, context_mask: Tensor | None = None,
        ref_masks: Tensor | None = None, *, frame_image: Callable[[], Tensor] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Masks of one image from the LLM states that predicted its ``<seg>`` tokens.

        Args:
            seg_hidden: [S, D] LLM states.
            features: the decoder's features of the image (a batch of one; unused when S = 0).
            frame: where the image sits in the decoder's frame.
            context, context_mask: [S, T, D] and [S, T], each ``<seg>``'s round context (needed
                with ``prompt_head.attend_round``).
            ref_masks: [S, h, w] the mask each ``<seg>``'s round refers to, in the decoder's
                output frame (for a decoder that reads them; see :meth:`ref_map`).
            frame_image: gives the image in the decoder's frame ([3, Sd, Sd] uint8), for the
                edge filter (``SegLLMConfig.edge_filter``; needed only when it is on).

        Returns:
            masks [S, H, W] bool, boxes [S, 4] float32 image pixels, scores [S] float32 and the
            masks [S, Sd, Sd] bool in the decoder's square input frame (padding included).
        """
        m = self.model
        S = seg_hidden.shape[0]
        h, w = frame.height, frame.width
        if S == 0:
            return np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, frame.size, frame.size), bool)
        prompts = seg_prompts(m.prompt_head, seg_hidden, context, context_mask)
        options = {} if ref_masks is None else {"ref_masks": ref_masks.to(features.dtype)}
        out = m.decoder(features, prompts.to(features.dtype), torch.zeros(S, dtype=torch.long, device=features.device), **options)
        return self._image_outputs(out, slice(None), frame, frame_image)

    def _image_outputs(self, out, rows: slice | Tensor, frame: Frame, frame_images: Callable[[], Tensor] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The decoder's [SEG] outputs ``rows`` (a slice or [S] long indices; all in ``frame``) as
        :meth:`decode` returns them: masks [S, H, W], boxes [S, 4] image pixels, scores [S] and
        frame masks [S, Sd, Sd]. ``frame_images``: the rows' image(s) in the frame, for the edge
        filter."""
        c = self.model.config
        frame_logits, masks = frame_and_image_masks(out.mask_logits[rows, SEG], frame, c.mask_region, edges=c.edge_filter,
                                                    frame_images=frame_images)
        if self.model.config.memory.box_source == "decoder" and out.boxes is not None:
            # the decoder's own box (it can differ from the mask's), back in image pixels
            boxes = out.boxes[rows, SEG].float().cpu() * (max(frame.height, frame.width) / frame.size)
        else:
            boxes = mask_boxes(masks.cpu())
        scores = out.iou_scores[rows, SEG].float().cpu().numpy()
        return masks.cpu().numpy(), boxes.numpy().astype(np.float32), scores, (frame_logits > 0).cpu().numpy()

    # -- many conversations at once, incrementally (batch segmentation) ----------------------
    @torch.no_grad()
    def open_batch(self, images: Sequence[np.ndarray]) -> BatchDialogue:
        """Conversations about B images, encoded in one batch: their vision tokens and decoder
        features, and the tokens before the first round in one key/value cache."""
        m = self.model
        pixels = [torch.tensor(im).permute(2, 0, 1) for im in images]  # copies: inputs may be read-only
        tokens = m.image_features(torch.stack([m.vision.preprocess(p) for p in pixels]).to(m.device))
        dec = [m.decoder.preprocess(p) for p in pixels]
        features = m.encode_decoder_image(torch.stack([d[0] for d in dec]).to(m.device))
        ids, image_pos = m.processor.prefix_ids()
        B, N = tokens.shape[:2]
        rows = torch.arange(B, device=m.device).repeat_interleave(N)
        cols = torch.tensor(image_pos, device=m.device).repeat(B)
        embeds = m.inject(torch.tensor([ids] * B, device=m.device), [(m.processor.image_id, rows, cols, tokens.reshape(B * N, -1))])
        cache = GrowingCache()  # rounds appended in place, not by a copy of the whole cache
        m.llm.get_decoder()(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        encoded = [EncodedImage(p, tokens[b], features[b : b + 1], d[1]) for b, (p, d) in enumerate(zip(pixels, dec))]
        return BatchDialogue(encoded, features, cache, torch.ones(B, len(ids), dtype=torch.long, device=m.device), [len(ids)] * B)

    @torch.no_grad()
    def extend_batch(
        self, dialogue: BatchDialogue, convs: dict[int, Conversation], masks: Callable[[int, int, int], tuple[Tensor, Tensor | None]],
        *, answers: dict[int, str | None] | None = None, max_new_tokens: int = MAX_NEW_TOKENS, force_mask: bool = False,
    ) -> dict[int, RoundResult | SegLLMError]:
        """Answer the last round of some of the conversations: one LLM pass over their rounds'
        tokens, then, where rows generate, one pass per token for all of them at once.

        Args:
            dialogue: the batch's state; conversation ``b`` holds ``len(convs[b].rounds) - 1``
                rounds so far.
            convs: row ``b`` of the batch -> its conversation, the last round open (earlier
                rounds answered, with the model's masks). Rows not given sit this round out.
            masks: ``(b, k, j)`` -> round k's j-th mask of row b as the memory reads it, and its
                box (as :data:`MaskSource`, per row).
            answers: row -> the answer to give it (teacher-forced), or None: generated greedily,
                token for token as :meth:`extend` generates (the model's fixed answer where it
                has one). Rows not in ``answers`` (all, by default) answer ``"<seg>"``: one mask,
                as the released demo asks.
            max_new_tokens: longest generated answer.
            force_mask: a row whose answer was not given (None) and has no ``<seg>`` is undone
                and answered ``"<seg>"`` instead (its result ``forced``), as :meth:`extend` does.

        Each row's round is its tokens, left-padded to the longest in the batch (padding is
        masked out and positions continue each row's own count), so the shared cache grows by
        one block per round and, where rows generate, one column per token (a row whose answer
        has ended gets masked padding there); rows never see each other's padding. A row whose
        round does not fit the context gets its error instead of a result.
        :meth:`BatchDialogue.undo` takes rows' last round back.

        Raises:
            ValueError: a row that :meth:`BatchDialogue.end` ended is asked.
        """
        results = self._extend_batch(dialogue, convs, masks, answers, max_new_tokens)
        if force_mask:
            unset = {b for b in convs if answers is not None and b in answers and answers[b] is None}
            redo = [b for b in sorted(unset) if isinstance(results.get(b), RoundResult) and results[b].masks.shape[0] == 0]
            if redo:
                dialogue.undo(redo)
                again = self._extend_batch(dialogue, {b: convs[b] for b in redo}, masks, {b: FORCED_ANSWER for b in redo}, max_new_tokens)
                for b, r in again.items():
                    if isinstance(r, RoundResult):
                        r.forced = True
                    results[b] = r
        return results

    def _extend_batch(self, dialogue: BatchDialogue, convs: dict[int, Conversation], masks, answers: dict[int, str | None] | None,
                      max_new_tokens: int) -> dict[int, RoundResult | SegLLMError]:
        """:meth:`extend_batch` without its ``force_mask``."""
        m = self.model
        proc, dev = m.processor, m.device
        if dialogue.ending & convs.keys():
            raise ValueError(f"rows {sorted(dialogue.ending & convs.keys())} of the batch were ended and cannot be asked again")
        dialogue._drop_ended()
        cache_row = {b: i for i, b in enumerate(dialogue.cached)}  # row -> its row of the cache
        plans: dict[int, _RowPlan] = {}
        results: dict[int, RoundResult | SegLLMError] = {}
        for b, conv in convs.items():
            i = len(conv.rounds) - 1
            offset = dialogue.lengths[b]
            answer = self.answer_to_use(answers.get(b, FORCED_ANSWER) if answers is not None else FORCED_ANSWER)
            try:
                u_ids, items = proc.user_ids(conv, i, offset)
                if answer is None:  # as _generate: room for the round and its end token at least
                    proc.check_length(offset + len(u_ids) + 1, i + 1, reserve=0)
                    plans[b] = _RowPlan(u_ids, items, None, [], min(max_new_tokens, proc.max_length - offset - len(u_ids) - 1))
                    continue
                a_ids, segs = proc.answer_ids(_with_answer(conv, answer), i, offset + len(u_ids))
                proc.check_length(offset + len(u_ids) + len(a_ids), i + 1, reserve=0)
            except SegLLMError as e:
                results[b] = e
                continue
            plans[b] = _RowPlan(u_ids + a_ids, items, [s.pos - offset for s in segs], a_ids[:-1], 0)
        if not plans:
            return results
        C = len(dialogue.cached)
        width = max(len(p.ids) for p in plans.values())
        pad = proc.eos_id
        chunk = torch.full((C, width), pad, dtype=torch.long)
        att = torch.zeros(C, width, dtype=torch.long)
        pos = torch.zeros(C, width, dtype=torch.long)
        mask_slots, box_slots = [], []
        missing = sorted({(b, it.ref_round, it.mask_index) for b, p in plans.items() for it in p.items} - dialogue.memory.keys())
        if missing:  # the new memory masks of every row, through the vision tower at once
            given = [masks(b, k, j) for b, k, j in missing]
            mask_toks, box_toks = self.encode_memories([(dialogue.images[b], *mb) for (b, _, _), mb in zip(missing, given)])
            dialogue.memory.update({key: (mask_toks[n], box_toks[n]) for n, key in enumerate(missing)})
            if m.uses_ref_masks:
                dialogue.ref_maps.update({key: self.ref_map(mb[0], dialogue.images[key[0]].frame) for key, mb in zip(missing, given)})
        for b, p in plans.items():
            c = cache_row[b]
            start = width - len(p.ids)  # left padding: every row's round ends at the last column
            chunk[c, start:] = torch.tensor(p.ids)
            att[c, start:] = 1
            pos[c, start:] = torch.arange(dialogue.lengths[b], dialogue.lengths[b] + len(p.ids))
            for it in p.items:
                mask_tok, box_tok = dialogue.memory[b, it.ref_round, it.mask_index]
                mask_slots.append((c, start + it.mask_pos - dialogue.lengths[b], mask_tok))
                if it.box_pos >= 0:
                    box_slots.append((c, start + it.box_pos - dialogue.lengths[b], box_tok))
        slots = [(tid, torch.tensor([s[0] for s in ss], dtype=torch.long, device=dev), torch.tensor([s[1] for s in ss], dtype=torch.long, device=dev),
                  torch.stack([s[2] for s in ss])) for tid, ss in ((proc.mask_id, mask_slots), (proc.box_id, box_slots)) if ss]
        embeds = m.inject(chunk.to(dev), slots, att.to(dev))
        dialogue._last_round.update({b: (dialogue.attention.shape[1], dialogue.lengths[b]) for b in plans})
        hidden = self._batch_pass(dialogue, embeds, att.to(dev), pos.to(dev))
        for b, p in plans.items():
            dialogue.lengths[b] += len(p.ids)

        # the states that predicted each <seg> (and their round contexts): a given answer's from
        # the pass above, a generated one's as it is generated
        seg_rows, seg_states, contexts, token_ids = [], [], [], {}
        spans, in_cache, cols = [], [], []
        for b, p in plans.items():
            if p.seg_pos is None:
                continue
            token_ids[b] = p.answer_ids
            start = width - len(p.ids)
            for s in p.seg_pos:
                seg_rows.append(b)
                in_cache.append(cache_row[b])
                cols.append(start + s)
                spans.append((start, start + s))
        if spans:
            rows_t = torch.tensor(in_cache, dtype=torch.long, device=dev)
            seg_states.append(hidden[rows_t, torch.tensor(cols, device=dev) - 1])
            if self._attend:
                contexts.append(round_context(hidden, rows_t, context_positions(spans).to(dev)))
        generating = {b: p for b, p in plans.items() if p.seg_pos is None}
        if generating:
            starts = {b: width - len(p.ids) for b, p in generating.items()}
            for b, (tokens, states, ends) in self._generate_batch(dialogue, hidden, generating, starts, cache_row).items():
                token_ids[b] = tokens
                if ends:
                    seg_rows.extend([b] * len(ends))
                    seg_states.append(states[torch.tensor(ends, device=dev) - 1])
                    if self._attend:
                        contexts.append(self._contexts(states, ends))
        if not seg_rows:
            return results | {b: self._empty_result(len(convs[b].rounds), token_ids[b], dialogue.images[b].frame) for b in plans}
        context = _cat_contexts(contexts) if self._attend else ()
        prompts = seg_prompts(m.prompt_head, torch.cat(seg_states), *context)
        feats = dialogue.features
        options = {}
        if m.uses_ref_masks:
            per_row = {b: self._ref_maps(dialogue.ref_maps.get((b, convs[b].rounds[-1].refs[0], 0)) if convs[b].rounds[-1].refs else None, 1) for b in plans}
            options["ref_masks"] = torch.cat([per_row[b] for b in seg_rows]).to(feats.dtype)
        rows = torch.tensor(seg_rows, dtype=torch.long, device=dev)
        out = m.decoder(feats, prompts.to(feats.dtype), rows.to(feats.device), **options)
        # one post-processing call per image size, not per row: rows of one frame resize together
        by_frame: dict[Frame, list[int]] = {}
        for s, b in enumerate(seg_rows):
            by_frame.setdefault(dialogue.images[b].frame, []).append(s)
        per_seg: dict[int, tuple] = {}
        for frame, ss in by_frame.items():
            index = torch.tensor(ss, dtype=torch.long, device=out.mask_logits.device)
            got = self._image_outputs(out, index, frame, lambda ss=ss: torch.stack([dialogue.images[seg_rows[s]].in_frame() for s in ss]))
            per_seg.update({s: tuple(x[n : n + 1] for x in got) for n, s in enumerate(ss)})
        by_row: dict[int, list[tuple]] = {}
        for s, b in enumerate(seg_rows):
            by_row.setdefault(b, []).append(per_seg[s])
        for b in plans:
            if b not in by_row:
                results[b] = self._empty_result(len(convs[b].rounds), token_ids[b], dialogue.images[b].frame)
                continue
            got = [x[0] if len(by_row[b]) == 1 else np.concatenate(x) for x in zip(*by_row[b])]
            results[b] = RoundResult(len(convs[b].rounds), token_ids[b], self.answer_text(token_ids[b]), *got)
        return results

    def _batch_pass(self, dialogue: BatchDialogue, embeds: Tensor, att: Tensor, pos: Tensor) -> Tensor:
        """``embeds`` [C, W, D] (attention ``att`` [C, W]: 1 real, 0 padding; positions ``pos``
        [C, W]) through the LLM on top of the batch's cache, which it extends: states [C, W, D]."""
        full_att = torch.cat([dialogue.attention, att], dim=1)
        hidden = self.model.llm.get_decoder()(
            inputs_embeds=embeds, attention_mask=self._chunk_attention(full_att, embeds.shape[1]), position_ids=pos,
            past_key_values=dialogue.cache, use_cache=True,
        ).last_hidden_state
        dialogue.attention = full_att
        return hidden

    def _generate_batch(
        self, dialogue: BatchDialogue, hidden: Tensor, plans: dict[int, _RowPlan], starts: dict[int, int], cache_row: dict[int, int],
    ) -> dict[int, tuple[list[int], Tensor, list[int]]]:
        """Greedy answers of the rows ``plans``, whose round tokens the batch pass that gave
        ``hidden`` [C, W, D] has just read (row b's from column ``starts[b]``), token for token as
        :meth:`_generate` answers one: the end token ends an answer, a full budget ends it with one
        added, and every answer token, the end token included, goes into the cache. One LLM pass
        per token for every row still generating (the others get masked padding).

        Returns:
            row -> (the answer's token ids without the end token, the round's states [T, D] an
            answer reads: its tokens' from ``hidden``, then the state after each generated token
            that predicted the next; per ``<seg>``, how many of those states precede and include
            the one that predicted it).
        """
        m, proc = self.model, self.model.processor
        head, emb = m.llm.get_output_embeddings(), m.llm.get_input_embeddings()
        tokens: dict[int, list[int]] = {b: [] for b in plans}
        states: dict[int, list[Tensor]] = {b: [hidden[cache_row[b], starts[b] :]] for b in plans}
        count = {b: hidden.shape[1] - starts[b] for b in plans}  # states so far
        ends: dict[int, list[int]] = {b: [] for b in plans}
        feed: dict[int, list[int]] = {}  # row -> its tokens still to go into the cache
        asks: set[int] = set()  # rows that predict a token after feeding their next one

        def predict(rows: list[int], h: Tensor) -> None:  # h [len(rows), D]: each row's last state
            for b, t in zip(rows, head(h).argmax(-1).tolist()):
                tokens[b].append(t)
                if t == proc.eos_id:
                    feed[b] = [t]
                    continue
                if t == proc.seg_id:
                    ends[b].append(count[b])
                if len(tokens[b]) < plans[b].budget:
                    feed[b] = [t]
                    asks.add(b)
                else:  # the budget is spent: the end token is added after it
                    feed[b] = [t, proc.eos_id]

        first = [b for b in plans if plans[b].budget > 0]
        for b in plans:
            if plans[b].budget <= 0:
                feed[b] = [proc.eos_id]
        if first:
            predict(first, hidden[torch.tensor([cache_row[b] for b in first], device=hidden.device), -1])
        C, dev = len(dialogue.cached), hidden.device
        while feed:
            col = torch.full((C, 1), proc.eos_id, dtype=torch.long)
            att = torch.zeros(C, 1, dtype=torch.long)
            pos = torch.zeros(C, 1, dtype=torch.long)
            for b in list(feed):
                c = cache_row[b]
                col[c, 0] = feed[b].pop(0)
                att[c, 0] = 1
                pos[c, 0] = dialogue.lengths[b]
                dialogue.lengths[b] += 1
                if not feed[b]:
                    del feed[b]
            h = self._batch_pass(dialogue, emb(col.to(dev)), att.to(dev), pos.to(dev))[:, 0]
            ready = sorted(b for b in asks if b not in feed)
            asks.difference_update(ready)
            for b in ready:
                states[b].append(h[cache_row[b]][None])
                count[b] += 1
            if ready:
                predict(ready, h[torch.tensor([cache_row[b] for b in ready], device=dev)])
        out = {}
        for b in plans:
            t = tokens[b] if tokens[b] and tokens[b][-1] == proc.eos_id else tokens[b] + [proc.eos_id]
            out[b] = (t[:-1], torch.cat(states[b]), ends[b])
        return out

    def _empty_result(self, round_number: int, token_ids: list[int], frame: Frame) -> RoundResult:
        """A round whose answer has no ``<seg>``: its text and no masks."""
        return RoundResult(round_number, token_ids, self.answer_text(token_ids), np.zeros((0, frame.height, frame.width), bool),
                           np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, frame.size, frame.size), bool))

    # -- every round at once, teacher-forced (a batch path) ---------------------------------
    @torch.no_grad()
    def segment(self, conversations: Sequence[Conversation], *, frame: bool = False) -> list[list[tuple]]:
        """Teacher-forced segmentation of every round at once (the oracle-history protocol).

        Each conversation's answers are given (their masks are used only where later rounds
        refer to them), so one LLM pass per batch yields every ``<seg>``'s mask.

        Args:
            conversations: the conversations (answers and masks given).
            frame: also return each mask in the decoder's square input frame and its box there.

        Returns:
            per conversation, per round: (masks [k, H, W] bool, scores [k]) for its k ``<seg>``;
            with ``frame``: (masks, scores, frame masks [k, Sd, Sd] bool, frame boxes [k, 4]
            xyxy in frame pixels: the decoder's own box where it predicts one, else the mask's).
        """
        if not conversations:
            return []
        m = self.model
        batch = m.prepare(conversations, targets=False).to(m.device)
        out, _ = m.decode_segs(m.hidden_states(batch), batch)
        logits, iou, boxes = out.mask_logits, out.iou_scores, out.boxes
        result: list[list[tuple]] = []
        s = 0
        for b, (conv, enc) in enumerate(zip(conversations, batch.encoded)):
            fr = batch.frames[b]
            n = len(enc.segs)
            if n:  # every <seg> of the image at once: they share its frame
                frame_logits, masks = frame_and_image_masks(logits[s : s + n, SEG], fr, m.config.mask_region, edges=m.config.edge_filter,
                                                            frame_images=lambda conv=conv, fr=fr: _image_in_frame(conv.image, fr))
            per_round: list[list[list]] = [[[], [], [], []] for _ in conv.rounds]
            for k, item in enumerate(enc.segs):
                entry = per_round[item.round_index]
                entry[0].append(masks[k].cpu().numpy())
                entry[1].append(float(iou[s + k, SEG]))
                if frame:
                    fm = frame_logits[k] > 0
                    entry[2].append(fm.cpu().numpy())
                    box = boxes[s + k, SEG].float().cpu() if boxes is not None else mask_boxes(fm[None].cpu())[0]
                    entry[3].append(box.numpy())
            s += n
            h, w, size = fr.height, fr.width, fr.size
            rounds = []
            for ms, sc, fm, fb in per_round:
                item = (np.stack(ms) if ms else np.zeros((0, h, w), bool), np.asarray(sc, np.float32))
                if frame:
                    item += (np.stack(fm) if fm else np.zeros((0, size, size), bool), np.asarray(fb, np.float32).reshape(-1, 4))
                rounds.append(item)
            result.append(rounds)
        return result

    def answer_text(self, token_ids: list[int]) -> str:
        """An answer's text from its token ids: ``<seg>`` kept, end and padding tokens dropped."""
        tok = self.model.tokenizer
        text = tok.decode(token_ids, skip_special_tokens=False)
        for t in (tok.eos_token, tok.pad_token):
            if t:
                text = text.replace(t, "")
        return text.strip()


__all__ = [
    "Dialogue",
    "EncodedImage",
    "RoundEngine",
    "RoundResult",
    "context_positions",
    "frame_and_image_masks",
    "round_context",
    "seg_context",
    "seg_prompts",
]
