"""Numbered checkpoints kept beside checkpoint-last (``keep_checkpoints``) and experiment trackers
through accelerate (``log_with``), on the tiny recipe."""

import json
import os
import shutil
from pathlib import Path

import pytest

from segllm.errors import ConfigError
from segllm.model.segllm import SegLLM
from segllm.train import trainer
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import _keep_numbered, numbered_checkpoints, train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.toml"


def _recipe(tmp_path, **overrides):
    return TrainRecipe.load(RECIPE, {"output_dir": str(tmp_path / "run"), **overrides})


def _step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


def test_keep_numbered_links_renames_and_prunes(tmp_path):
    last = tmp_path / "checkpoint-last"
    (tmp_path / ".numbered.7").mkdir()  # a copy interrupted by a crash
    (tmp_path / "checkpoint-final").mkdir()  # not a numbered checkpoint: left alone
    for step in (2, 4, 6, 8):
        # as _save does: a new folder renamed over checkpoint-last, never a file rewritten in place
        new = tmp_path / f".ckpt.{step}"
        (new / "model").mkdir(parents=True)
        (new / "model" / "weights").write_text(str(step))
        (new / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(last, ignore_errors=True)
        os.replace(new, last)
        _keep_numbered(tmp_path, step, keep=2)
    assert list(numbered_checkpoints(tmp_path)) == [6, 8]
    assert _step(tmp_path / "checkpoint-8") == 8 and (tmp_path / "checkpoint-6" / "model" / "weights").read_text() == "6"
    # a hard link, not a second copy of the weights
    assert os.path.samefile(tmp_path / "checkpoint-8" / "model" / "weights", last / "model" / "weights")
    assert not list(tmp_path.glob(".numbered.*")) and (tmp_path / "checkpoint-final").is_dir()
    assert _step(last) == 8


def test_training_keeps_the_last_n_numbered_checkpoints_and_resumes_from_last(tmp_path):
    r = _recipe(tmp_path, steps=8, save_every=2, keep_checkpoints=2)
    train(r, progress=False, stop_after=4)  # saves at 2 and 4, then "dies"
    run = Path(r.output_dir)
    assert list(numbered_checkpoints(run)) == [2, 4]
    summary = train(r, resume=True, progress=False)  # --resume reads checkpoint-last (step 4)
    assert summary.steps == 8 and len(summary.losses) == 4
    assert list(numbered_checkpoints(run)) == [6, 8]
    assert _step(run / "checkpoint-last") == 8
    for step, folder in numbered_checkpoints(run).items():
        assert _step(folder) == step
        assert json.loads((folder / "model" / "config.json").read_text())  # a complete model folder
    assert SegLLM.from_pretrained(run / "checkpoint-6" / "model").config.llm.hf_config["num_hidden_layers"] == 2
    assert not list(run.glob(".numbered.*")) and not list(run.glob(".ckpt.*"))


def test_no_numbered_checkpoints_by_default(tmp_path):
    r = _recipe(tmp_path, steps=2, save_every=1)
    assert r.keep_checkpoints == 0 and r.log_with == ()
    train(r, progress=False)
    run = Path(r.output_dir)
    assert numbered_checkpoints(run) == {} and (run / "checkpoint-last").is_dir()
    assert not (run / "trackers").exists()  # the JSONL log only


def test_recipe_checks_the_new_fields(tmp_path):
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 0"):
        _recipe(tmp_path, keep_checkpoints=-1)
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['mlflow'\]"):
        _recipe(tmp_path, log_with=["mlflow"])
    assert _recipe(tmp_path, log_with=["tensorboard", "wandb"]).log_with == ("tensorboard", "wandb")


@pytest.mark.parametrize("tracker, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_whose_package_is_missing_stops_before_anything_starts(tmp_path, monkeypatch, tracker, package):
    real = trainer.importlib.util.find_spec
    hidden = {"tensorboard", "tensorboardX", "wandb"}
    monkeypatch.setattr(trainer.importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    r = _recipe(tmp_path, log_with=[tracker])
    with pytest.raises(ConfigError, match=rf"asks for {tracker}, but no {package}.*pip install {package}"):
        train(r, progress=False)
    assert not Path(r.output_dir).exists()


def test_tensorboard_receives_the_logged_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = _recipe(tmp_path, steps=3, save_every=0, eval_every=3, log_with=["tensorboard"])
    train(r, progress=False)
    run = Path(r.output_dir)
    # the run's scalars: trackers/<output folder's name>/ (the hparams go to a subfolder of it)
    events = sorted((run / "trackers" / run.name).glob("events.out.tfevents.*"))
    assert events, list((run / "trackers").rglob("*"))
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    scalars = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert scalars == pytest.approx({e["step"]: e["loss"] for e in logged}, rel=1e-6)
    assert [e.step for e in acc.Scalars("val/oracle_cIoU/1")] == [3]
