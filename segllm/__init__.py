"""SegLLM: multi-round reasoning segmentation with conversational mask memory."""

import segllm._logging  # noqa: F401  (first: it quiets a third-party notice before those packages load)
from segllm.config import SegLLMConfig
from segllm.conversation import Conversation, Round, load_image, parse_refs
from segllm.default import load_model
from segllm.errors import SegLLMError
from segllm.model.builder import build_segllm
from segllm.model.rounds import Prediction
from segllm.model.segllm import SegLLM

__version__ = "0.1.0"

__all__ = [
    "Conversation",
    "Prediction",
    "Round",
    "SegLLM",
    "SegLLMConfig",
    "SegLLMError",
    "build_segllm",
    "load_image",
    "load_model",
    "parse_refs",
]
