"""Which parameters train: the model's named parts, and freezing all but some of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from torch import nn

from segllm.model.lora import is_lora_parameter

if TYPE_CHECKING:  # the model calls these; they only read a built model
    from segllm.model.segllm import SegLLM


def part_parameters(model: SegLLM) -> dict[str, list[nn.Parameter]]:
    """Parameters of each named part (see ``SegLLMConfig.trainable``), by module ownership:
    vision, projector, llm (without its embeddings), embeddings (input and output), memory,
    prompt_head, decoder_encoder (the decoder's image encoder), decoder (the rest of it) and
    dense_head."""
    emb = [model.llm.get_input_embeddings()]
    out_emb = model.llm.get_output_embeddings()
    if out_emb is not None:
        emb.append(out_emb)
    emb_ids = {id(p) for m in emb for p in m.parameters()}
    enc = model.decoder.image_encoder
    enc_ids = {id(p) for p in enc.parameters()}
    return {
        "vision": list(model.vision.parameters()),
        "projector": list(model.projector.parameters()),
        "llm": [p for p in model.llm.parameters() if id(p) not in emb_ids],
        "embeddings": _unique(p for m in emb for p in m.parameters()),
        "memory": list(model.memory.parameters()),
        "prompt_head": list(model.prompt_head.parameters()),
        "decoder_encoder": list(enc.parameters()),
        "decoder": [p for p in model.decoder.parameters() if id(p) not in enc_ids],
        "dense_head": list(model.dense_head.parameters()) if model.dense_head is not None else [],
    }


def set_trainable(model: SegLLM, parts: Sequence[str]) -> None:
    """Give gradients to exactly the named parts (with LoRA on the LLM, "llm" means its adapters).

    Raises:
        ValueError: a name is not a part.
    """
    parts = tuple(parts)
    groups = part_parameters(model)
    unknown = [p for p in parts if p not in groups]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; parts are {list(groups)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in parts:
        for p in groups[name]:
            p.requires_grad_(True)
    if model.config.llm.lora.r and "llm" in parts:
        # with LoRA adapters, training the LLM means training the adapters only
        emb = {id(p) for p in groups["embeddings"]} if "embeddings" in parts else set()
        for n, p in model.llm.named_parameters():
            if not is_lora_parameter(n) and id(p) not in emb:
                p.requires_grad_(False)


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` without repeats (tied weights appear once), in order."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
