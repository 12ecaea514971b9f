"""The SAM-style mask decoder (:mod:`.decoder`) and its config (:mod:`.config`)."""

from __future__ import annotations

import importlib
from typing import Any

from segllm.decoders.sam.config import SamDecoderConfig

# The decoder module (torch) loads on first access to one of its names, so that segllm.config,
# which reads this package's config module, never imports it.
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


def __getattr__(name: str) -> Any:
    if name in _DECODER_NAMES:
        return getattr(importlib.import_module(_DECODER_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
