"""HIPIE-R50, the mask decoder of the released SegLLM, in plain PyTorch.

Files by concept: :mod:`.config` (hyperparameters), :mod:`.backbone` (ResNet-50, frozen BN,
sine positions), :mod:`.deform_attn` (multi-scale deformable attention with ``grid_sample``),
:mod:`.fusion` (bidirectional vision-language attention), :mod:`.transformer` (encoder,
two-stage query selection, refining decoder), :mod:`.heads` (token alignment, objectness,
CondInst mask head), :mod:`.postprocess` (scores, NMS, ranking), :mod:`.decoder` (the
:class:`~segllm.decoders.base.MaskDecoder`, its build function and the released-checkpoint loader) and
:mod:`.criterion` (HIPIE's set-prediction training losses).
"""

from __future__ import annotations

import importlib
from typing import Any

from segllm.decoders.hipie.config import HipieDecoderConfig

# The decoder module (torch) loads on first access to one of its names, so that segllm.config,
# which reads this package's config module, never imports it.
_DECODER_MODULE = "segllm.decoders.hipie.decoder"
_DECODER_NAMES = (
    "HipieDecoder",
    "HipieImageFeatures",
    "HipieRawOutput",
    "Instances",
    "build_hipie_decoder",
    "load_released_hipie",
)

__all__ = ["HipieDecoderConfig", *_DECODER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _DECODER_NAMES:
        return getattr(importlib.import_module(_DECODER_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
