"""Starting a SegLLM from LLaVA-1.5 folders in both public layouts (miniature ones built here)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from segllm import SegLLM
from segllm.decoders.hipie import HipieDecoderConfig
from segllm.errors import CheckpointError
from segllm.model.llava import llava_layout, segllm_from_llava15
from segllm.session import Session

LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tokenizer):
    """A tiny LLaMA (with the test tokenizer), its projector weights and a tiny CLIP vision folder."""
    import copy

    root = tmp_path_factory.mktemp("llava")
    tok = copy.deepcopy(tokenizer)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **LLAMA))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            image_size=224, patch_size=32))
    clip.save_pretrained(root / "clip")
    projector = {"0.weight": torch.randn(64, 32), "0.bias": torch.randn(64), "2.weight": torch.randn(64, 64), "2.bias": torch.randn(64)}
    return root, tok, llm.state_dict(), projector


def _write(folder, tok, config, state):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    tok.save_pretrained(str(folder))
    return folder


def _original(parts):
    root, tok, llm, proj = parts
    config = {"model_type": "llava", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "vocab_size": len(tok), **LLAMA}
    state = {**llm, **{f"model.mm_projector.{k}": v for k, v in proj.items()}}
    return _write(root / "original", tok, config, state)


def _hf(parts):
    root, tok, llm, proj = parts
    config = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": len(tok), **LLAMA},
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32}}
    state = {"language_model." + k: v for k, v in llm.items()}  # the older llava-hf key layout
    state |= {"multi_modal_projector.linear_1.weight": proj["0.weight"], "multi_modal_projector.linear_1.bias": proj["0.bias"],
              "multi_modal_projector.linear_2.weight": proj["2.weight"], "multi_modal_projector.linear_2.bias": proj["2.bias"],
              "vision_tower.vision_model.post_layernorm.weight": torch.ones(32)}
    return _write(root / "hf", tok, config, state)


@pytest.mark.parametrize("make", [_original, _hf])
def test_both_layouts_give_llavas_llm_and_projector(parts, make):
    root, tok, llm, proj = parts
    folder = make(parts)
    assert llava_layout(folder) == make.__name__.strip("_")
    model = segllm_from_llava15(folder, vision_tower=root / "clip", hipie=HipieDecoderConfig.reduced())
    own = model.state_dict()
    assert torch.equal(own["llm.model.layers.1.mlp.down_proj.weight"], llm["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(own["projector.2.weight"], proj["2.weight"])
    # SegLLM's added tokens: new rows at the mean of the existing ones
    n = llm["model.embed_tokens.weight"].shape[0]
    emb = own["llm.model.embed_tokens.weight"]
    assert emb.shape[0] > n and torch.allclose(emb[n:], llm["model.embed_tokens.weight"].mean(0).expand(emb.shape[0] - n, -1))
    assert model.processor.image_id == model.processor.mask_id  # <video> for every injected feature
    # the CLIP folder's weights are the vision tower's
    clip = CLIPVisionModel.from_pretrained(root / "clip")
    assert torch.equal(own["vision.model.vision_model.post_layernorm.weight"], clip.state_dict()["vision_model.post_layernorm.weight"])
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    reply = Session(model, image).ask("Segment the red circle.")
    assert reply.text == "<seg>" and reply.masks.shape == (1, 40, 60)


def test_saved_and_reloaded(parts, tmp_path):
    root = parts[0]
    model = segllm_from_llava15(_original_copy(parts, tmp_path), vision_tower=root / "clip", hipie=HipieDecoderConfig.reduced())
    model.save_pretrained(tmp_path / "start")
    again = SegLLM.from_pretrained(tmp_path / "start")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def _original_copy(parts, tmp_path):
    import shutil

    src = parts[0] / "original"
    if not src.exists():
        _original(parts)
    shutil.copytree(src, tmp_path / "llava")
    return tmp_path / "llava"


def test_bad_folders_are_named(parts, tmp_path):
    root = parts[0]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not 'llava'"):
        segllm_from_llava15(tmp_path, vision_tower=root / "clip")
    folder = _original_copy(parts, tmp_path / "x")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    save_file({**state, "model.extra.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        segllm_from_llava15(folder, vision_tower=root / "clip", hipie=HipieDecoderConfig.reduced())
    with pytest.raises(CheckpointError, match="config.json"):
        segllm_from_llava15(folder, vision_tower=tmp_path / "nothing", hipie=HipieDecoderConfig.reduced())
