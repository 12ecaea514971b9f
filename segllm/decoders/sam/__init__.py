"""The SAM-style mask decoder (:mod:`.decoder`) and its config (:mod:`.config`)."""

from __future__ import annotations

from segllm.decoders.lazy import lazy_exports
from segllm.decoders.sam.config import SamDecoderConfig

_DECODER_MODULE = "segllm.decoders.sam.decoder"
_DECODER_NAMES = (
    "MLP",
    "Attention",
    "EncoderBlock",
    "ImageEncoder",
    "LayerNorm2d",
    "RandomFourierPositionEncoding",
    "SamFamilyDecoder",
    "SamMaskDecoder",
    "TwoWayBlock",
    "TwoWayTransformer",
    "build_sam_decoder",
)

__all__ = ["SamDecoderConfig", *_DECODER_NAMES]


__getattr__, __dir__ = lazy_exports(__name__, _DECODER_MODULE, _DECODER_NAMES)
