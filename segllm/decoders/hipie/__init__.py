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

from segllm.decoders.hipie.config import HipieDecoderConfig
from segllm.decoders.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _DECODER_MODULE, _DECODER_NAMES)
