"""--checkpoint / --revision / --device / --dtype on every command that loads a model, and what
reaches the loader."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import segllm.cli
import segllm.commands
from segllm.cli import build_parser, main
from segllm.commands import DTYPES
from segllm.default import DEFAULT_EDGE_PASSES, load_model
from segllm.errors import ConfigError

# each command that loads a model, with the arguments it needs besides the model options
COMMANDS = {
    "chat": ["chat"],
    "eval": ["eval"],
    "demo": ["demo"],
    "bench": ["bench"],
    "merge-lora": ["merge-lora", "ckpt", "out"],
    "segment": ["segment", "--questions", "q.txt", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_model_command_takes_device_and_dtype(command, dtype):
    args = build_parser().parse_args([*COMMANDS[command], "--device", "cuda:1", "--dtype", dtype])
    assert args.device == "cuda:1" and DTYPES[args.dtype] == getattr(torch, dtype)
    defaults = build_parser().parse_args(COMMANDS[command])
    assert defaults.dtype == "float32"
    if command != "bench":  # bench runs the bundled model and a random one: no checkpoint to name
        args = build_parser().parse_args([*COMMANDS[command], "--revision", "v1"])
        assert args.revision == "v1" and defaults.revision is None


def test_an_unknown_dtype_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_eval_loads_in_bfloat16(tmp_path, monkeypatch, capsys):
    seen = []
    real = segllm.commands.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append((kwargs, model.llm.dtype, model.dtype))
        return model

    monkeypatch.setattr(segllm.commands, "load_model", spy)
    rc = main(["eval", "--size", "1", "--split", "val", "--protocol", "oracle", "--out", str(tmp_path), "--name", "t",
               "--device", "cpu", "--dtype", "bfloat16"])
    assert rc == 0, capsys.readouterr().err
    (kwargs, llm_dtype, dtype), = seen
    assert kwargs == {"revision": None, "device": "cpu", "dtype": torch.bfloat16, "quantize": None, "mask_region": None, "compile": False,
                      "edge_filter": None}
    assert llm_dtype == dtype == torch.bfloat16
    assert "oracle cIoU" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["chat", "eval", "demo", "segment"])
@pytest.mark.parametrize(("flag", "good", "bad"), [("--mask-region", "all", "largest"), ("--edge-filter", "off", "maybe")])
def test_inference_settings_override_the_checkpoints(command, flag, good, bad, capsys):
    dest = flag.removeprefix("--").replace("-", "_")
    assert getattr(build_parser().parse_args(COMMANDS[command]), dest) is None  # the checkpoint's
    assert getattr(build_parser().parse_args([*COMMANDS[command], flag, good]), dest) == good
    with pytest.raises(SystemExit):
        build_parser().parse_args([*COMMANDS[command], flag, bad])
    assert f"invalid choice: '{bad}'" in capsys.readouterr().err


def test_load_model_sets_the_edge_filter(monkeypatch):
    bundled = load_model().config.edge_filter
    assert bundled.on  # the bundled model's setting
    assert not load_model(edge_filter=False).config.edge_filter.on
    assert load_model(edge_filter=True).config.edge_filter == bundled
    # a checkpoint without one: on with the defaults and DEFAULT_EDGE_PASSES passes
    import segllm.default

    real = segllm.default.load_pretrained

    def without(*args, **kwargs):
        model = real(*args, **kwargs)
        model.config.edge_filter = type(bundled)()
        return model

    monkeypatch.setattr(segllm.default, "load_pretrained", without)
    assert not load_model().config.edge_filter.on
    assert load_model(edge_filter=True).config.edge_filter == dataclasses.replace(type(bundled)(), iterations=DEFAULT_EDGE_PASSES)


def test_load_model_sets_the_mask_region():
    assert load_model(mask_region="all").config.mask_region == "all"
    assert load_model(mask_region="most_confident").config.mask_region == "most_confident"
    with pytest.raises(ConfigError, match="mask_region must be one of"):
        load_model(mask_region="largest")


def test_merge_lora_passes_the_model_options(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        raise segllm.commands.SegLLMError("stop here")

    monkeypatch.setattr(segllm.commands.SegLLM, "from_pretrained", fake)
    assert main(["merge-lora", "org/name/sub", str(tmp_path / "o"), "--revision", "v2", "--dtype", "float16"]) == 2
    assert calls == [("org/name/sub", {"revision": "v2", "device": "cpu", "dtype": torch.float16})]
    assert "stop here" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_model_command_takes_threads_and_main_applies_them(command, monkeypatch):
    args = build_parser().parse_args([*COMMANDS[command], "--threads", "1"])
    assert args.threads == 1 and build_parser().parse_args(COMMANDS[command]).threads == 0
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setitem(segllm.commands.COMMANDS, "stand-in", lambda a: 0)
    monkeypatch.setattr(segllm.cli, "build_parser", lambda: _Parsed(args, "stand-in"))
    assert main([]) == 0 and seen == [1]
    args.threads = -1
    assert main([]) == 2 and seen == [1]  # refused before the command runs


class _Parsed:
    """A parser stand-in that returns fixed arguments naming the given command (a key of
    :data:`segllm.commands.COMMANDS`)."""

    def __init__(self, args, func):
        args.func = func
        self.args = args

    def parse_args(self, argv):
        return self.args


@pytest.mark.parametrize("command", ["chat", "demo", "eval", "segment"])
def test_commands_that_run_a_model_take_compile(command):
    assert build_parser().parse_args([*COMMANDS[command], "--compile"]).compile
    assert not build_parser().parse_args(COMMANDS[command]).compile


def test_compile_reaches_a_decoder_that_has_a_compiled_mode_and_warns_for_one_without(caplog, monkeypatch):
    model = load_model(compile=True)  # the bundled model's direct decoder has none: it runs as it is
    assert "has no compiled mode" in caplog.text and not hasattr(model.decoder, "set_compiled")
    seen = []
    monkeypatch.setattr(type(model.decoder), "set_compiled", lambda self, on: seen.append(on), raising=False)
    assert model.set_compiled(True) and model.set_compiled(False) and seen == [True, False]
