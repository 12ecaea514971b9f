"""The direct mask decoder (:mod:`.decoder`) and its config (:mod:`.config`)."""

from __future__ import annotations

from segllm.decoders.direct.config import DirectDecoderConfig
from segllm.decoders.lazy import lazy_exports

_DECODER_MODULE = "segllm.decoders.direct.decoder"
_DECODER_NAMES = ("DirectMaskDecoder", "build_direct_decoder")

__all__ = ["DirectDecoderConfig", *_DECODER_NAMES]


__getattr__, __dir__ = lazy_exports(__name__, _DECODER_MODULE, _DECODER_NAMES)
