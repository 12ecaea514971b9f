"""The released-checkpoint loader against the original implementation's goldens.

Reads the miniature released checkpoint (tiny LLaMA and CLIP, reduced HIPIE, the released
layout and key names) from ``../shared/fixtures/released/segllm_tiny`` (or ``$SEGLLM_FIXTURES``)
and checks, through the public loader and :class:`segllm.Session`, that a 3-round conversation
reproduces the original's token ids, LLM states, prompt tokens, boxes, scores and masks.
Tolerance: fp32 on CPU, 1e-4 absolute on features; masks IoU >= 0.99 (they come out equal).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segllm import SegLLM
from segllm.conversation import Conversation, Round
from segllm.errors import CheckpointError, MaskError
from segllm.model.released import IGNORED, is_released_checkpoint, load_released
from segllm.session import Session
from tests.helpers import HAS_CXX, RELEASED_FIXTURES
from tests.tolerance import assert_close_scaled

FIXTURES = RELEASED_FIXTURES
TINY = FIXTURES / "segllm_tiny"
CKPT = TINY / "checkpoint"

pytestmark = pytest.mark.skipif(
    not (CKPT / "model.safetensors").exists() or not (FIXTURES / "hipie/inputs.safetensors").exists(),
    reason=f"released tiny SegLLM fixture not found under {TINY} (set SEGLLM_FIXTURES)",
)

QUESTIONS = [
    "Segment the person on the left.",
    "Segment the chair next to instance 1.[REF:1]",
    "Segment the table near instance 2.[REF:2]",
]


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(TINY / "golden.safetensors")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(FIXTURES / "hipie/inputs.safetensors")["image_rgb_uint8"].numpy()


@pytest.fixture(scope="module")
def model():
    return SegLLM.from_pretrained(CKPT)  # the public entry point dispatches to the released loader


@pytest.fixture(scope="module")
def replies(model, photo):
    session = Session(model, photo)
    return [session.ask(q) for q in QUESTIONS]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_detects_released_folders(tmp_path):
    assert is_released_checkpoint(CKPT)
    assert not is_released_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_released_checkpoint(tmp_path)


def test_config_reproduces_the_released_behaviour(model):
    cfg = model.config
    assert cfg.inject == "add"
    assert (cfg.memory.inference_scale, cfg.memory.box_order, cfg.memory.box_norm) == (0.5, "yxyx", 1024.0)
    assert (cfg.memory.crop_frame, cfg.memory.box_source) == ("decoder", "decoder")
    assert cfg.template.image_token == cfg.template.mask_token == cfg.template.box_token == "<video>"
    assert (cfg.prompt_head.num_tokens, cfg.prompt_head.num_ref_tokens, cfg.prompt_head.dim) == (8, 4, 768)
    assert cfg.vision.resize == "center_crop" and cfg.vision.image_size == 224
    assert model.processor.image_id == 32006 and model.processor.seg_id == 32009


def test_token_ids_match_every_round(model, golden, photo):
    rounds = []
    from segllm.conversation import parse_refs

    for i, q in enumerate(QUESTIONS):
        text, refs = parse_refs(q)
        rounds.append(Round(text, refs, "<seg>", [np.ones(photo.shape[:2], bool)]))
        enc = model.processor.encode(Conversation(photo, list(rounds)))
        assert enc.input_ids == golden[f"round{i + 1}.input_ids"].tolist(), f"round {i + 1}"
    assert enc.image_pos == list(range(34, 34 + 256))
    assert [s.pos for s in enc.segs] == [303, 324, 344]


def test_image_features_and_llm_states_match(model, golden, photo):
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    pixels = model.vision.preprocess(image)
    assert_close_scaled(pixels, golden["final.image_encode.clip_pixel_values"][0], rel=1e-5)
    with torch.no_grad():
        feats = model.image_features(pixels[None])
        # float32 rounding of another machine's run: tolerances at each tensor's scale
        assert_close_scaled(feats[0], golden["final.image_encode.after_projector"][0], rel=1e-4, rtol=1e-4)
        hidden = model.llm.get_decoder()(inputs_embeds=golden["final.inputs_embeds"][None]).last_hidden_state[0]
        assert_close_scaled(hidden, golden["final.last_hidden_state"], rel=1e-4, rtol=1e-4)
        prompts = model.prompt_head(golden["final.seg_hidden_states"])
        assert_close_scaled(prompts, golden["final.prompt_tokens"], rel=1e-4, rtol=1e-4)


def test_memory_inputs_match_the_fed_back_crops_and_boxes(model, golden, photo):
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    for r in (1, 2):
        mask = golden["final.masks"][r - 1].bool()  # in the 1024 frame, as the original keeps it
        box = golden["final.boxes_xyxy_1024"][r - 1] * (max(photo.shape[:2]) / 1024)  # back to image pixels
        crop, norm_box = model.memory.inputs(image, mask, box, vision=model.vision)
        assert_close_scaled(crop, golden[f"round{r}.mask_encode_fed_back"], rel=1e-5)
        assert_close_scaled(norm_box, golden[f"round{r}.box_encode_fed_back"], rel=1e-6)


def test_three_rounds_reproduce_masks_boxes_and_scores(replies, golden, photo):
    for i, reply in enumerate(replies):
        assert reply.text == "<seg>"  # the released model never writes text
        assert reply.refs == (() if i == 0 else (i,))
        frame_mask = torch.from_numpy(reply.frame_masks[0])
        assert iou(frame_mask, golden["final.masks"][i].bool()) >= 0.99
        box_1024 = torch.from_numpy(reply.boxes[0]) * (1024 / max(photo.shape[:2]))
        torch.testing.assert_close(box_1024, golden[f"round{i + 1}.box_last"], atol=1e-2, rtol=0)  # 1e-5 of the 1024 frame
        assert reply.masks.shape == (1, *photo.shape[:2])
    meta = json.loads((TINY / "golden_meta.json").read_text())
    for reply, r in zip(replies, meta["rounds"]):
        assert reply.scores[0] == pytest.approx(r["final_score_last"], abs=1e-4)


def test_a_reference_to_an_empty_mask_is_refused(model, photo):
    session = Session(model, photo)
    session.ask(QUESTIONS[0])
    session.history[0].frame_masks[:] = False
    with pytest.raises(MaskError, match="round 1"):
        session.ask("Segment the chair next to instance 1.[REF:1]")


def test_saved_as_a_segllm_checkpoint_and_reloaded(model, replies, photo, tmp_path):
    model.save_pretrained(tmp_path / "converted")
    again = SegLLM.from_pretrained(tmp_path / "converted")
    session = Session(again, photo)
    for reply, q in zip(replies, QUESTIONS):
        assert np.array_equal(session.ask(q).frame_masks, reply.frame_masks)


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(CKPT, folder)
    shutil.copytree(TINY / "vision_tower", tmp_path / "vision_tower")
    return folder


def test_bad_folders_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match="not a released SegLLM checkpoint"):
        load_released(tmp_path)

    folder = _copy(tmp_path)
    state = load_file(folder / "model.safetensors")
    # a sharded folder with a shard missing
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_released(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").unlink()

    # an unknown key
    save_file({**state, "model.extra_head.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.extra_head.weight"):
        load_released(folder)
    # a tensor of the wrong shape
    bad = dict(state)
    bad["model.mask_enc_head.weight"] = torch.zeros(3, 4)
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.mask_enc_head.weight"):
        load_released(folder)
    # the ignore list is honoured: ignored keys may be present or absent
    ignored = {next(iter(IGNORED)) + "embeddings.word_embeddings.weight": torch.zeros(2, 2)}
    save_file({**state, **ignored}, folder / "model.safetensors")
    load_released(folder)
    # a tokenizer without SegLLM's added tokens
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<seg>", "<video>")]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if v["content"] not in ("<seg>", "<video>")}
    cfg.pop("additional_special_tokens", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="<video>|<seg>|tokens"):
        load_released(folder)


def test_vision_tower_named_by_hub_id_needs_no_folder(tmp_path):
    from segllm.model.released import released_config

    folder = _copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14"
    (folder / "config.json").write_text(json.dumps(cfg))
    vision = released_config(folder).vision
    assert vision.hf_config["hidden_size"] == 1024 and vision.hf_config["num_hidden_layers"] == 24
    cfg["mm_vision_tower"] = "someone/unknown-tower"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vision_tower=FOLDER"):
        released_config(folder)
    assert released_config(folder, vision_tower=tmp_path / "vision_tower").vision.hf_config["hidden_size"] == 32


def test_bfloat16_on_cpu_gives_finite_outputs(photo):
    """bf16 (a GPU option, also allowed on CPU) runs end to end: CPU's reduced-precision
    grid_sample gave NaN before HIPIE's sampling was done in float32 there."""
    model = SegLLM.from_pretrained(CKPT, dtype=torch.bfloat16)
    session = Session(model, photo)
    reply = session.ask(QUESTIONS[0])
    assert np.isfinite(reply.scores).all() and np.isfinite(reply.boxes).all()
    assert reply.frame_masks[0].any()
    assert session.ask(QUESTIONS[1]).refs == (1,)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for torch.compile")
