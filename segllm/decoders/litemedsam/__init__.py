"""LiteMedSAM as a mask decoder (:mod:`.decoder`) and its config (:mod:`.config`)."""

from __future__ import annotations

import importlib
from typing import Any

from segllm.decoders.litemedsam.config import LiteMedSamDecoderConfig

# The decoder module (torch) loads on first access to one of its names, so that segllm.config,
# which reads this package's config module, never imports it.
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


def __getattr__(name: str) -> Any:
    if name in _DECODER_NAMES:
        return getattr(importlib.import_module(_DECODER_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
