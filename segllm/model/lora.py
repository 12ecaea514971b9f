"""LoRA adapters on the LLM (through peft), and folding them back into plain weights.

The adapters are injected into the LLM's own modules (``peft.inject_adapter_in_model``), so
the model keeps its structure and parameter names (each adapted layer gains ``base_layer`` and
``lora_A``/``lora_B`` children); a checkpoint of an adapted model records the LoRA settings in
its config and reloads with the adapters in place.
"""

from __future__ import annotations

import sys

from torch import nn

from segllm.config import LoraConfig
from segllm.errors import ConfigError


def add_lora(llm: nn.Module, config: LoraConfig) -> nn.Module:
    """Inject LoRA adapters (rank ``config.r``) into ``llm``'s target linear layers, in place."""
    if config.r <= 0:
        raise ConfigError(f"LoRA rank must be > 0, got {config.r}")
    if has_lora(llm):
        raise ConfigError("the LLM already has LoRA adapters")
    names = {n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in config.targets if t not in names]
    if missing or not config.targets:
        raise ConfigError(f"LoRA targets {missing or list(config.targets)} are not linear layers of the LLM (it has {sorted(names)})")
    # peft is imported here, not with the module: it takes ~2 s (it pulls in bitsandbytes), which
    # every `segllm chat` would pay at start-up for a model without adapters
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.targets), bias="none")
    return inject_adapter_in_model(peft_config, llm)


def has_lora(module: nn.Module) -> bool:
    layer = _lora_layer_type()
    return layer is not None and any(isinstance(m, layer) for m in module.modules())


def _lora_layer_type() -> type | None:
    """peft's LoRA layer class, or None while peft's LoRA module is not loaded: then no module
    holds an adapter (making one imports it), and checking needs no ~2 s import of peft."""
    lora = sys.modules.get("peft.tuners.lora")
    return None if lora is None else lora.LoraLayer


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def merge_lora(llm: nn.Module) -> int:
    """Fold every adapter into its base layer's weights and put the plain layer back; returns
    how many layers were merged. The merged LLM computes the same function (up to rounding)."""
    layer = _lora_layer_type()
    targets = [(name, m) for name, m in llm.named_modules() if layer is not None and isinstance(m, layer)]
    for name, module in targets:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, module.get_base_layer())
    return len(targets)