def test_compiled_hipie_reproduces_the_released_answers(golden, photo):
    """``compile=True`` through the public loader (``Session.from_pretrained``): the released
    checkpoint's HIPIE compiled (``HipieDecoder.set_compiled``) still gives the original's masks,
    boxes and scores in all three rounds."""
    session = Session.from_pretrained(CKPT, photo, compile=True)
    assert session.model.decoder.compiled
    meta = json.loads((TINY / "golden_meta.json").read_text())
    for i, q in enumerate(QUESTIONS):
        reply = session.ask(q)
        assert iou(torch.from_numpy(reply.frame_masks[0]), golden["final.masks"][i].bool()) >= 0.99
        box_1024 = torch.from_numpy(reply.boxes[0]) * (1024 / max(photo.shape[:2]))
        torch.testing.assert_close(box_1024, golden[f"round{i + 1}.box_last"], atol=1e-2, rtol=0)
        assert reply.scores[0] == pytest.approx(meta["rounds"][i]["final_score_last"], abs=1e-4)
    layers = session.model.decoder.detr.detr.transformer.encoder.layers
    steps = [session.model.decoder.compiled_image, *(layer.compiled_chunk for layer in layers)]
    assert all(step.compilations == 1 and not step.failed for step in steps)  # each ran compiled, compiled once
