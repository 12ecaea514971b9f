import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from segllm.checkpoint import WEIGHTS_NAME
from segllm.conversation import Conversation, Round
from segllm.errors import CheckpointError
from segllm.model.loading import load_pretrained
from segllm.model.segllm import SegLLM
from segllm.train.objective import training_loss


def _outputs(model, conv):
    model.eval()
    batch = model.prepare([conv])
    with torch.no_grad():
        out = training_loss(model, batch)
    return out


def test_save_load_gives_identical_outputs(make_model, three_rounds, tmp_path):
    model = make_model(seed=1)
    a = _outputs(model, three_rounds)
    model.save_pretrained(tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "config.json" in files and WEIGHTS_NAME in files and "tokenizer.json" in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded = SegLLM.from_pretrained(tmp_path / "ck")
    assert loaded.config == model.config
    b = _outputs(loaded, three_rounds)
    for name in ("loss", "lm_loss", "mask_logits", "iou_scores"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    conv = Conversation(three_rounds.image, three_rounds.rounds[:1] + [Round("near instance 1", (1,))])
    p1, p2 = model.predict(conv, max_new_tokens=5), loaded.predict(conv, max_new_tokens=5)
    assert p1.token_ids == p2.token_ids
    np.testing.assert_array_equal(p1.masks, p2.masks)


def test_overwrite_is_atomic(make_model, tmp_path):
    m1, m2 = make_model(seed=1), make_model(seed=2)
    m1.save_pretrained(tmp_path / "ck")
    m2.save_pretrained(tmp_path / "ck")
    loaded = SegLLM.from_pretrained(tmp_path / "ck")
    torch.testing.assert_close(loaded.prompt_head.mlp[0].weight, m2.prompt_head.mlp[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_load_to_dtype(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "ck")
    m = load_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16


@pytest.fixture
def saved(make_model, tmp_path):
    make_model().save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_key_named(saved):
    state = load_file(str(saved / WEIGHTS_NAME))
    del state["prompt_head.mlp.0.weight"]
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"missing weight\(s\) prompt_head\.mlp\.0\.weight"):
        SegLLM.from_pretrained(saved)


def test_unexpected_key_named(saved):
    state = load_file(str(saved / WEIGHTS_NAME))
    state["decoder.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"unexpected weight\(s\) decoder\.extra_head\.weight"):
        SegLLM.from_pretrained(saved)


def test_wrong_shape_named(saved):
    state = load_file(str(saved / WEIGHTS_NAME))
    state["memory.box_head.weight"] = torch.zeros(3, 4)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"memory\.box_head\.weight has shape \(3, 4\)"):
        SegLLM.from_pretrained(saved)


def test_not_a_checkpoint(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not found"):
        SegLLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        SegLLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model type 'llava'"):
        SegLLM.from_pretrained(tmp_path / "llava")
    (saved / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        SegLLM.from_pretrained(saved)


def test_bad_config_in_checkpoint(saved):
    data = json.loads((saved / "config.json").read_text())
    data["decoder"]["dpeth"] = 2
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"decoder\.dpeth"):
        SegLLM.from_pretrained(saved)


def test_missing_tokenizer(saved):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (saved / name).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        SegLLM.from_pretrained(saved)


def test_tied_embeddings_round_trip(tokenizer, tmp_path, three_rounds):
    import copy

    from segllm.model.builder import build_segllm
    from segllm.presets import tiny_config

    cfg = tiny_config(len(tokenizer))
    cfg.llm.hf_config["tie_word_embeddings"] = True
    model = build_segllm(cfg, copy.deepcopy(tokenizer))
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "ck")
    loaded = SegLLM.from_pretrained(tmp_path / "ck")
    assert loaded.llm.get_output_embeddings().weight.data_ptr() == loaded.llm.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(_outputs(model, three_rounds).loss, _outputs(loaded, three_rounds).loss)


def test_half_precision_storage(make_model, three_rounds, tmp_path):
    model = make_model(seed=2)
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size32 = (tmp_path / "fp32" / WEIGHTS_NAME).stat().st_size
    size16 = (tmp_path / "fp16" / WEIGHTS_NAME).stat().st_size
    assert size16 < 0.6 * size32
    loaded = SegLLM.from_pretrained(tmp_path / "fp16")
    assert loaded.dtype == torch.float32
    w = model.prompt_head.mlp[0].weight
    torch.testing.assert_close(loaded.prompt_head.mlp[0].weight, w.half().float())
    a, b = _outputs(model, three_rounds), _outputs(loaded, three_rounds)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-2, atol=1e-2)
