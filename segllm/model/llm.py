"""The LLM: any transformers causal LM, built from its config or a local folder."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from segllm.config import LLMConfig
from segllm.errors import ConfigError
from segllm.hub import WEIGHT_PATTERNS, resolve_folder


def build_llm(config: LLMConfig, tokenizer: PreTrainedTokenizerBase, *, load_weights: bool = True) -> PreTrainedModel:
    """A causal LM whose vocabulary covers ``tokenizer`` (embeddings resized when needed).

    Random weights from ``config.hf_config``, or pretrained weights from the folder (or hub id,
    see :func:`segllm.hub.resolve_folder`) ``config.pretrained_path`` when ``load_weights`` is set.
    ``config.hf_config`` is updated to the built model's config so a checkpoint records the exact
    shapes.
    """
    if load_weights and config.pretrained_path:
        folder = resolve_folder(config.pretrained_path, patterns=WEIGHT_PATTERNS, what="LLM folder")
        llm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    else:
        hf = dict(config.hf_config)
        model_type = hf.pop("model_type", None)
        if not model_type:
            raise ConfigError("llm.hf_config needs a model_type (e.g. 'llama', 'qwen2')")
        hf_cfg = AutoConfig.for_model(model_type, **hf)
        llm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    if llm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        # mean_resizing initialises new rows at the mean of the old ones (stable start for added tokens)
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=load_weights and bool(config.pretrained_path))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(llm.config, name, getattr(tokenizer, name))
    llm.config.use_cache = False
    config.hf_config = _config_dict(llm.config)
    return llm


def _config_dict(hf_config) -> dict:
    d = hf_config.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        d.pop(k, None)
    return d


def max_positions(llm: PreTrainedModel) -> int:
    """The LLM's context length in tokens."""
    cfg = llm.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ConfigError("cannot tell the LLM's context length from its config; set template.max_length")


def causal_mask(attention: Tensor, width: int) -> Tensor:
    """The attention of the last ``width`` of T tokens (a chunk appended to a cache, or, with
    ``width`` = T, a whole batch): [B, T] (1: a real token, 0: padding; the chunk's tokens last)
    -> [B, 1, width, T] bool, True where a query may attend (a real key at or before the
    query's column), as torch's scaled-dot-product attention takes it.

    Why build it here when transformers would build the same from the [B, T] mask: on a filled
    cache its builder runs a ``vmap`` over the mask function (~10 ms a call for a padded batch on
    the CPU, a tenth of a batch-segmentation round on the bundled model), and over a whole batch
    it first reads back whether there is any padding (``mask.all()``), which on a GPU makes the
    host wait for the device in every training step. A 4-D mask goes to the attention as it is."""
    T = attention.shape[1]
    keys = torch.arange(T, device=attention.device)
    queries = torch.arange(T - width, T, device=attention.device)
    return attention.bool()[:, None, None, :] & (keys[None, :] <= queries[:, None])


def attention_mask_for(llm: PreTrainedModel, attention: Tensor, width: int) -> Tensor:
    """The attention mask to give ``llm`` for its last ``width`` tokens from their [B, T] mask:
    with torch's scaled-dot-product attention the 4-D boolean :func:`causal_mask`, which it takes
    as it is; other implementations (eager adds a float mask) get the [B, T] mask, from which
    transformers builds theirs."""
    if getattr(llm.config, "_attn_implementation", None) == "sdpa":
        return causal_mask(attention, width)
    return attention
