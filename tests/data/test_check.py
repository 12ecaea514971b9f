"""``segllm data check`` on the miniature released layout (tests/released_layout.py): a complete
layout reports runnable with its record counts; a missing image set, annotation or conversation
file is reported missing, named, with where to get it; ``segllm eval`` and ``segllm train`` stop
with that message before a model loads."""

import json
import shutil
from pathlib import Path

import pytest

from segllm.cli import main
from segllm.data.check import MIXES, DataMissingError, check_released_mix
from segllm.eval.benchmarks import Roots, check_benchmark
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import build_datasets
from tests.released_layout import build_released_layout

MIX = "all_data_mix_train/mix.json"
# the miniature has no evaluation files for pascal and reason_seg: evaluation reads the training ones
TRAIN_AS_EVAL = {"pascal_eval": "pascal/pascal_labels.json", "reason_seg_eval": "reason_seg/annotations/train"}


@pytest.fixture
def layout(tmp_path):
    """A fresh miniature per test: tests here delete parts of it."""
    return build_released_layout(tmp_path / "data")


def _need(check, what, name):
    return next(n for n in check.needs if n.what == what and n.name.split(" ")[0] == name)


def test_a_complete_layout_is_runnable_with_counts(layout):
    roots = Roots(layout["root"])
    check = check_benchmark("mr-refcoco", roots, conversations=MIX, overrides=TRAIN_AS_EVAL)
    assert check.runnable, check.message()
    assert _need(check, "conversations", MIX).records == 11
    # seven records name an image under coco/train2014 (one of them missing: a note, not a stop)
    assert _need(check, "images", "coco/train2014").records == 6
    assert _need(check, "images", "vg/VG_100K").present
    assert _need(check, "annotations", "refcoco").records == 4 and _need(check, "annotations", "paco_lvis").present
    assert any("foo_dataset" in n for n in check.notes) and any("not in coco/train2014" in n for n in check.notes)

    refcoco = check_benchmark("refcoco", roots, split="train")
    assert refcoco.runnable and _need(refcoco, "annotations", "refcoco/refs(unc).p").records == 2
    assert check_benchmark("reasonseg", roots, split="train").runnable


def test_a_missing_image_set_is_named_with_its_source(layout):
    shutil.rmtree(layout["images"] / "vg")
    check = check_benchmark("mr-refcoco", Roots(layout["root"]), conversations=MIX, overrides=TRAIN_AS_EVAL)
    assert not check.runnable
    (missing,) = check.missing
    assert (missing.what, missing.name, missing.records) == ("images", "vg/VG_100K", 1)
    assert "cs.stanford.edu/people/rak248/VG_100K_2" in missing.source
    assert "images vg/VG_100K (not found at" in check.message().splitlines()[0]
    assert "get vg/VG_100K: Visual Genome" in check.message()


def test_missing_eval_annotations_and_conversation_files(layout):
    roots = Roots(layout["root"])
    # without the overrides, evaluation reads pascal's and reason_seg's evaluation files: not there
    check = check_benchmark("mr-refcoco", roots, conversations=MIX)
    assert {n.name for n in check.missing} == {"pascal (pascal/pascal_labels_val.json)",
                                               "reason_seg (reason_seg/annotations/val)"}
    # mr-paco's usual file is not in the miniature
    paco = check_benchmark("mr-paco", roots)
    (missing,) = paco.missing
    assert missing.name == "all_data_mix_val/mr_paco_val.json" and "Marlo-Z/SegLLM_dataset" in missing.source
    # a split without refs cannot run
    assert not check_benchmark("refcoco", roots, split="val").runnable


def _write_mix(layout, name):
    """The conversation files of a released mix, each a copy of the miniature's first record."""
    record = json.loads(layout["convs"].read_text())[0]
    conv = layout["root"] / "conversations_folder"
    for f in MIXES[name].train:
        (conv / "all_data_mix_train" / f).write_text(json.dumps([record] * 2))
    (conv / "all_data_mix_val").mkdir(exist_ok=True)
    (conv / "all_data_mix_val" / MIXES[name].val).write_text(json.dumps([record]))
    for d in ("refcoco+", "refcocog"):
        (layout["ann"] / d).mkdir()
        shutil.copy(layout["ann"] / "refcoco" / "instances.json", layout["ann"] / d / "instances.json")


