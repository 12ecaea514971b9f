"""HIPIE-R50, the mask decoder of the released SegLLM, in plain PyTorch.

Files by concept: :mod:`.config` (hyperparameters), :mod:`.backbone` (ResNet-50, frozen BN,
sine positions), :mod:`.deform_attn` (multi-scale deformable attention with ``grid_sample``),
:mod:`.fusion` (bidirectional vision-language attention), :mod:`.transformer` (encoder,
two-stage query selection, refining decoder), :mod:`.heads` (token alignment, objectness,
CondInst mask head), :mod:`.postprocess` (scores, NMS, ranking), :mod:`.decoder` (the
:class:`~segllm.decoders.base.MaskDecoder` and the released-checkpoint loader) and
:mod:`.criterion` (HIPIE's set-prediction training losses).
"""

from segllm.decoders.hipie.config import HipieDecoderConfig
from segllm.decoders.hipie.decoder import (
    HipieDecoder,
    HipieImageFeatures,
    HipieRawOutput,
    load_released_hipie,
)
from segllm.decoders.hipie.postprocess import Instances

__all__ = [
    "HipieDecoder",
    "HipieDecoderConfig",
    "HipieImageFeatures",
    "HipieRawOutput",
    "Instances",
    "load_released_hipie",
]
