"""Checkpoint folder -> a built :class:`~segllm.model.segllm.SegLLM`.

Apart from :mod:`segllm.checkpoint` (the files: config, weights, tokenizer), because building
needs the builder, which imports the model: the checkpoint module stays a leaf.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segllm.checkpoint import WEIGHTS_NAME, load_config, load_tokenizer, load_weights
from segllm.errors import CheckpointError
from segllm.model.builder import build_segllm
from segllm.model.released import is_released_checkpoint, load_released
from segllm.model.segllm import SegLLM


def load_pretrained(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SegLLM:
    """Read a checkpoint folder into a :class:`segllm.SegLLM` (eval mode): one written by
    :func:`segllm.checkpoint.save_pretrained`, or a released SegLLM folder (see
    :mod:`segllm.model.released`).

    Raises:
        CheckpointError: naming the file or weight that is missing, unreadable or misshapen.
    """
    path = Path(path)
    if is_released_checkpoint(path):
        return load_released(path, device=device, dtype=dtype)
    config = load_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    model = build_segllm(config, load_tokenizer(path), load_weights=False)
    load_weights(model, weights)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
