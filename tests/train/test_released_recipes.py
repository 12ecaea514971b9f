"""The three released recipes as config files: the released hyperparameters, and one of them
run end to end from a miniature LLaVA-1.5 folder."""

import json
import math
from pathlib import Path

import pytest
import torch

from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import train
from tests.helpers import llava_original

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "configs" / "released"

# the conversation files of the release's conversation_configs/train/*.yaml
SOURCES = {
    "mr_refcoco": ["mr_refcoco_train", "mr_refcoco+_train", "mr_refcocog_train", "mr_refcoco_hard_train",
                   "mr_refcoco+_hard_train", "mr_refcocog_hard_train"],
    "mr_paco": ["mr_refcoco_train", "mr_refcoco+_train", "mr_refcocog_train", "mr_paco_train", "mr_lvis_train"],
    "all_data_mix": ["reason_seg_train", "ade20k_train", "cocostuff_train", "llava_instruct_train", "attributes_train",
                     "mr_refcoco_train", "mr_refcoco+_train", "mr_refcocog_train", "mr_refcoco_hard_train",
                     "mr_refcoco+_hard_train", "mr_refcocog_hard_train", "mr_paco_data", "mr_pascal_train",
                     "mr_lvis_train", "mr_vg_train"],
}


# a HIPIE of the released design, small enough to train in a test
SMALL_HIPIE = {"width_per_group": 8, "res2_out_channels": 32, "stem_out_channels": 16, "enc_layers": 1, "dec_layers": 1,
               "num_queries": 10, "num_bg_queries": 2, "dim_feedforward": 64, "vl_hidden_dim": 64, "image_size": 128}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_released_hyperparameters(name):
    r = TrainRecipe.load(RELEASED / f"{name}.toml")
    assert (r.optim.lr, r.optim.weight_decay, r.optim.warmup_ratio, r.optim.min_lr_ratio, r.optim.grad_clip) == (2e-6, 0.0, 0.03, 0.0, 5.0)
    assert (r.epochs, r.batch_size, r.grad_accum, r.mixed_precision, r.gradient_checkpointing) == (2, 2, 1, "bf16", True)
    assert (r.data.max_rounds, r.model.max_length, r.model.lora.r) == (6, 2048, 0)
    assert r.model.llava.path and r.model.llava.vision_tower and not r.model.llava.hipie
    assert [Path(s).stem for s in r.data.mix] == SOURCES[name]
    assert r.data.images and r.data.annotations and r.data.val.endswith(".json")


def test_epochs_and_warmup_ratio_become_steps():
    r = TrainRecipe.load(RELEASED / "mr_refcoco.toml")
    got = r.resolved(conversations=1000, processes=4)  # global batch 2 x 4
    assert got.steps == math.ceil(2 * 1000 / 8) == 250
    assert got.optim.warmup_steps == round(0.03 * 250) == 8
    assert r.steps == 5000 and r.optim.warmup_steps == 100  # the recipe itself is unchanged


def test_a_released_recipe_trains_from_a_llava_folder(llava_parts, tmp_path):
    """mr_refcoco.toml as written, with only the paths (miniature LLaVA, world data in place of
    the released files), the decoder size and the precision changed."""
    folder = llava_original(llava_parts)
    root = llava_parts[0]
    r = TrainRecipe.load(RELEASED / "mr_refcoco.toml", {
        "output_dir": str(tmp_path / "run"), "model.llava.path": str(folder), "model.llava.vision_tower": str(root / "clip"),
        "model.llava.hipie_weights": None, "model.llava.hipie": SMALL_HIPIE, "mixed_precision": "no", "workers": 0,
        "data.mix": ["world", "world"], "data.val": "world", "data.train_size": 3, "eval_every": 0, "log_every": 1,
    })
    summary = train(r, progress=False)
    # 2 epochs over 2 sources x 3 conversations, global batch 2: 6 steps; warm-up 3% of them
    assert summary.steps == 6 and all(math.isfinite(x) for x in summary.losses)
    state = json.loads((tmp_path / "run" / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["recipe"]["steps"] == 6 and state["recipe"]["optim"]["warmup_steps"] == 1
    # trained with HIPIE's set-prediction losses, as released; every term logged
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"set_class", "set_l1", "set_giou", "set_mask", "set_dice", "set_prompt_l2"} <= set(log) and log["set_class"] > 0
    from segllm import SegLLM

    model = SegLLM.from_pretrained(tmp_path / "run" / "checkpoint-last" / "model")
    assert model.config.template.max_length == 2048 and model.processor.max_length == 2048
    trained = set(model.config.trainable)
    assert "vision" not in trained and "embeddings" not in trained and {"llm", "decoder", "prompt_head"} <= trained
    # the LLM moved away from LLaVA's weights; the frozen CLIP tower did not
    llava_q = llava_parts[2]["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(model.llm.model.layers[0].self_attn.q_proj.weight, llava_q)


def test_llava_init_errors_name_the_key():
    from segllm.errors import ConfigError

    with pytest.raises(ConfigError, match="vision_tower"):
        TrainRecipe.load(RELEASED / "mr_refcoco.toml", {"model.llava.vision_tower": None})
    with pytest.raises(ConfigError, match="model.llava.hipie.*'layers'"):
        TrainRecipe.load(RELEASED / "mr_refcoco.toml", {"model.llava.hipie": {"layers": 2}})
