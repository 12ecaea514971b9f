"""Weight-only 8-bit and 4-bit LLM inference through bitsandbytes.

Why bitsandbytes: it is the library transformers' own ``BitsAndBytesConfig`` uses, it runs on
CUDA and (since 0.46) on CPU, and its 4-bit weights are packed two to a byte on both, so a 4-bit
model takes a quarter of the bfloat16 memory here as on a GPU. (torchao 0.18 on this CPU packs
int4 only through an extra kernel library, and stores its portable int4 in int8 bytes.)

Only the LLM's transformer layers are quantized (every ``nn.Linear`` under its decoder): the
token embeddings, the LM head, the vision tower, the projector, the mask memory, the prompt head
and the mask decoder keep the model's dtype, as transformers' bitsandbytes integration keeps the
LM head by default. A quantized model is for inference only: it cannot be saved or trained
(quantize again after loading).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from segllm.config import QUANTIZE_MODES
from segllm.config import QuantizeMode as Mode
from segllm.errors import ConfigError
from segllm.linear import is_plain_linear

if TYPE_CHECKING:
    from segllm.model.segllm import SegLLM


def _bnb():
    # (segllm/_logging.py quiets bitsandbytes' CPU kernel notice before anything imports it)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError("8-bit and 4-bit weights need bitsandbytes: pip install 'segllm[quant]'") from e
    return bitsandbytes


def quantize_llm(model: SegLLM, mode: Mode, *, weights: Callable[[str, nn.Linear], torch.Tensor] | None = None) -> int:
    """Replace the linear layers of ``model``'s LLM decoder with bitsandbytes weight-only layers,
    in place, on the model's device; returns how many were replaced.

    Args:
        model: a loaded model (its LLM without LoRA adapters: merge them first).
        mode: "8bit" (LLM.int8 weights, per-row scales) or "4bit" (NF4, blocks of 64, computed in
            the model's dtype).
        weights: where each layer's float weight [out, in] comes from, given the layer's name
            in the decoder and the layer (default: the layer's own weight). Called once per layer
            just before it is quantized, so a model whose decoder layers are still on the meta
            device never holds more than one layer in float (``segllm bench --released-shape``).

    Raises:
        ConfigError: an unknown mode, LoRA adapters on the LLM, an already quantized model, or
            bitsandbytes missing.
    """
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if model.config.llm.lora.r:
        raise ConfigError("cannot quantize an LLM with LoRA adapters: fold them in first (segllm merge-lora)")
    if getattr(model, "quantized", None):
        raise ConfigError(f"the model is already quantized ({model.quantized})")
    bnb = _bnb()
    decoder = model.llm.get_decoder()
    device, dtype = model.device, model.dtype
    compute = dtype if dtype != torch.float32 else torch.float32
    # names, not modules: each replaced layer's weights are freed as soon as it is swapped, so
    # quantizing a 7B model never holds its bf16 and int8 copies at once
    targets = [name for name, mod in decoder.named_modules() if is_plain_linear(mod)]
    for name in targets:
        lin = decoder.get_submodule(name)
        parent = decoder.get_submodule(name.rpartition(".")[0]) if "." in name else decoder
        weight = (weights(name, lin) if weights is not None else lin.weight.data).to("cpu")
        bias = lin.bias is not None
        if mode == "8bit":
            # bitsandbytes computes int8 layers in float16 and logs on every call that it casts
            # bfloat16 inputs so; that is expected here and said once in the docs, not per layer
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
            # bitsandbytes quantizes an int8 parameter when it is moved to its device (below)
            new.weight = bnb.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=compute, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(weight.to(compute), requires_grad=False, quant_type="nf4")
            if lin.out_features % 32 or lin.in_features % 64:
                # bitsandbytes repacks 4-bit weights for CPUs with AVX512-BF16 in blocks of 32
                # output rows and 64 inputs and fails on other widths (the released miniature's
                # 172): those layers take its generic path
                new.support_avx512bf16_for_cpu = False
        if bias:
            new.bias = nn.Parameter(lin.bias.data.to("cpu", dtype), requires_grad=False)
        setattr(parent, name.rpartition(".")[2], new.to(device))
        del lin, weight
    model.quantized = mode
    for p in model.parameters():
        p.requires_grad_(False)
    return len(targets)


def llm_weight_bytes(model: SegLLM) -> int:
    """Bytes of the LLM decoder's weights as stored (quantized ones with their scales)."""
    return sum(t.numel() * t.element_size() for t in model.llm.get_decoder().state_dict().values())


__all__ = ["QUANTIZE_MODES", "llm_weight_bytes", "quantize_llm"]
