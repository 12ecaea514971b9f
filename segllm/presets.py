"""Ready-made model configurations.

``tiny``: a few hundred thousand parameters, for tests (builds in well under a second).
``small``: the previous bundled default model's shape (CPU-trainable).
``grounded`` and ``direct``: the ``small`` LLM with convolutional image encoders and dense
attribute supervision (issue 13's designs); ``direct`` (the bundled default model's shape) also
has the direct mask decoder with attribute matching.
Both use a LLaMA-layout LLM and a CLIP-layout vision tower built from config, so any
transformers model of those families plugs into the same places.
"""

from __future__ import annotations

import dataclasses

from segllm.config import (
    PART_NAMES,
    DenseConfig,
    LLMConfig,
    MemoryConfig,
    PromptHeadConfig,
    SamDecoderConfig,
    SegLLMConfig,
    TemplateConfig,
    VisionConfig,
)
from segllm.data.world.dense import DENSE_GROUPS
from segllm.decoders.direct.config import DirectDecoderConfig

# every part starts from random weights here, so every part trains (a pretrained vision tower
# would stay frozen, as in the released recipe)
FROM_SCRATCH = PART_NAMES


def llama_config(*, vocab_size: int, hidden: int, layers: int, heads: int, ffn: int, context: int = 2048) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def clip_vision_config(*, image_size: int, patch: int, hidden: int, layers: int, heads: int) -> dict:
    return {
        "model_type": "clip_vision_model",
        "image_size": image_size,
        "patch_size": patch,
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": hidden,
    }


def tiny_config(vocab_size: int = 512, *, memory: bool = True) -> SegLLMConfig:
    """A model small enough for unit tests (64 px images, 2-layer LLaMA of width 64)."""
    return SegLLMConfig(
        vision=VisionConfig(
            hf_config=clip_vision_config(image_size=64, patch=16, hidden=32, layers=2, heads=2),
            image_size=64,
        ),
        llm=LLMConfig(hf_config=llama_config(vocab_size=vocab_size, hidden=64, layers=2, heads=4, ffn=128, context=512)),
        memory=MemoryConfig(enabled=memory),
        prompt_head=PromptHeadConfig(num_tokens=4, num_ref_tokens=2, dim=32, norm=True),
        decoder=SamDecoderConfig(
            image_size=64, patch_size=8, encoder_dim=32, encoder_depth=1, encoder_heads=2, dim=32, depth=1, heads=2, mlp_dim=64
        ),
        template=TemplateConfig(),
        trainable=FROM_SCRATCH,
    )


def small_config(vocab_size: int = 1024, *, memory: bool = True) -> SegLLMConfig:
    """The previous bundled default model's shape: 128 px images, a 4-layer LLaMA of width 256."""
    return SegLLMConfig(
        vision=VisionConfig(
            hf_config=clip_vision_config(image_size=128, patch=16, hidden=128, layers=3, heads=4),
            image_size=128,
        ),
        llm=LLMConfig(hf_config=llama_config(vocab_size=vocab_size, hidden=256, layers=4, heads=4, ffn=768, context=1024)),
        memory=MemoryConfig(enabled=memory),
        prompt_head=PromptHeadConfig(num_tokens=8, num_ref_tokens=4, dim=128, norm=True),
        decoder=SamDecoderConfig(
            image_size=128, patch_size=8, encoder_dim=128, encoder_depth=3, encoder_heads=4, dim=128, depth=2, heads=4, mlp_dim=512
        ),
        template=TemplateConfig(),
        trainable=FROM_SCRATCH,
    )


def grounded_config(vocab_size: int = 1024, *, memory: bool = True) -> SegLLMConfig:
    """The ``small`` LLM with convolutional image encoders and dense attribute supervision.

    Both the LLM's vision tower (stride 16: 8x8 tokens, a position embedding per cell; stride 8's
    16x16 tokens made a CPU step 1.7x slower) and the mask decoder's image encoder (stride 8) are
    :class:`segllm.decoders.convnet.ConvBackbone`, and both feature maps learn each pixel's
    colour, category, texture and size from the procedural world's labels (``dense``), so the
    image tokens carry what the questions' words name from the start (issue 13's experiments).
    """
    cfg = small_config(vocab_size, memory=memory)
    cfg.vision = VisionConfig(
        hf_config={"model_type": "segllm_conv", "image_size": 128, "stride": 16, "width": 64, "depth": 1, "hidden_size": 128},
        image_size=128,
    )
    cfg.decoder = SamDecoderConfig(
        image_size=128, patch_size=8, encoder="conv", encoder_dim=64, encoder_depth=2, dim=128, depth=2, heads=4, mlp_dim=512
    )
    cfg.dense = DenseConfig(groups=dict(DENSE_GROUPS))
    return cfg


def direct_config(vocab_size: int = 1024, *, memory: bool = True) -> SegLLMConfig:
    """The ``grounded`` LLM side with the direct mask decoder (stride 4: 32x32 features and masks)
    with attribute matching, and a prompt head that reads its round's tokens.

    Why (issue 13): the masks are a dot product of the prompt with prompt-modulated pixel features
    (:mod:`segllm.decoders.direct`), so the mask loss reaches the prompt head and the LLM in two
    steps instead of through a two-way transformer and a hypernetwork; and the decoder's attribute
    matching marks the pixels whose classes (colour, category, texture, size) the question names,
    with both classifiers supervised directly (the pixels by the world's dense maps, the prompt by
    what its question names), so "the red star" can be found before the rest of the model has
    learned to link words to pixels.
    """
    cfg = grounded_config(vocab_size, memory=memory)
    cfg.decoder = DirectDecoderConfig(
        image_size=128, stride=4, encoder_width=32, encoder_depth=1, dim=128, fuse_dim=64, fuse_depth=1, context_grid=8,
        attributes=dict(DENSE_GROUPS),
    )
    cfg.prompt_head = dataclasses.replace(cfg.prompt_head, attend_round=True)
    # the decoder's own pixel classifier is its dense head; the vision tower keeps one
    cfg.dense = DenseConfig(groups=dict(DENSE_GROUPS), on=("vision",))
    return cfg

PRESETS = {"tiny": tiny_config, "small": small_config, "grounded": grounded_config, "direct": direct_config}
