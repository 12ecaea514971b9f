"""Checkpoint folder -> a built :class:`~segllm.model.segllm.SegLLM`.

Apart from :mod:`segllm.checkpoint` (the files: config, weights, tokenizer), because building
needs the builder, which imports the model: the checkpoint module stays a leaf.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segllm.checkpoint import WEIGHTS_NAME, load_config, load_tokenizer, load_weights
from segllm.errors import CheckpointError
from segllm.hub import resolve_folder
from segllm.model.builder import build_segllm
from segllm.model.released import is_released_checkpoint, load_released
from segllm.model.segllm import SegLLM


def load_pretrained(
    path: str | Path,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> SegLLM:
    """Read a checkpoint folder into a :class:`segllm.SegLLM` (eval mode): one written by
    :func:`segllm.checkpoint.save_pretrained`, or a released SegLLM folder (see
    :mod:`segllm.model.released`).

    Args:
        path: the folder, or a hub id (``org/name``, ``org/name/subfolder``, ``...@revision``)
            resolved into the hub cache by :func:`segllm.hub.resolve_folder` (a local folder of
            that name wins).
        revision: the hub revision (branch, tag or commit) of a hub id.
        device, dtype: where and in which precision to put the model (default: CPU, float32).

    Raises:
        CheckpointError: naming the file or weight that is missing, unreadable or misshapen.
        segllm.hub.HubError: a hub id that cannot be resolved (says how to download it).
    """
    path = resolve_folder(path, revision=revision)
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
