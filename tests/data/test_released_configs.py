"""The original release's YAML configs read as they ship: a conversation config gives the same mix
as the hand-transcribed TOML recipe, an annotation config and ``--annotation NAME=PATH`` move where
masks are read from (and the moved file is what is read), bad files name the problem."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segllm.cli import main
from segllm.data.check import MIXES
from segllm.data.released.configs import parse_annotation_overrides, read_annotation_config, read_conversation_config
from segllm.data.released.masks import MaskLookup
from segllm.errors import ConfigError
from segllm.eval.benchmarks import Roots, check_benchmark, open_benchmark
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import build_datasets
from tests.released_layout import EXP, build_released_layout

ROOT = Path(__file__).resolve().parents[2]
MIX = "all_data_mix_train/mix.json"
TRAIN_AS_EVAL = {"pascal_eval": "pascal/pascal_labels.json", "reason_seg_eval": "reason_seg/annotations/train"}

# conversation_configs/train/*.yaml of the original release, as they ship
SHIPPED = {
    "mr_refcoco": """datasets:
  - name: mr_refcoco_train.json
  - name: mr_refcoco+_train.json
  - name: mr_refcocog_train.json
  - name: mr_refcoco_hard_train.json
  - name: mr_refcoco+_hard_train.json
  - name: mr_refcocog_hard_train.json
""",
    "mr_paco": """datasets:
  - name: mr_refcoco_train.json
  - name: mr_refcoco+_train.json
  - name: mr_refcocog_train.json
  - name: mr_paco_train.json
  - name: mr_lvis_train.json
""",
    "all_data_mix": """datasets:
  - name: reason_seg_train.json
  - name: ade20k_train.json
  - name: cocostuff_train.json
  - name: llava_instruct_train.json
  - name: attributes_train.json
  - name: mr_refcoco_train.json
  - name: mr_refcoco+_train.json
  - name: mr_refcocog_train.json
  - name: mr_refcoco_hard_train.json
  - name: mr_refcoco+_hard_train.json
  - name: mr_refcocog_hard_train.json
  - name: mr_paco_data.json
  - name: mr_pascal_train.json
  - name: mr_lvis_train.json
  - name: mr_vg_train.json
  """,
}
REASON_SEG_TEST = """datasets:
  - name: reason_seg
    path: reason_seg/annotations/train
    path_eval: reason_seg/annotations/test"""


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_conversation_config_gives_the_toml_recipes_mix(name, tmp_path):
    (tmp_path / "c.yaml").write_text(SHIPPED[name])
    toml = TrainRecipe.load(ROOT / "configs" / "released" / f"{name}.toml")
    assert read_conversation_config(tmp_path / "c.yaml") == [Path(s).name for s in toml.data.mix] == list(MIXES[name].train)
    # the same recipe with the YAML in place of its mix trains on the same files
    folder = str(Path(toml.data.mix[0]).parent)
    from_yaml = TrainRecipe.load(ROOT / "configs" / "released" / f"{name}.toml", {
        "data.mix": [], "data.conversation_config": str(tmp_path / "c.yaml"), "data.conversations": folder})
    assert from_yaml.data.train_sources() == toml.data.train_sources()


def test_an_annotation_config_as_shipped(tmp_path):
    (tmp_path / "a.yaml").write_text(REASON_SEG_TEST)
    overrides = read_annotation_config(tmp_path / "a.yaml")
    ann = tmp_path / "ann"
    assert MaskLookup(ann, overrides=overrides, is_eval=True).path("reason_seg") == ann / "reason_seg/annotations/test"
    assert MaskLookup(ann, overrides=overrides).path("reason_seg") == ann / "reason_seg/annotations/train"
    # without path_eval, evaluation reads path too (the original registers no _eval name for it),
    # not the layout's default evaluation file
    (tmp_path / "b.yaml").write_text("datasets:\n  - name: lvis\n    path: lvis/mine.json\n")
    assert MaskLookup(ann, overrides=read_annotation_config(tmp_path / "b.yaml"), is_eval=True).path("lvis") == ann / "lvis/mine.json"
    assert MaskLookup(ann, is_eval=True).path("lvis") == ann / "lvis/lvis_v1_val.json"


@pytest.mark.parametrize("text, message", [
    ("splits:\n  - name: a.json\n", "unknown key 'splits'"),
    ("datasets:\n  - file: a.json\n", r"datasets\[0\]: unknown key 'file'"),
    ("datasets: a.json\n", "non-empty list"),
    ("datasets:\n  - name: 3\n", "expected a file name"),
    ("!!python/object/apply:os.system ['echo no']\n", "cannot read"),  # safe_load: data, never code
])
def test_bad_conversation_configs_name_the_problem(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_conversation_config(tmp_path / "c.yaml")


def test_bad_annotation_configs_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_annotation_config(tmp_path / "absent.yaml")
    for text, message in [("datasets:\n  - name: foo\n    path: x.json\n", "unknown dataset 'foo'"),
                          ("datasets:\n  - name: lvis\n", "missing key 'path'"),
                          ("datasets:\n  - name: lvis\n    path: a\n  - name: lvis\n    path: b\n", "listed twice")]:
        (tmp_path / "a.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_annotation_config(tmp_path / "a.yaml")
    assert parse_annotation_overrides(["reason_seg_eval=reason_seg/annotations/test"]) == {
        "reason_seg_eval": "reason_seg/annotations/test"}
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_annotation_overrides(["lvis"])
    with pytest.raises(ConfigError, match="unknown dataset 'foo_eval'"):
        parse_annotation_overrides(["foo_eval=x"])
    with pytest.raises(ConfigError, match="annotation_paths: unknown dataset"):
        TrainRecipe.from_dict({"data": {"annotation_paths": {"foo": "x"}}})
    with pytest.raises(ConfigError, match="give one"):
        TrainRecipe.from_dict({"data": {"mix": ["a.json"], "conversation_config": "c.yaml", "conversations": "."}})


@pytest.fixture
def moved(tmp_path):
    """The miniature with RefCOCO's instances.json moved to mine/refcoco.json: only an override finds it."""
    layout = build_released_layout(tmp_path / "data")
    (layout["ann"] / "mine").mkdir()
    shutil.move(layout["ann"] / "refcoco" / "instances.json", layout["ann"] / "mine" / "refcoco.json")
    return layout


