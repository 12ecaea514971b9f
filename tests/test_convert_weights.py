"""Converting a PyTorch pickle of weights to safetensors, with the restricted unpickler."""

import collections
import pickle

import pytest
import torch
from safetensors.torch import load_file

from segllm.cli import main
from segllm.convert_weights import pickle_to_safetensors
from segllm.errors import CheckpointError


def test_wrapped_weights_are_unwrapped_and_flattened(tmp_path):
    weights = {"backbone": {"conv.weight": torch.randn(4, 3, 3, 3)}, "head.bias": torch.arange(4.0)}
    torch.save({"model": weights, "iteration": 90000}, tmp_path / "r50_parts.pth")
    shapes = pickle_to_safetensors(tmp_path / "r50_parts.pth", tmp_path / "out.safetensors")
    assert shapes == {"backbone.conv.weight": (4, 3, 3, 3), "head.bias": (4,)}
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["backbone.conv.weight"], weights["backbone"]["conv.weight"])
    assert torch.equal(got["head.bias"], weights["head.bias"])


def test_cli_and_named_entry(tmp_path, capsys):
    torch.save({"ema": {"w": torch.ones(2, 2)}, "model": {"w": torch.zeros(2, 2)}}, tmp_path / "c.pth")
    assert main(["convert-weights", str(tmp_path / "c.pth"), str(tmp_path / "c.safetensors"), "--key", "ema"]) == 0
    assert "wrote 1 tensors (4 values)" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], torch.ones(2, 2))


class Payload:
    def __reduce__(self):  # would run a command if unpickled without restriction
        return (print, ("pwned",))


def test_pickles_with_objects_are_refused_unread(tmp_path, capfd):
    torch.save({"model": {"w": torch.ones(1)}, "hook": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        pickle_to_safetensors(tmp_path / "evil.pth", tmp_path / "x.safetensors")
    assert "pwned" not in capfd.readouterr().out
    assert not (tmp_path / "x.safetensors").exists()


def test_the_refused_global_is_named_whatever_torch_version(tmp_path, monkeypatch):
    torch.save({"model": {"w": torch.ones(1)}, "hook": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refused: .*torch: .*print"):  # this torch's own wording
        pickle_to_safetensors(tmp_path / "evil.pth", tmp_path / "x.safetensors")
    # other torch versions word the refusal differently; torch's line is reported as it stands
    wordings = {
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed.\n"
        "Please file an issue with the following so that we can make `weights_only=True` compatible with your use "
        "case: WeightsUnpickler error: Unsupported class os.system\n\nCheck the documentation": "Unsupported class os.system",
        "Weights only load failed. Trying to call reduce for unrecognized function <built-in function system>":
            "unrecognized function <built-in function system>",
    }
    for message, named in wordings.items():
        def refuse(*args, message=message, **kwargs):
            raise pickle.UnpicklingError(message)

        monkeypatch.setattr(torch, "load", refuse)
        with pytest.raises(CheckpointError, match="refused") as info:
            pickle_to_safetensors(tmp_path / "evil.pth", tmp_path / "x.safetensors")
        assert named in str(info.value)


def test_other_bad_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        pickle_to_safetensors(tmp_path / "missing.pth", tmp_path / "x.safetensors")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch weights file"):
        pickle_to_safetensors(tmp_path / "text.pth", tmp_path / "x.safetensors")
    torch.save(collections.OrderedDict(step=3), tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        pickle_to_safetensors(tmp_path / "empty.pth", tmp_path / "x.safetensors")
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        pickle_to_safetensors(tmp_path / "m.pth", tmp_path / "x.safetensors", key="ema")
