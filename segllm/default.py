"""The bundled default model, and where to find it."""

from __future__ import annotations

from pathlib import Path

import torch

from segllm.errors import CheckpointError
from segllm.model.loading import load_pretrained
from segllm.model.segllm import SegLLM

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
EXAMPLES = ASSETS / "examples"


def has_default_model() -> bool:
    """Whether the bundled model is installed (the package data holds its config.json)."""
    return (DEFAULT_MODEL / "config.json").is_file()


def load_model(
    checkpoint: str | Path | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
) -> SegLLM:
    """Load ``checkpoint`` (a folder or a hub id such as ``Marlo-Z/SegLLM/all_data_checkpoint``,
    see :mod:`segllm.hub`), or the bundled default model when none is given (never a hub default).

    Args:
        revision: the hub revision of a hub id (branch, tag or commit).
        device, dtype: where and in which precision to put the model (default: CPU, float32).
        quantize: "8bit" or "4bit" LLM weights (bitsandbytes; :mod:`segllm.model.quantize`).

    Raises:
        CheckpointError: the folder is missing or not a checkpoint (for the bundled model: a
            broken install); :class:`segllm.hub.HubError` for a hub id that cannot be resolved.
    """
    if checkpoint is None and revision is not None:
        raise CheckpointError("a revision was given without a hub id (--checkpoint org/name[/subfolder])")
    return load_pretrained(DEFAULT_MODEL if checkpoint is None else checkpoint, revision=revision, device=device, dtype=dtype, quantize=quantize)
