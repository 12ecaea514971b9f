"""The bundled default model, and where to find it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from segllm.config import MASK_REGIONS
from segllm.errors import CheckpointError, ConfigError
from segllm.model.loading import load_pretrained
from segllm.model.segllm import SegLLM

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
EXAMPLES = ASSETS / "examples"

log = logging.getLogger(__name__)


def has_default_model() -> bool:
    """Whether the bundled model is installed (the package data holds its config.json)."""
    return (DEFAULT_MODEL / "config.json").is_file()


DEFAULT_EDGE_PASSES = 20  # the edge filter's passes where --edge-filter on meets a checkpoint without one

def load_model(
    checkpoint: str | Path | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    mask_region: str | None = None,
    compile: bool = False,
    edge_filter: bool | None = None,
) -> SegLLM:
    """Load ``checkpoint`` (a folder or a hub id such as ``Marlo-Z/SegLLM/all_data_checkpoint``,
    see :mod:`segllm.hub`), or the bundled default model when none is given (never a hub default).

    Args:
        revision: the hub revision of a hub id (branch, tag or commit).
        device, dtype: where and in which precision to put the model (default: CPU, float32).
        quantize: "8bit" or "4bit" LLM weights (bitsandbytes; :mod:`segllm.model.quantize`).
        mask_region: "all" or "most_confident" in place of the checkpoint's
            ``SegLLMConfig.mask_region`` (None: the checkpoint's).
        edge_filter: the edge filter (``SegLLMConfig.edge_filter``) on or off in place of the
            checkpoint's setting (None: the checkpoint's); on, for a checkpoint without one, with
            :class:`segllm.config.EdgeFilterConfig`'s defaults and ``DEFAULT_EDGE_PASSES`` passes.
        compile: compile the mask decoder's heaviest CPU-inference steps (:meth:`SegLLM.set_compiled`;
            HIPIE, the released decoder, has them; for another decoder a warning says it does nothing).

    Raises:
        CheckpointError: the folder is missing or not a checkpoint (for the bundled model: a
            broken install); :class:`segllm.hub.HubError` for a hub id that cannot be resolved.
    """
    if checkpoint is None and revision is not None:
        raise CheckpointError("a revision was given without a hub id (--checkpoint org/name[/subfolder])")
    model = load_pretrained(DEFAULT_MODEL if checkpoint is None else checkpoint, revision=revision, device=device, dtype=dtype, quantize=quantize)
    if mask_region is not None:
        if mask_region not in MASK_REGIONS:
            raise ConfigError(f"mask_region must be one of {list(MASK_REGIONS)}, got {mask_region!r}")
        model.config.mask_region = mask_region
    if edge_filter is not None:
        ef = model.config.edge_filter
        model.config.edge_filter = dataclasses.replace(ef, iterations=(ef.iterations or DEFAULT_EDGE_PASSES) if edge_filter else 0)
    if compile and not model.set_compiled(True):
        log.warning("compile: the mask decoder (%s) has no compiled mode; it runs as it is", type(model.decoder).__name__)
    return model
