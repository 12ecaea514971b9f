import copy
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from segllm.config import SegLLMConfig
from segllm.decoders.registry import decoder_kind, decoder_kinds, register_decoder
from segllm.errors import ConfigError
from segllm.model.builder import build_decoder, build_segllm
from segllm.model.segllm import SegLLM
from segllm.presets import tiny_config
from segllm.train.objective import training_loss
from tests.decoders.toy import ToyDecoder, ToyDecoderConfig, build_toy


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_decoder("toy", ToyDecoderConfig, build_toy)


def toy_model(tokenizer, **decoder) -> SegLLM:
    cfg = tiny_config(len(tokenizer))
    cfg.decoder = ToyDecoderConfig(**decoder)
    torch.manual_seed(0)
    return build_segllm(cfg, copy.deepcopy(tokenizer))


def test_the_built_in_kinds_need_no_import():
    assert {"sam", "litemedsam", "hipie"} <= set(decoder_kinds())
    assert decoder_kind("hipie").config_cls.__name__ == "HipieDecoderConfig"


def test_a_registered_kind_is_read_from_config_json_strictly():
    cfg = SegLLMConfig.from_dict({"decoder": {"kind": "toy", "dim": 48}})
    assert cfg.decoder == ToyDecoderConfig(dim=48)
    assert SegLLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"decoder\.colour"):
        SegLLMConfig.from_dict({"decoder": {"kind": "toy", "colour": 1}})
    with pytest.raises(ConfigError, match=r"decoder\.dim"):
        SegLLMConfig.from_dict({"decoder": {"kind": "toy", "dim": "wide"}})
    with pytest.raises(ConfigError, match=r"decoder\.kind: 'nope' is not one of .*'toy'"):
        SegLLMConfig.from_dict({"decoder": {"kind": "nope"}})


def test_registering_checks_the_config_class():
    @dataclass
    class Untagged:
        dim: int = 1

    with pytest.raises(ConfigError, match="must default to 'other'"):
        register_decoder("other", ToyDecoderConfig, build_toy)
    with pytest.raises(ConfigError, match="must default to 'untagged'"):
        register_decoder("untagged", Untagged, build_toy)
    with pytest.raises(ConfigError, match="must be a dataclass"):
        register_decoder("toy", dict, build_toy)

    @dataclass
    class Impostor:
        kind: Literal["toy"] = "toy"

    with pytest.raises(ConfigError, match="already registered"):
        register_decoder("toy", Impostor, build_toy)
    assert decoder_kind("toy").config_cls is ToyDecoderConfig


def test_build_decoder_uses_the_kinds_build_function():
    cfg = tiny_config()
    cfg.decoder = ToyDecoderConfig()
    decoder = build_decoder(cfg)
    assert isinstance(decoder, ToyDecoder) and not decoder.supports_set_prediction
    assert (decoder.num_prompt_tokens, decoder.num_ref_tokens) == (cfg.prompt_head.num_tokens, cfg.prompt_head.num_ref_tokens)
    cfg.decoder = ToyDecoderConfig(dim=16)
    with pytest.raises(ConfigError, match=r"prompt_head.dim \(32\) must equal decoder.dim \(16\)"):
        build_decoder(cfg)


def test_a_segllm_with_the_toy_decoder_trains_and_round_trips(tokenizer, three_rounds, tmp_path):
    model = toy_model(tokenizer).train()
    assert isinstance(model.decoder, ToyDecoder)
    batch = model.prepare([three_rounds])
    assert batch.seg_targets.shape[-1] == model.decoder.output_size == 8
    out = training_loss(model, batch)
    assert torch.isfinite(out.loss) and out.mask_loss > 0 and out.ref_loss > 0
    out.loss.backward()
    for name, p in model.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.prompt_head.mlp[0].weight.grad.abs().sum() > 0  # and through the prompts to the LLM side

    model.eval()
    model.save_pretrained(tmp_path / "toy")
    again = SegLLM.from_pretrained(tmp_path / "toy")
    assert again.config == model.config and isinstance(again.decoder, ToyDecoder)
    state, back = model.state_dict(), again.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    with torch.no_grad():
        a, b = training_loss(model, model.prepare([three_rounds])), training_loss(again, again.prepare([three_rounds]))
    assert torch.equal(a.mask_logits, b.mask_logits)


def test_set_prediction_needs_a_decoder_that_supports_it(tokenizer, three_rounds):
    model = toy_model(tokenizer)
    model.config.loss = dataclasses.replace(model.config.loss, set_prediction=True)
    with pytest.raises(ConfigError, match="set prediction.*ToyDecoder"):
        training_loss(model, model.prepare([three_rounds]))
