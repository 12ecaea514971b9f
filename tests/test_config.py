import json

import pytest

from segllm.config import SegLLMConfig, VisionConfig
from segllm.errors import ConfigError
from segllm.presets import small_config, tiny_config


@pytest.mark.parametrize("cfg", [SegLLMConfig(), tiny_config(300), small_config(900, memory=False)])
def test_round_trip_through_json(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    assert SegLLMConfig.from_dict(data) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"vision\.colour"):
        SegLLMConfig.from_dict({"vision": {"colour": 1}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"decoder\.depth"):
        SegLLMConfig.from_dict({"decoder": {"depth": "two"}})
    with pytest.raises(ConfigError, match=r"vision\.resize"):
        SegLLMConfig.from_dict({"vision": {"resize": "stretch"}})
    with pytest.raises(ConfigError, match=r"vision\.mean"):
        SegLLMConfig.from_dict({"vision": {"mean": [0.5, 0.5]}})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError):
        SegLLMConfig.from_dict({"decoder": {"depth": True}})


def test_unknown_trainable_part():
    with pytest.raises(ConfigError, match="unknown part"):
        SegLLMConfig(trainable=("llm", "everything"))


def test_wrong_format_rejected():
    with pytest.raises(ConfigError, match="format"):
        SegLLMConfig.from_dict({"format": "llava"})


def test_save_load(tmp_path):
    cfg = tiny_config(300)
    cfg.save(tmp_path / "c.json")
    assert SegLLMConfig.load(tmp_path / "c.json") == cfg
    assert isinstance(SegLLMConfig.load(tmp_path / "c.json").vision, VisionConfig)


def test_decoder_kind_selects_the_config_class():
    from segllm.config import SamDecoderConfig
    from segllm.decoders.hipie.config import HipieDecoderConfig

    assert isinstance(SegLLMConfig.from_dict({"decoder": {"depth": 3}}).decoder, SamDecoderConfig)
    hip = SegLLMConfig.from_dict({"decoder": {"kind": "hipie", "enc_layers": 2}}).decoder
    assert isinstance(hip, HipieDecoderConfig) and hip.enc_layers == 2
    with pytest.raises(ConfigError, match=r"decoder\.kind: 'detr'"):
        SegLLMConfig.from_dict({"decoder": {"kind": "detr"}})
    with pytest.raises(ConfigError, match=r"decoder\.num_queries"):
        SegLLMConfig.from_dict({"decoder": {"kind": "hipie", "num_queries": "many"}})