def test_an_override_path_is_used(moved, capsys):
    roots = Roots(moved["root"])
    assert [n.name for n in check_benchmark("mr-refcoco", roots, conversations=MIX, overrides=TRAIN_AS_EVAL).missing] == [
        "refcoco (refcoco/instances.json)"]
    overrides = {**TRAIN_AS_EVAL, "refcoco": "mine/refcoco.json"}
    assert check_benchmark("mr-refcoco", roots, conversations=MIX, overrides=overrides).runnable
    data, _ = open_benchmark("mr-refcoco", roots, split="val", conversations=MIX, overrides=overrides)
    assert np.array_equal(data[0].rounds[0].masks[0], EXP["refcoco", 101])  # read from the moved file
    # the same from the command line: an annotation config as shipped plus --annotation on top
    yaml_file = moved["root"] / "a.yaml"
    yaml_file.write_text("datasets:\n  - name: pascal\n    path: pascal/pascal_labels.json\n"
                         "  - name: reason_seg\n    path: reason_seg/annotations/train\n")
    args = ["data", "check", str(moved["root"]), "--benchmark", "mr-refcoco", "--conversations", MIX,
            "--annotation-config", str(yaml_file)]
    assert main(args) == 1 and "refcoco (refcoco/instances.json)" in capsys.readouterr().out
    assert main([*args, "--annotation", "refcoco=mine/refcoco.json"]) == 0
    assert "refcoco (mine/refcoco.json)" in capsys.readouterr().out


def test_training_reads_the_configs(moved, tmp_path, monkeypatch):
    conv_yaml = tmp_path / "mix.yaml"
    conv_yaml.write_text("datasets:\n  - name: mix.json\n  - name: mix.json\n")
    ann_yaml = tmp_path / "ann.yaml"
    ann_yaml.write_text("datasets:\n  - name: refcoco\n    path: mine/refcoco.json\n  - name: pascal\n"
                        "    path: pascal/pascal_labels.json\n  - name: reason_seg\n    path: reason_seg/annotations/train\n")
    toml = tmp_path / "r.toml"
    toml.write_text(f'steps = 1\n[data]\nval = "{moved["convs"]}"\nimages = "{moved["images"]}"\n'
                    f'annotations = "{moved["ann"]}"\n')
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(recipe, resume):  # the recipe the command built, without training
        seen["recipe"] = recipe
        raise Stop

    monkeypatch.setattr("segllm.commands.train", fake_train)
    with pytest.raises(Stop):
        main(["train", str(toml), "--conversation-config", str(conv_yaml), "--conversation-folder",
              str(moved["convs"].parent), "--annotation-config", str(ann_yaml), "--annotation", "lvis=lvis/x.json"])
    recipe = seen["recipe"]
    assert recipe.data.train_sources() == (str(moved["convs"]),) * 2
    train_set, val_set = build_datasets(recipe)
    assert len(train_set.sources) == 2 and len(train_set.sources[0]) == 11
    lookup = train_set.sources[0].lookup
    assert lookup.path("refcoco") == moved["ann"] / "mine/refcoco.json" and lookup.path("lvis") == moved["ann"] / "lvis/x.json"
    assert val_set.lookup.is_eval and val_set.lookup.path("reason_seg") == moved["ann"] / "reason_seg/annotations/train"
    assert train_set.sources[0][0].rounds[0].masks[0].sum() == EXP["refcoco", 101].sum()


def test_eval_reads_a_conversation_config_list(moved, tmp_path, capsys):
    second = moved["convs"].parent / "again.json"
    second.write_text(json.dumps(json.loads(moved["convs"].read_text())[:3]))
    (tmp_path / "list.yaml").write_text("datasets:\n  - name: mix.json\n  - name: again.json\n")
    roots = Roots(moved["root"])
    overrides = {**TRAIN_AS_EVAL, "refcoco": "mine/refcoco.json"}
    data, where = open_benchmark("released", roots, split="val", conversations=[str(moved["convs"]), str(second)],
                                 overrides=overrides)
    assert len(data) == 14 and "again.json[1]" in data.where(12) and "14 conversations" in where
    assert data.get(12) is not None and data.get(6) is None and len(data.skipped) == 1
    assert main(["data", "check", str(moved["root"]), "--benchmark", "released", "--conversations", str(tmp_path / "list.yaml"),
                 "--conversation-folder", str(second.parent), "--annotation", "refcoco=mine/refcoco.json",
                 "--annotation", "pascal_eval=pascal/pascal_labels.json",
                 "--annotation", "reason_seg_eval=reason_seg/annotations/train"]) == 0
    out = capsys.readouterr().out
    assert "all_data_mix_train/mix.json" in out and "all_data_mix_train/again.json" in out and "3 records" in out
