"""Conversations as typed data: an image, then rounds of question -> answer with masks.

A :class:`Round` holds the user's question, the earlier rounds it refers to (1-indexed, as the
released demo's ``[REF:k]``), the answer text with one ``<seg>`` per predicted mask, and the
masks themselves (ground truth for training, predictions at inference).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from segllm.errors import ConversationError, ImageError, MaskError

SEG = "<seg>"
_REF_MACRO = re.compile(r"\[REF:\s*(\d+)\s*\]", re.IGNORECASE)
_INSTANCE = re.compile(r"\binstance\s+(\d+)\b", re.IGNORECASE)

MAX_IMAGE_SIDE = 8192  # larger images are refused: decoding them costs GBs of memory for no gain


@dataclass
class Round:
    """One round of a conversation.

    Attributes:
        question: the user's text (non-empty).
        refs: earlier rounds this question refers to, 1-indexed. Each referenced round's
            masks are encoded back into the LLM input.
        answer: the assistant's text with one ``<seg>`` per mask; ``None`` for a round whose
            answer is to be generated.
        masks: one [H, W] bool mask per ``<seg>`` of the answer, at the image's resolution.
    """

    question: str
    refs: tuple[int, ...] = ()
    answer: str | None = None
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def num_seg(self) -> int:
        return 0 if self.answer is None else self.answer.count(SEG)


@dataclass
class Conversation:
    """An RGB image ([H, W, 3] uint8) and its rounds, in order.

    Training-only annotations (the procedural world provides them; unused at inference):

    - ``dense``: per-pixel class maps of the image ([H, W] integer, 0 = background, -1 =
      unsupervised) by label group, for the dense auxiliary loss (:class:`segllm.config.DenseConfig`).
    - ``candidates``: [n, H, W] bool masks of every object and part in the image, and
      ``candidate_groups``: [n] int, which of them are alternatives to each other (0 top-level
      objects, 1 parts), for the selection loss (``LossConfig.select_weight``).
    - ``alternatives``: round index (0-based) -> indices into ``candidates`` of every valid
      answer, for rounds with several right answers ("segment one of the red objects").
    - ``named``: per round, the class each ``dense`` label group's value the question names
      (0: the question does not name one), e.g. ``{"colour": 1, "texture": 0, ...}`` for "the
      red object", for the decoder's attribute matching (``attributes`` of the direct decoder).
    """

    image: np.ndarray
    rounds: list[Round] = field(default_factory=list)
    dense: dict[str, np.ndarray] | None = None
    candidates: np.ndarray | None = None
    candidate_groups: np.ndarray | None = None
    alternatives: dict[int, list[int]] | None = None
    named: list[dict[str, int]] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image in pixels."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def referenced_masks(self, round_index: int) -> list[tuple[int, np.ndarray]]:
        """The masks the round at ``round_index`` (0-based) refers to, as (1-indexed round, mask) pairs."""
        out = []
        for k in self.rounds[round_index].refs:
            for mask in self.rounds[k - 1].masks:
                out.append((k, mask))
        return out

    def validate(self, *, allow_open_last: bool = False, check_refs: bool = True) -> None:
        """Check the conversation is well formed; raise :class:`ConversationError` or :class:`MaskError`.

        Args:
            allow_open_last: the last round may have no answer yet (it is to be generated).
            check_refs: check that referenced rounds have non-empty masks (a caller that feeds
                back masks kept in another frame checks those itself).
        """
        check_image_array(self.image)
        if not self.rounds:
            raise ConversationError("conversation has no rounds")
        h, w = self.size
        for i, rnd in enumerate(self.rounds):
            n = i + 1
            if not isinstance(rnd.question, str) or not rnd.question.strip():
                raise ConversationError(f"round {n}: the question is empty")
            for k in rnd.refs:
                if not isinstance(k, (int, np.integer)) or not 1 <= k < n:
                    earlier = f"rounds 1..{n - 1}" if n > 1 else "no earlier round"
                    raise ConversationError(
                        f"round {n} refers to round {k}, which does not exist before it ({earlier})"
                    )
            open_round = rnd.answer is None
            if open_round and not (allow_open_last and i == len(self.rounds) - 1):
                raise ConversationError(f"round {n} has no answer")
            if not open_round and len(rnd.masks) != rnd.num_seg:
                raise MaskError(f"round {n}: answer has {rnd.num_seg} {SEG} but {len(rnd.masks)} mask(s) are given")
            for j, m in enumerate(rnd.masks):
                if m.shape != (h, w):
                    raise MaskError(f"round {n}, mask {j + 1}: shape {tuple(m.shape)} differs from the image's {(h, w)}")
            for k in rnd.refs if check_refs else ():
                ref = self.rounds[k - 1]
                if not ref.masks:
                    raise MaskError(f"round {n} refers to round {k}, which has no mask")
                for m in ref.masks:
                    if not np.count_nonzero(m):  # np.any(m) without its Python wrapper
                        raise MaskError(f"round {n} refers to round {k}, whose mask is empty (zero area)")

    def truncated(self, num_rounds: int) -> Conversation:
        """The first ``num_rounds`` rounds (references stay valid since they point backwards)."""
        named = None if self.named is None else list(self.named[:num_rounds])
        return replace(self, rounds=list(self.rounds[:num_rounds]), named=named)


def parse_refs(text: str, *, instance_mentions: bool = True) -> tuple[str, tuple[int, ...]]:
    """Find the rounds a question refers to, as the released demo writes them.

    ``[REF:k]`` macros are removed from the text; "instance k" mentions stay in the text (the
    model reads them) and count as references too when ``instance_mentions`` is set.

    Returns:
        (clean text, sorted unique 1-indexed rounds)
    """
    refs = {int(m) for m in _REF_MACRO.findall(text)}
    clean = _REF_MACRO.sub("", text)
    clean = re.sub(r"\s{2,}", " ", clean).strip()
    if instance_mentions:
        refs.update(int(m) for m in _INSTANCE.findall(clean))
    return clean, tuple(sorted(refs))


def check_image_array(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"expected an RGB image as uint8 [H, W, 3], got {desc}; use segllm.load_image()")
    if min(image.shape[:2]) < 1:
        raise ImageError(f"image has no pixels: {image.shape}")


def load_image(source: str | Path | Image.Image | np.ndarray, *, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Read an image from a path, a PIL image or an array and return RGB uint8 [H, W, 3].

    Files and PIL images are read as displayed: an EXIF orientation tag (phone photos) is applied.
    Grayscale, palette, RGBA (alpha dropped), 16-bit and float images are converted. A file's size
    is checked from its header before any pixel is decoded, so an image that declares an enormous
    size (a decompression bomb) costs nothing. Raises :class:`ImageError` naming the file and the
    problem for a missing, unreadable or truncated file, an empty image, or one whose longest side
    exceeds ``max_side`` pixels; no reader error escapes as anything else.
    """
    if isinstance(source, (str, Path)):
        return np.ascontiguousarray(_read_image_file(Path(source), max_side))
    if isinstance(source, Image.Image):
        _check_side(source.height, source.width, max_side)
        try:
            arr = _pil_to_rgb(ImageOps.exif_transpose(source))
        except ImageError:
            raise
        except Exception as e:  # a lazily opened image decodes here: any reader error is the image's
            raise ImageError(f"cannot read the image: {type(e).__name__}: {e}") from e
    elif isinstance(source, np.ndarray):
        arr = _array_to_rgb(source)
    else:
        raise ImageError(f"cannot use a {type(source).__name__} as an image (give a path, PIL image or array)")
    _check_side(arr.shape[0], arr.shape[1], max_side)
    return np.ascontiguousarray(arr)


