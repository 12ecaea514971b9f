"""Wire a SegLLM from its config: every part built, then composed."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_utils import no_init_weights

from segllm.config import SegLLMConfig
from segllm.decoders.base import MaskDecoder
from segllm.decoders.registry import decoder_kind
from segllm.errors import ConfigError
from segllm.linear import use_onednn_linears
from segllm.model.dense_head import DenseHeads
from segllm.model.llm import _config_dict, build_llm, max_positions
from segllm.model.lora import add_lora
from segllm.model.memory import MaskMemoryEncoder
from segllm.model.projector import build_projector
from segllm.model.prompt_head import PromptHead
from segllm.model.segllm import SegLLM
from segllm.model.vision import VisionTower, build_vision_model
from segllm.precision import guard_convolutions
from segllm.processor import Processor
from segllm.tokenizer import add_segllm_tokens


def build_decoder(config: SegLLMConfig, *, load_weights: bool = True) -> MaskDecoder:
    """The mask decoder of the kind ``config.decoder.kind`` (see :mod:`segllm.decoders.registry`),
    checked against the prompt head. ``load_weights``: read the decoder's pretrained weights, if
    its config names any (a checkpoint loader passes False: the checkpoint holds every weight)."""
    return decoder_kind(config.decoder.kind).build_decoder(config.decoder, config.prompt_head, load_weights=load_weights)


def build_segllm(
    config: SegLLMConfig, tokenizer: PreTrainedTokenizerBase, *, load_weights: bool = True, init_weights: bool = True
) -> SegLLM:
    """Build a SegLLM.

    Args:
        config: the model's configuration. Its ``llm.hf_config`` is updated in place to the
            built LLM's exact config (vocabulary size after adding tokens, special ids).
        tokenizer: the LLM's tokenizer; the template's tokens are added if missing.
        load_weights: read pretrained parts from their ``pretrained_path`` folders. A
            checkpoint loader passes False: the checkpoint holds every weight.
        init_weights: False (only with ``load_weights=False``): the ``torch.nn.init`` draws and
            transformers' weight initialisation are skipped, so most parameters hold whatever
            their fresh memory held; for a loader that then overwrites every parameter. Random
            initialisation was over a third of the bundled model's loading time.
    """
    if not init_weights:
        if load_weights:
            raise ValueError("init_weights=False leaves parameters unset: only for load_weights=False (a checkpoint loader)")
        # transformers' own switch for its from_pretrained: torch.nn.init's functions and its
        # _init_weights do nothing inside it (parameters on the meta device instead would skip the
        # memory too, but meta kernels made the small models' building 3x slower)
        with no_init_weights():
            model = build_segllm(config, tokenizer, load_weights=False)
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.tie_weights()  # transformers ties only when it initialises (its loader ties after)
        return model
    add_segllm_tokens(tokenizer, config.template)
    vision = VisionTower(build_vision_model(config.vision, load_weights=load_weights), config.vision)
    if load_weights and config.vision.pretrained_path:
        # record the architecture, so a checkpoint rebuilds the tower without the folder
        config.vision.hf_config = {"model_type": vision.model.config.model_type, **_config_dict(vision.model.config)}
    llm = build_llm(config.llm, tokenizer, load_weights=load_weights)
    if config.llm.lora.r:
        add_lora(llm, config.llm.lora)
    d_llm = llm.get_input_embeddings().weight.shape[1]
    projector = build_projector(config.projector, vision.hidden_size, d_llm)
    memory = MaskMemoryEncoder(config.memory, d_llm)  # built before the decoder: seeded inits stay as they were
    prompt_head = PromptHead(config.prompt_head, d_llm)
    decoder = build_decoder(config, load_weights=load_weights)
    memory.frame_size = decoder.image_size
    attributes = getattr(config.decoder, "attributes", None)
    if attributes and dict(attributes) != dict(config.dense.groups):
        # the decoder's classifiers are supervised by the dense labels: the same groups
        raise ConfigError(f"decoder.attributes {dict(attributes)} must equal dense.groups {dict(config.dense.groups)}")
    dense_head = None
    if config.dense.groups:
        dense_head = DenseHeads(config.dense, {"vision": vision.hidden_size, "decoder": decoder.prompt_dim, "target": decoder.prompt_dim})
    processor = Processor(
        tokenizer,
        config.template,
        config.memory,
        num_image_tokens=vision.num_tokens,
        max_length=config.template.max_length or max_positions(llm),
    )
    model = SegLLM(
        config=config,
        vision=vision,
        projector=projector,
        llm=llm,
        memory=memory,
        prompt_head=prompt_head,
        decoder=decoder,
        processor=processor,
        dense_head=dense_head,
    )
    model.set_trainable()
    # float32 CPU products, inference and training, through oneDNN (segllm.linear: about 2x MKL's on AMD CPUs)
    use_onednn_linears(model)
    # bfloat16 convolutions on a CPU without native bfloat16 computed in float32 (segllm.precision)
    guard_convolutions(model)
    return model
