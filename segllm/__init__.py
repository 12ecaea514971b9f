"""SegLLM: multi-round reasoning segmentation with conversational mask memory."""

import logging

# peft imports bitsandbytes where it is installed (segllm[quant]); on CPUs with AVX512-BF16 that
# warns that an optional kernel from the Hugging Face hub is missing. We never download it (its
# plain CPU path serves), so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