_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations shown rotated by 90 degrees: width and height swap


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as :func:`load_image` returns it (EXIF orientation
    applied), read from the header without decoding the pixels."""
    with _opened(Path(path)) as im:
        w, h = im.size
        sideways = im.getexif().get(0x0112) in _SIDEWAYS
    return (w, h) if sideways else (h, w)


def _read_image_file(path: Path, max_side: int) -> np.ndarray:
    """Decode ``path`` as displayed, refusing oversized images from the header before decoding."""
    with _opened(path) as im:
        w, h = im.size  # read from the header: nothing is decoded yet
        _check_side(h, w, max_side, where=str(path))
        im.load()
        return _pil_to_rgb(ImageOps.exif_transpose(im))


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``path`` opened by Pillow (header read, pixels not decoded); every reader error, here or in
    the caller's block, becomes an :class:`ImageError` naming the file."""
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # the callers' max_side, checked from the header, is the size limit; Pillow's
            # pixel-count warning would only repeat it (its hard error, at twice that count, is
            # caught below)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"cannot read image {path}: it declares a size too large to decode safely ({e})") from e
    except Exception as e:  # every reader error (truncated data, bad chunks, codec errors) is the file's problem
        raise ImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _check_side(h: int, w: int, max_side: int, *, where: str = "image") -> None:
    if h < 1 or w < 1:
        raise ImageError(f"{where} is empty ({h}x{w})")
    if max(h, w) > max_side:
        raise ImageError(f"{where} is {w}x{h}; the longest side may be at most {max_side} pixels")


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(im))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"cannot use an array of shape {a.shape} as an image (expected [H, W], [H, W, 3] or [H, W, 4])")
    if a.shape[2] == 4:
        a = a[:, :, :3]  # alpha dropped: the model sees colour only
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError("image has NaN or infinite values")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        # 16-bit and 32-bit images: scale the type's range down to 8 bits
        top = 65535 if a.max(initial=0) <= 65535 else int(a.max())
        return (a.astype(np.float64) * (255.0 / top) + 0.5).clip(0, 255).astype(np.uint8)
    raise ImageError(f"unsupported image dtype {a.dtype}")
