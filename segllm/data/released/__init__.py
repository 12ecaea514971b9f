"""The released SegLLM data: conversation files with bracket macros, and their mask sources.

- :mod:`.macros`: parse ``[IMAGE256:...]``, ``[MASK-ENCODE:...]``, ``[BOX-ENCODE:...]``,
  ``[MASK-DECODE:...]`` records and write them back;
- :mod:`.masks`: :class:`MaskLookup`, ground-truth masks by (dataset name, image, mask id);
- :mod:`.refer`: REFER refs pickles (read with a restricted unpickler) and instances.json;
- :mod:`.convert`: records <-> :class:`segllm.conversation.Conversation`, and
  :class:`ReleasedConversations`, a dataset over a released conversation file.
"""

from segllm.data.records import RecordError, Skipped
from segllm.data.released.convert import (
    MAX_TRAIN_ROUNDS,
    MaskStore,
    ReleasedConversations,
    ReleasedInfo,
    conversation_to_released,
    released_to_conversation,
    released_to_conversation_with_info,
)
from segllm.data.released.macros import (
    DecodeMacro,
    EncodeMacro,
    ImageMacro,
    MaskId,
    ParsedRecord,
    Turn,
    image_path_candidates,
    parse_id,
    parse_macro,
    parse_record,
    parse_ref_id,
    resolve_image_path,
    split_text,
)
from segllm.data.released.masks import DATASETS, MaskLookup, decode_segmentation, reason_seg_label_map
from segllm.data.released.refer import Refer, RestrictedUnpickler, load_instances, load_refs, restricted_loads

__all__ = [
    "DATASETS",
    "MAX_TRAIN_ROUNDS",
    "DecodeMacro",
    "EncodeMacro",
    "ImageMacro",
    "MaskId",
    "MaskLookup",
    "MaskStore",
    "ParsedRecord",
    "RecordError",
    "Refer",
    "ReleasedConversations",
    "ReleasedInfo",
    "RestrictedUnpickler",
    "Skipped",
    "Turn",
    "conversation_to_released",
    "decode_segmentation",
    "image_path_candidates",
    "load_instances",
    "load_refs",
    "parse_id",
    "parse_macro",
    "parse_record",
    "parse_ref_id",
    "reason_seg_label_map",
    "released_to_conversation",
    "released_to_conversation_with_info",
    "resolve_image_path",
    "restricted_loads",
    "split_text",
]
