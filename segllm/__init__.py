"""SegLLM: multi-round reasoning segmentation with conversational mask memory.

The names below are imported on first use (PEP 562), so that ``import segllm`` and the
``segllm`` command's parser do not load torch and transformers before they are needed;
``from segllm import Session`` works as usual.
"""

import importlib

import segllm._logging  # noqa: F401  (first: it quiets a third-party notice before those packages load)

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "Conversation": "segllm.conversation",
    "Prediction": "segllm.model.rounds",
    "Round": "segllm.conversation",
    "SegLLM": "segllm.model.segllm",
    "SegLLMConfig": "segllm.config",
    "SegLLMError": "segllm.errors",
    "Session": "segllm.session",
    "build_segllm": "segllm.model.builder",
    "load_image": "segllm.conversation",
    "load_model": "segllm.default",
    "parse_refs": "segllm.conversation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'segllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
