"""Start a SegLLM from a LLaVA-1.5 checkpoint folder, as the released recipes do.

Two public layouts are read (safetensors, single file or shards):

- the original ``liuhaotian/llava-v1.5-7b`` folder (``model_type`` "llava" with ``mm_projector_type``;
  keys ``model.layers.*``, ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``model.mm_projector.*``);
- the transformers ``llava-hf/llava-1.5-7b-hf`` folder (``text_config``/``vision_config``; keys
  ``language_model.model.*`` / ``language_model.lm_head`` / ``multi_modal_projector.linear_{1,2}``,
  or the newer ``model.language_model.*`` / ``lm_head`` / ``model.multi_modal_projector.*``).

The LLM and projector come from the folder; SegLLM's tokens (``<video>``, ``<seg>``) are added to
the tokenizer with their embedding rows set to the mean of the existing ones; the vision tower is
a CLIP folder (the released model uses CLIP ViT-L/14 at 224 px, ``openai/clip-vit-large-patch14``;
LLaVA-1.5's own tower is the 336 px one); the box encoder, prompt head and HIPIE start fresh
(or HIPIE from a safetensors file of its weights). Everything else is configured as the released
model (see :mod:`segllm.model.released`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from segllm.config import HipieDecoderConfig, VisionConfig
from segllm.decoders.hipie import load_released_hipie
from segllm.errors import CheckpointError
from segllm.hub import WEIGHT_PATTERNS, resolve_folder
from segllm.model.builder import build_segllm
from segllm.model.released import (
    _read,
    _weight_files,
    clip_vision_config,
    llama_config,
    read_clip_folder,
    released_like_config,
    rename_keys,
)

__all__ = ["llava_layout", "segllm_from_llava15"]

# (checkpoint prefix, this package's prefix) per layout; None: not used (the vision tower comes separately)
_MAPS = {
    "original": (
        ("lm_head.", "llm.lm_head."),
        ("model.mm_projector.", "projector."),
        ("model.vision_tower.", None),
        ("model.", "llm.model."),
    ),
    "hf": (
        ("language_model.lm_head.", "llm.lm_head."),
        ("language_model.model.", "llm.model."),
        ("model.language_model.", "llm.model."),
        ("lm_head.", "llm.lm_head."),
        ("multi_modal_projector.linear_1.", "projector.0."),
        ("multi_modal_projector.linear_2.", "projector.2."),
        ("model.multi_modal_projector.linear_1.", "projector.0."),
        ("model.multi_modal_projector.linear_2.", "projector.2."),
        ("vision_tower.", None),
        ("model.vision_tower.", None),
    ),
}


def llava_layout(path: str | Path) -> str:
    """"original" or "hf" for a LLaVA-1.5 folder (or hub id); :class:`CheckpointError` otherwise."""
    cfg_file = resolve_folder(path, patterns=WEIGHT_PATTERNS, what="LLaVA-1.5 folder") / "config.json"
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a LLaVA-1.5 folder: cannot read {cfg_file} ({e})") from None
    if data.get("model_type") != "llava":
        raise CheckpointError(f"{cfg_file}: model_type {data.get('model_type')!r} is not 'llava'")
    if "text_config" in data:
        return "hf"
    if "mm_projector_type" in data or "mm_hidden_size" in data:
        return "original"
    raise CheckpointError(f"{cfg_file}: neither the original LLaVA layout nor the transformers one")


def segllm_from_llava15(
    path: str | Path,
    *,
    vision_tower: str | Path,
    hipie: HipieDecoderConfig | None = None,
    hipie_weights: str | Path | None = None,
    seed: int = 0,
):
    """A SegLLM whose LLM and projector are LLaVA-1.5's (see the module docstring).

    Args:
        path: the LLaVA-1.5 folder (either layout), or a hub id such as ``liuhaotian/llava-v1.5-7b``
            or ``llava-hf/llava-1.5-7b-hf`` (``@revision`` allowed; see :mod:`segllm.hub`: its
            JSON, safetensors and tokenizer files are fetched into the hub cache).
        vision_tower: a CLIP folder (a full CLIP model or a CLIP vision model) or a hub id such as
            ``openai/clip-vit-large-patch14``.
        hipie: the decoder's configuration (default: the standard HIPIE-R50).
        hipie_weights: a safetensors file with HIPIE's weights (keys as in a released checkpoint,
            ``model.segmentator.hipie.*``, or bare); default: random initialisation.
        seed: seed of the parts that start fresh.

    Raises:
        CheckpointError: naming the file or key that does not fit.
    """
    path = resolve_folder(path, patterns=WEIGHT_PATTERNS, what="LLaVA-1.5 folder")
    layout = llava_layout(path)
    data = json.loads((path / "config.json").read_text())
    text = data.get("text_config", data) if layout == "hf" else data
    hf_llm = llama_config(text)
    state = _read(_weight_files(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e
    clip = resolve_folder(vision_tower, patterns=WEIGHT_PATTERNS, what="vision tower")
    config = released_like_config(_clip_vision(clip), hf_llm, hipie or HipieDecoderConfig())
    torch.manual_seed(seed)
    model = build_segllm(config, tokenizer)  # adds SegLLM's tokens; loads the CLIP folder
    ours = rename_keys(state, _MAPS[layout], path)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(("llm.", "projector."))}
    missing = sorted(set(own) - set(ours))
    extra = sorted(set(ours) - set(own))
    if missing or extra:
        raise CheckpointError(f"{path}: missing weight(s) {missing[:5]}; unexpected weight(s) {extra[:5]}")
    for key, value in ours.items():
        target = own[key]
        if key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight") and value.shape[0] < target.shape[0]:
            # the rows of SegLLM's added tokens start at the mean of LLaVA's rows
            mean = value.float().mean(0, keepdim=True).to(value.dtype)  # averaged in float32 even for bf16 weights
            value = torch.cat([value, mean.expand(target.shape[0] - value.shape[0], -1)])
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: weight {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        ours[key] = value
    model.load_state_dict(ours, strict=False)
    if hipie_weights is not None:
        weights = load_file(str(hipie_weights))
        prefix = "model.segmentator.hipie." if any(k.startswith("model.segmentator.hipie.") for k in weights) else ""
        load_released_hipie(model.decoder, weights, prefix=prefix, gamma="stored")
    return model


def _clip_vision(folder: Path) -> VisionConfig:
    """The vision config for a local CLIP folder, read as the released model reads CLIP."""
    found = read_clip_folder(folder)
    if found is None:
        raise CheckpointError(f"vision tower folder {folder} has no config.json")
    return clip_vision_config(*found, pretrained_path=str(folder))
