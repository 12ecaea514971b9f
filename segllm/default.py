"""The bundled default model, and where to find it."""

from __future__ import annotations

from pathlib import Path

import torch

from segllm.model.segllm import SegLLM

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
EXAMPLES = ASSETS / "examples"


def has_default_model() -> bool:
    """Whether the bundled model is installed (the package data holds its config.json)."""
    return (DEFAULT_MODEL / "config.json").is_file()


def load_model(checkpoint: str | Path | None = None, *, device: str | None = None, dtype: torch.dtype | None = None) -> SegLLM:
    """Load ``checkpoint`` (a folder), or the bundled default model when none is given.

    Raises:
        CheckpointError: the folder is missing or not a checkpoint (for the bundled model: a
            broken install).
    """
    return SegLLM.from_pretrained(DEFAULT_MODEL if checkpoint is None else checkpoint, device=device, dtype=dtype)
