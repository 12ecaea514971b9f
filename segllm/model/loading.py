"""Checkpoint folder -> a built :class:`~segllm.model.segllm.SegLLM`.

Apart from :mod:`segllm.checkpoint` (the files: config, weights, tokenizer), because building
needs the builder, which imports the model: the checkpoint module stays a leaf.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from segllm.checkpoint import WEIGHTS_NAME, load_config, load_tokenizer, load_weights
from segllm.config import from_dict
from segllm.errors import CheckpointError, ConfigError
from segllm.hub import resolve_folder
from segllm.model.builder import build_decoder, build_segllm
from segllm.model.quantize import quantize_llm
from segllm.model.released import is_released_checkpoint, load_released
from segllm.model.segllm import SegLLM
from segllm.precision import warn_if_slow_bfloat16


def load_pretrained(
    path: str | Path,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
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
        quantize: "8bit" or "4bit": the LLM's transformer layers get bitsandbytes weight-only
            layers (see :mod:`segllm.model.quantize`; inference only).

    Raises:
        CheckpointError: naming the file or weight that is missing, unreadable or misshapen.
        segllm.hub.HubError: a hub id that cannot be resolved (says how to download it).
    """
    path = resolve_folder(path, revision=revision)
    if is_released_checkpoint(path):
        model = load_released(path, device=device, dtype=dtype)
    else:
        config = load_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
        # no random initialisation: load_weights fills every parameter (it refuses a missing one)
        model = build_segllm(config, load_tokenizer(path), load_weights=False, init_weights=False)
        load_weights(model, weights)
        model.eval()
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
    if dtype == torch.bfloat16:
        warn_if_slow_bfloat16(device, "dtype bfloat16", "convolutions and linear layers are computed in float32 "
                              "(the weights keep bfloat16's memory), the rest emulated; float32 is faster where memory allows")
    if quantize:
        quantize_llm(model, quantize)
    return model


def load_with_decoder_changes(path: str | Path, changes: dict[str, Any], *, revision: str | None = None) -> SegLLM:
    """A checkpoint with some of its decoder's options changed (e.g. ``{"ref_prior": True}``),
    to train on from there: the weights the change adds keep their initialisation (the decoder
    defines it; ``ref_prior``'s layers start at zero, so the model starts as it was saved) and
    every other weight comes from the checkpoint, which must hold all of them.

    Raises:
        ConfigError: an unknown decoder option or a bad value.
        CheckpointError: the checkpoint lacks a weight the change does not add.
    """
    path = resolve_folder(path, revision=revision)
    config = load_config(path)
    before = {f"decoder.{k}" for k in build_decoder(config, load_weights=False).state_dict()}
    try:
        config.decoder = from_dict(type(config.decoder), {**dataclasses.asdict(config.decoder), **changes})
    except ConfigError as e:
        raise ConfigError(f"decoder changes {changes}: {e}") from e
    model = build_segllm(config, load_tokenizer(path), load_weights=False)
    added = {k for k in model.state_dict() if k.startswith("decoder.")} - before
    load_weights(model, path / WEIGHTS_NAME, new=frozenset(added))
    return model
