"""Starting a SegLLM from LLaVA-1.5 folders in both public layouts (miniature ones built here)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModel

from segllm import SegLLM
from segllm.decoders.hipie import HipieDecoderConfig
from segllm.errors import CheckpointError
from segllm.model.llava import llava_layout, segllm_from_llava15
from segllm.session import Session
from tests.helpers import LLAVA_LLAMA, llava_original, write_llava_folder


def _hf(llava_parts):
    root, tok, llm, proj = llava_parts
    config = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": len(tok), **LLAVA_LLAMA},
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32}}
    state = {"language_model." + k: v for k, v in llm.items()}  # the older llava-hf key layout
    state |= {"multi_modal_projector.linear_1.weight": proj["0.weight"], "multi_modal_projector.linear_1.bias": proj["0.bias"],
              "multi_modal_projector.linear_2.weight": proj["2.weight"], "multi_modal_projector.linear_2.bias": proj["2.bias"],
              "vision_tower.vision_model.post_layernorm.weight": torch.ones(32)}
    return write_llava_folder(root / "hf", tok, config, state)


@pytest.mark.parametrize("make", [llava_original, _hf])
def test_both_layouts_give_llavas_llm_and_projector(llava_parts, make):
    root, tok, llm, proj = llava_parts
    folder = make(llava_parts)
    assert llava_layout(folder) == {"llava_original": "original", "_hf": "hf"}[make.__name__]
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


def test_saved_and_reloaded(llava_parts, tmp_path):
    root = llava_parts[0]
    model = segllm_from_llava15(_original_copy(llava_parts, tmp_path), vision_tower=root / "clip", hipie=HipieDecoderConfig.reduced())
    model.save_pretrained(tmp_path / "start")
    again = SegLLM.from_pretrained(tmp_path / "start")
    again_state = again.state_dict()  # once: state_dict() walks every module
    for k, v in model.state_dict().items():
        assert torch.equal(again_state[k], v), k


def _original_copy(llava_parts, tmp_path):
    import shutil

    src = llava_parts[0] / "original"
    if not src.exists():
        llava_original(llava_parts)
    shutil.copytree(src, tmp_path / "llava")
    return tmp_path / "llava"


def test_bad_folders_are_named(llava_parts, tmp_path):
    root = llava_parts[0]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not 'llava'"):
        segllm_from_llava15(tmp_path, vision_tower=root / "clip")
    folder = _original_copy(llava_parts, tmp_path / "x")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    save_file({**state, "model.extra.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        segllm_from_llava15(folder, vision_tower=root / "clip", hipie=HipieDecoderConfig.reduced())
    with pytest.raises(CheckpointError, match="config.json"):
        segllm_from_llava15(folder, vision_tower=tmp_path / "nothing", hipie=HipieDecoderConfig.reduced())
