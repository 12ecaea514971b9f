"""Any transformers model of the supported families plugs into the same places."""

import copy

import numpy as np
import pytest
import torch

from segllm.config import VisionConfig
from segllm.conversation import Conversation, Round
from segllm.errors import ConfigError
from segllm.model.builder import build_segllm
from segllm.presets import tiny_config
from segllm.train.objective import training_loss

VISION = {
    "clip": VisionConfig(hf_config={"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}, image_size=32),
    "siglip": VisionConfig(hf_config={"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                      "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
                           image_size=32, drop_cls=False, pool="mean", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "dinov2": VisionConfig(hf_config={"model_type": "dinov2", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2},
                           image_size=32, resize="pad"),
}
LLMS = {
    "llama": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "qwen2": {"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
}


@pytest.mark.parametrize("vision", sorted(VISION))
@pytest.mark.parametrize("llm", sorted(LLMS))
def test_families_plug_in(tokenizer, three_rounds, vision, llm):
    cfg = tiny_config(len(tokenizer))
    cfg.vision = copy.deepcopy(VISION[vision])
    cfg.llm.hf_config = dict(LLMS[llm], vocab_size=100)  # resized to the tokenizer
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer))
    assert model.llm.config.model_type == llm
    assert model.llm.get_input_embeddings().weight.shape[0] == len(model.tokenizer)
    assert cfg.llm.hf_config["vocab_size"] == len(model.tokenizer)  # recorded for checkpoints
    assert model.vision.num_tokens == 16
    model.train()
    out = training_loss(model, model.prepare([three_rounds]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval()
    conv = Conversation(three_rounds.image, three_rounds.rounds[:1] + [Round("near instance 1", (1,))])
    pred = model.predict(conv, answer="<seg>")
    assert pred.masks.shape == (1, 48, 80)


def test_llm_from_a_local_folder(tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(LLMS["llama"], vocab_size=len(tokenizer))
    torch.manual_seed(5)
    src = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    src.save_pretrained(tmp_path / "llm")
    cfg = tiny_config(len(tokenizer))
    cfg.llm.pretrained_path = str(tmp_path / "llm")
    model = build_segllm(cfg, copy.deepcopy(tokenizer))
    w = src.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(model.llm.model.layers[0].self_attn.q_proj.weight, w)
    # the added tokens start at the mean of the old rows (mean resizing) for a pretrained LLM
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] == len(model.tokenizer)


def test_missing_model_type(tokenizer):
    cfg = tiny_config(len(tokenizer))
    cfg.llm.hf_config = {"hidden_size": 8}
    with pytest.raises(ConfigError, match="model_type"):
        build_segllm(cfg, copy.deepcopy(tokenizer))


def test_prompt_width_must_match_decoder(tokenizer):
    cfg = tiny_config(len(tokenizer))
    cfg.prompt_head.dim = 48
    with pytest.raises(ConfigError, match="prompt_head.dim"):
        build_segllm(cfg, copy.deepcopy(tokenizer))


def test_builds_are_deterministic(make_model, three_rounds):
    a, b = make_model(seed=7), make_model(seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert not np.array_equal(a.prompt_head.mlp[0].weight.detach(), make_model(seed=8).prompt_head.mlp[0].weight.detach())


def test_hipie_decoder_plugs_into_the_same_place(tokenizer, three_rounds, tmp_path):
    """The released model's decoder behind the same interface: build, predict, train, save and reload."""
    from segllm.config import PromptHeadConfig, SegLLMConfig
    from segllm.decoders.hipie import HipieDecoder
    from segllm.decoders.hipie.config import HipieDecoderConfig
    from segllm.model.segllm import SegLLM

    cfg = tiny_config(len(tokenizer))
    cfg.decoder = HipieDecoderConfig.reduced()
    cfg.decoder.image_size = 128  # a small frame keeps the test fast
    cfg.prompt_head = PromptHeadConfig(num_tokens=8, num_ref_tokens=4, dim=768)
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer))
    assert isinstance(model.decoder, HipieDecoder)
    assert SegLLMConfig.from_dict(cfg.to_dict()).decoder == cfg.decoder
    model.train()
    out = training_loss(model, model.prepare([three_rounds]))
    out.loss.backward()
    assert out.mask_logits.shape[:2] == (3, 2) and torch.isfinite(out.loss)
    model.eval()
    conv = Conversation(three_rounds.image, three_rounds.rounds[:1] + [Round("near instance 1", (1,))])
    pred = model.predict(conv, answer="<seg>")
    assert pred.masks.shape == (1, 48, 80)
    model.save_pretrained(tmp_path / "ck")
    again = SegLLM.from_pretrained(tmp_path / "ck").predict(conv, answer="<seg>")
    np.testing.assert_array_equal(pred.masks, again.masks)
    cfg.prompt_head = PromptHeadConfig(num_tokens=8, num_ref_tokens=4, dim=256)
    with pytest.raises(ConfigError, match="lang_dim"):
        build_segllm(cfg, copy.deepcopy(tokenizer))
