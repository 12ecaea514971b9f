"""LiteMedSAM as a mask decoder (:mod:`.decoder`) and its config (:mod:`.config`)."""

from __future__ import annotations

from segllm.decoders.lazy import lazy_exports
from segllm.decoders.litemedsam.config import LiteMedSamDecoderConfig

_DECODER_MODULE = "segllm.decoders.litemedsam.decoder"
_DECODER_NAMES = (
    "ConvBN",
    "LiteMedSamDecoder",
    "TinyViTEncoder",
    "build_litemedsam_decoder",
    "litemedsam_checkpoint",
    "load_litemedsam",
    "map_litemedsam_state",
    "our_key",
    "read_litemedsam_state",
)

__all__ = ["LiteMedSamDecoderConfig", *_DECODER_NAMES]


__getattr__, __dir__ = lazy_exports(__name__, _DECODER_MODULE, _DECODER_NAMES)
