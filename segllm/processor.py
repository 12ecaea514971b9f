"""Conversation -> token ids, labels and slots (where each injected feature and each ``<seg>`` sits).

The rendering is built piece by piece from token ids, never by re-splitting a rendered
string: a round's tokens are ``user(round) + answer(round)``, and a whole conversation is
``prefix + user(1) + answer(1) + ... + user(n) [+ answer(n)]``. Because of that, the tokens of
the first k rounds are exactly a prefix of the tokens of k+1 rounds, which is what lets a
session keep the LLM's key/value cache across rounds. Labels come from roles: only answer
tokens (and the end-of-answer token) are trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from segllm.checks import on_host, require
from segllm.config import MemoryConfig, TemplateConfig
from segllm.conversation import SEG, Conversation
from segllm.errors import ContextTooLongError, ConversationError, PlaceholderMismatchError

# at most this many texts keep their token ids (see Processor.text_ids); then the cache starts over
_TEXT_CACHE_SIZE = 65536

IGNORE = -100


@dataclass
class MemoryItem:
    """One earlier mask fed back into the LLM input.

    ``ref_round`` is 1-indexed, ``mask_index`` indexes that round's masks; ``mask_pos`` and
    ``box_pos`` are token positions (``box_pos`` is -1 when boxes are not used).
    """

    round_index: int
    ref_round: int
    mask_index: int
    mask_pos: int
    box_pos: int


@dataclass
class SegItem:
    """One ``<seg>`` of an answer: its round (0-based), index in the round, token position, and
    the (1-indexed round, mask index) of the mask its [REF] half is supervised with, if any."""

    round_index: int
    index: int
    pos: int
    ref: tuple[int, int] | None


@dataclass
class Encoded:
    """A rendered conversation.

    Attributes:
        input_ids: token ids, length L.
        labels: length L; IGNORE except on answer tokens.
        image_pos: positions of the image placeholders (num_image_tokens of them).
        memory: the earlier masks fed back, in token order.
        segs: the ``<seg>`` tokens of the answers, in token order.
        round_spans: (start, end) token span of each round (user turn + answer).
        prefix_len: number of tokens before the first round.
    """

    input_ids: list[int]
    labels: list[int]
    image_pos: list[int]
    memory: list[MemoryItem] = field(default_factory=list)
    segs: list[SegItem] = field(default_factory=list)
    round_spans: list[tuple[int, int]] = field(default_factory=list)
    prefix_len: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


class Processor:
    """Renders conversations into tokens for one tokenizer and template.

    Args:
        tokenizer: a transformers tokenizer that has the template's added tokens.
        template: the rendering template.
        memory: whether (and how) earlier masks become placeholders.
        num_image_tokens: how many placeholders the image takes (the vision tower's patch count).
        max_length: the LLM's context in tokens.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: TemplateConfig,
        memory: MemoryConfig,
        *,
        num_image_tokens: int,
        max_length: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.memory = memory
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        ids = tokenizer.convert_tokens_to_ids(
            [template.image_token, template.mask_token, template.box_token, template.seg_token]
        )
        unk = tokenizer.unk_token_id
        for name, tok, i in zip(("image", "mask", "box", "seg"), (template.image_token, template.mask_token, template.box_token, template.seg_token), ids):
            if i is None or (unk is not None and i == unk and tok != tokenizer.unk_token):
                raise ConversationError(f"the tokenizer has no {name} token {tok!r}; call segllm.tokenizer.add_segllm_tokens")
        self.image_id, self.mask_id, self.box_id, self.seg_id = ids
        if tokenizer.eos_token_id is None:
            raise ConversationError("the tokenizer has no end-of-sequence token")
        self.eos_id = tokenizer.eos_token_id
        self.bos_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._mid = _mid_string_tokenizer(tokenizer) if template.merge_text else None
        # token ids by (text, allow_special, mid): training renders the same questions, answer
        # templates and template pieces over and over, and a tokenizer call costs ~0.1 ms of
        # Python around the tokenizing (a quarter of building a batch). A plain dict, so the
        # processor still pickles for data-loader workers that are spawned
        self._text_cache: dict[tuple[str, bool, bool], tuple[int, ...]] = {}

    # -- pieces ---------------------------------------------------------------------------
    def text_ids(self, text: str, *, allow_special: bool = False, mid: bool = False) -> list[int]:
        """Token ids of plain text. Unless ``allow_special``, special-token strings typed by a
        user (e.g. "<image>") are split into ordinary characters so they cannot forge slots.
        ``mid``: the text follows other tokens of the same string (only differs from a
        standalone piece for tokenizers that add a prefix space at the start of a string)."""
        if not text:
            return []
        key = (text, allow_special, mid)
        got = self._text_cache.get(key)
        if got is None:
            if mid and self._mid is not None:
                self._mid.encode_special_tokens = not allow_special
                got = tuple(self._mid.encode(text, add_special_tokens=False).ids)
            else:
                backend = getattr(self.tokenizer, "backend_tokenizer", None)
                if backend is not None and backend.truncation is None and backend.padding is None:
                    # what the fast tokenizer's __call__ does, without its ~0.1 ms of Python
                    # around it (the world's texts are varied enough to miss the cache often)
                    backend.encode_special_tokens = not allow_special
                    got = tuple(backend.encode(text, add_special_tokens=False).ids)
                else:
                    got = tuple(self.tokenizer(text, add_special_tokens=False, split_special_tokens=not allow_special).input_ids)
            if len(self._text_cache) >= _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache[key] = got
        return list(got)

    def _texts(self, *pieces: tuple[str, bool], mid: bool = True) -> list[int]:
        """Token ids of consecutive text pieces, each ``(text, allow_special)``: one call per
        piece, or (``template.merge_text``) one call for the whole run when no piece may hold
        special tokens, so the ids equal those of the joined string."""
        if self.template.merge_text and not any(special for _, special in pieces):
            return self.text_ids("".join(text for text, _ in pieces), mid=mid)
        return [i for text, special in pieces for i in self.text_ids(text, allow_special=special, mid=mid)]

    def prefix_ids(self) -> tuple[list[int], list[int]]:
        """Tokens before the first round, and the image placeholder positions within them."""
        t = self.template
        head = self.bos_ids + self._texts((t.system, False), (t.image_prefix, False), mid=False)
        image_pos = list(range(len(head), len(head) + self.num_image_tokens))
        ids = head + [self.image_id] * self.num_image_tokens + self.text_ids(t.image_suffix, mid=True)
        return ids, image_pos

    def user_ids(self, conv: Conversation, round_index: int, offset: int) -> tuple[list[int], list[MemoryItem]]:
        """Tokens of round ``round_index``'s user turn (up to the assistant prefix), placed at ``offset``."""
        t = self.template
        rnd = conv.rounds[round_index]
        prefix = t.first_user_prefix if round_index == 0 and t.first_user_prefix is not None else t.user_prefix
        separator = t.round_separator if round_index > 0 else ""
        placeholders: list[int] = []
        slots: list[tuple[int, int, int, int]] = []  # (ref round, mask index, mask pos, box pos) relative
        if self.memory.enabled:
            for k in rnd.refs:
                for j, _ in enumerate(conv.rounds[k - 1].masks):
                    mask_rel = len(placeholders)
                    placeholders.append(self.mask_id)
                    box_rel = -1
                    if self.memory.use_box:
                        box_rel = len(placeholders)
                        placeholders.append(self.box_id)
                    slots.append((k, j, mask_rel, box_rel))
        if not placeholders:
            # nothing between the prefix and the question: one text run
            return self._texts((separator, False), (prefix, False), (rnd.question, False), (t.assistant_prefix, False)), []
        ids = self._texts((separator, False), (prefix, False))
        start = offset + len(ids)
        items = [MemoryItem(round_index, k, j, start + m, start + b if b >= 0 else -1) for k, j, m, b in slots]
        ids += placeholders + self._texts((rnd.question, False), (t.assistant_prefix, False))
        return ids, items

    def answer_ids(self, conv: Conversation, round_index: int, offset: int) -> tuple[list[int], list[SegItem]]:
        """Tokens of round ``round_index``'s answer plus end-of-answer, placed at ``offset``."""
        rnd = conv.rounds[round_index]
        assert rnd.answer is not None
        ids = self.text_ids(rnd.answer, allow_special=True, mid=True) + [self.eos_id]
        ref = (rnd.refs[0], 0) if rnd.refs else None
        segs = [
            SegItem(round_index, n, offset + p, ref)
            for n, p in enumerate(p for p, i in enumerate(ids) if i == self.seg_id)
        ]
        if len(segs) != rnd.num_seg:
            raise ConversationError(
                f"round {round_index + 1}: the answer has {rnd.num_seg} {SEG} in text but "
                f"{len(segs)} {SEG} token(s) after tokenisation"
            )
        return ids, segs

    # -- whole conversations ---------------------------------------------------------------
    def encode(self, conv: Conversation, *, open_last: bool = False) -> Encoded:
        """Render a conversation.

        Args:
            conv: the conversation (validated here).
            open_last: the last round has no answer yet: stop after its assistant prefix
                (the model generates from there).

        Raises:
            ConversationError, MaskError: malformed conversation.
            ContextTooLongError: the tokens do not fit the LLM's context.
        """
        conv.validate(allow_open_last=open_last)
        if not open_last and conv.rounds[-1].answer is None:
            raise ConversationError(f"round {len(conv.rounds)} has no answer")
        ids, image_pos = self.prefix_ids()
        labels = [IGNORE] * len(ids)
        enc = Encoded(input_ids=ids, labels=labels, image_pos=image_pos, prefix_len=len(ids))
        for i, rnd in enumerate(conv.rounds):
            start = len(ids)
            u, items = self.user_ids(conv, i, start)
            ids += u
            labels += [IGNORE] * len(u)
            enc.memory += items
            if rnd.answer is not None:
                a, segs = self.answer_ids(conv, i, len(ids))
                ids += a
                labels += a
                enc.segs += segs
            enc.round_spans.append((start, len(ids)))
        self.check_length(len(ids), len(conv.rounds), reserve=0)
        return enc

    def check_length(self, length: int, num_rounds: int, *, reserve: int) -> None:
        """Raise :class:`ContextTooLongError` if ``length + reserve`` tokens exceed the context."""
        if length + reserve <= self.max_length:
            return
        prefix = len(self.prefix_ids()[0])
        per_round = max(1, (length - prefix) // max(1, num_rounds))
        fit = max(0, (self.max_length - prefix - reserve) // per_round)
        raise ContextTooLongError(
            f"the conversation needs {length + reserve} tokens ({num_rounds} rounds"
            f"{f' + {reserve} for the answer' if reserve else ''}) but the LLM's context holds "
            f"{self.max_length}; about {fit} rounds like these fit: start a new conversation or drop rounds"
        )

    def check_placeholders(self, ids: Tensor, att: Tensor, rows: Tensor, cols: Tensor, expected: list[tuple[int, int]]) -> None:
        """Check that features go exactly into the placeholder tokens of their kind.

        Args:
            ids: [B, L] token ids; att: [B, L] attention mask (padding is not checked).
            rows, cols: [n] the positions features are put at, in ``expected`` order.
            expected: (placeholder token id, number of features) per kind of feature.

        Raises:
            PlaceholderMismatchError: the placeholders and features differ in number, a
                position holds no placeholder of its kind, or two features share a position.
        """
        placeholder_ids = {tid for tid, _ in expected} | {self.image_id}
        if self.memory.enabled:
            placeholder_ids |= {self.mask_id}
            if self.memory.use_box:
                placeholder_ids |= {self.box_id}
        is_ph = torch.zeros_like(ids, dtype=torch.bool)
        for tid in placeholder_ids:
            is_ph |= ids == tid
        is_ph &= att.bool()
        n_feats = rows.numel()
        kinds = ", ".join(f"{n} for token {t}" for t, n in expected)
        if on_host(ids):  # the counts named in the message
            n_tokens = int(is_ph.sum())
            if n_tokens != n_feats:
                raise PlaceholderMismatchError(f"{n_tokens} placeholder token(s) in the input but {n_feats} feature(s) to inject ({kinds})")
        else:  # read nothing back from an accelerator (segllm.checks)
            require(is_ph.sum() == n_feats, f"the placeholder tokens in the input are not the {n_feats} feature(s) to inject ({kinds})",
                    PlaceholderMismatchError)
        if not n_feats:
            return
        want = torch.cat([torch.full((n,), tid, dtype=ids.dtype, device=ids.device) for tid, n in expected])
        require((ids[rows, cols] == want).all(), "a feature slot points at a position that holds no placeholder token of its kind",
                PlaceholderMismatchError)
        # how many features each position receives (a scatter: unique() would read its size back)
        flat = rows * ids.shape[1] + cols
        hits = torch.zeros(ids.numel(), dtype=torch.int32, device=ids.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        require(hits.max() <= 1, "two features point at the same placeholder token", PlaceholderMismatchError)


def _mid_string_tokenizer(tokenizer: PreTrainedTokenizerBase):
    """A copy of a fast tokenizer's backend that tokenizes text as the middle of a string.

    SentencePiece-style tokenizers (Metaspace pre-tokenizer with ``prepend_scheme`` "first")
    put a prefix space only at the start of the whole string, so a piece tokenized alone
    differs from the same piece inside a string ("Segment" -> "▁Seg", "ment" alone, but
    "Segment" after a placeholder). Returns None when the tokenizer has no such behaviour.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    data = json.loads(backend.to_str())

    def never(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
            node["prepend_scheme"] = "never"
            return True
        return any([never(n) for n in node.get("pretokenizers", [])])

    if not never(data.get("pre_tokenizer")):
        return None

    return Tokenizer.from_str(json.dumps(data))