def test_a_released_mix(layout):
    roots = Roots(layout["root"])
    check = check_released_mix("mr_refcoco", roots.get("conversations"), roots.get("images"), roots.get("annotations"))
    assert not check.runnable and len([n for n in check.missing if n.what == "conversations"]) == 7
    _write_mix(layout, "mr_refcoco")
    check = check_released_mix("mr_refcoco", roots.get("conversations"), roots.get("images"), roots.get("annotations"))
    assert check.runnable, check.message()
    assert _need(check, "conversations", "mr_refcoco_hard_train.json").records == 2
    assert _need(check, "images", "coco/train2014").records == 13  # 6 files x 2 + the validation record
    (layout["ann"] / "refcocog" / "instances.json").unlink()
    check = check_released_mix("mr_refcoco", roots.get("conversations"), roots.get("images"), roots.get("annotations"))
    assert [n.name for n in check.missing] == ["refcocog (refcocog/instances.json)"]


def test_the_command(layout, capsys):
    root = str(layout["root"])
    assert main(["data", "check", root, "--benchmark", "refcoco", "--benchmark", "reasonseg", "--split", "train"]) == 0
    assert "benchmark refcoco train: runnable" in capsys.readouterr().out
    assert main(["data", "check", root, "--benchmark", "reasonseg"]) == 1
    out = capsys.readouterr().out
    assert "reasonseg val: NOT runnable" in out
    assert "reason_seg/annotations/val" in out and "dvlab-research/LISA" in out
    assert main(["data", "check", root, "--benchmark", "reasonseg", "--split", "train", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runnable"] and report["checks"][0]["name"] == "reasonseg train"
    assert report["checks"][0]["needs"][1]["records"] == 1
    # everything: the miniature runs no released mix
    assert main(["data", "check", root]) == 1
    out = capsys.readouterr().out
    assert "mix all_data_mix: NOT runnable" in out and "benchmark mr-refcoco: NOT runnable" in out
    assert main(["data", "check", root, "--mix", "nonsense"]) == 2
    # checking everything, --conversations is the 'released' benchmark's file; mr-* keep their usual ones
    assert main(["data", "check", root, "--conversations", MIX, "--json"]) == 1
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    convs = {name: [n["name"] for n in c["needs"] if n["what"] == "conversations"] for name, c in checks.items()}
    assert convs["released"] == [MIX] and convs["mr-refcoco"] == ["all_data_mix_val/mr_refcoco_val.json"]


def test_eval_stops_before_the_model_loads(layout, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("segllm.commands.load_model", no_model)
    rc = main(["eval", "--data-root", str(layout["root"]), "--benchmark", "mr-paco", "--out", str(layout["root"] / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "mr_paco_val.json" in err and "--conversations FILE" in err and "get all_data_mix_val/mr_paco_val.json" in err


def test_train_stops_before_the_model_loads(layout, tmp_path, monkeypatch):
    monkeypatch.setattr("segllm.train.trainer._start_model", lambda *a, **k: pytest.fail("the model must not load"))
    recipe = TrainRecipe.from_dict({"data": {
        "mix": [str(layout["convs"]), str(tmp_path / "absent.json")], "val": str(layout["convs"]),
        "images": str(layout["images"]), "annotations": str(layout["ann"])}})
    with pytest.raises(DataMissingError) as e:
        build_datasets(recipe)
    assert {n.name for n in e.value.check.missing} == {
        "absent.json", "pascal (pascal/pascal_labels_val.json)", "reason_seg (reason_seg/annotations/val)"}
    toml = tmp_path / "r.toml"
    toml.write_text(f'steps = 1\noutput_dir = "{tmp_path / "run"}"\n[data]\nmix = ["{tmp_path / "absent.json"}"]\n'
                    f'images = "{layout["images"]}"\nannotations = "{layout["ann"]}"\n')
    assert main(["train", str(toml)]) == 2
    assert not Path(tmp_path / "run" / "checkpoint-last").exists()
