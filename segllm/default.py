"""The bundled default model, and where to find it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from segllm.model.builder import build_segllm
from segllm.model.segllm import SegLLM
from segllm.presets import tiny_config
from segllm.tokenizer import train_bpe_tokenizer

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
EXAMPLES = ASSETS / "examples"

log = logging.getLogger(__name__)

_CORPUS = [
    "Segment the red circle.", "Can you segment the blue square on the left?", "Please segment the star.",
    "Where is the object next to instance 1?", "Segment the shape with the same colour as instance 2.",
    "It is <seg>.", "Sure, <seg>.", "<seg>", "the roof of instance 1", "the largest object below instance 3",
]


def has_default_model() -> bool:
    return (DEFAULT_MODEL / "config.json").is_file()


def untrained_model(seed: int = 0):
    """A tiny randomly initialised SegLLM (for trying the pipeline; its masks mean nothing)."""

    tok = train_bpe_tokenizer(_CORPUS * 4, vocab_size=400)
    torch.manual_seed(seed)
    return build_segllm(tiny_config(len(tok)), tok).eval()


def load_model(checkpoint: str | Path | None = None, *, device: str | None = None, dtype: torch.dtype | None = None):
    """Load ``checkpoint`` (a folder), or the bundled default model when none is given.

    Until a trained default model is bundled, the default is :func:`untrained_model` and a
    warning says so.
    """

    if checkpoint is not None:
        return SegLLM.from_pretrained(checkpoint, device=device, dtype=dtype)
    if has_default_model():
        return SegLLM.from_pretrained(DEFAULT_MODEL, device=device, dtype=dtype)
    log.warning("no trained default model is bundled yet: using a tiny RANDOMLY INITIALISED model (its masks mean nothing)")
    model = untrained_model()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
