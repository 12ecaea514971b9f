import copy
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segllm import precision
from segllm.errors import CheckpointError, ConfigError
from segllm.model.builder import build_segllm
from segllm.model.loading import load_with_decoder_changes
from segllm.model.segllm import SegLLM
from segllm.presets import tiny_config
from segllm.train.recipe import TrainRecipe
from segllm.train.state import load_optimizer, save_optimizer
from segllm.train.trainer import _recover_last, train
from tests.helpers import with_ref_prior

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "test_tiny.toml"


def _recipe(tmp_path, **overrides):
    return TrainRecipe.load(RECIPE, {"output_dir": str(tmp_path / "run"), **overrides})


def _falls(losses):
    return sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


def test_losses_fall_and_checkpoint_reloads(tmp_path):
    summary = train(_recipe(tmp_path), progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert ((tmp_path / "run" / "checkpoint-last").stat().st_mode & 0o777) == 0o777 & ~umask  # not a private temp folder
    assert summary.steps == 12 and len(summary.losses) == 12
    assert _falls(summary.losses), summary.losses
    ck = tmp_path / "run" / "checkpoint-last"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["samples_seen"] == 24
    model = SegLLM.from_pretrained(ck / "model")
    assert model.config.llm.hf_config["num_hidden_layers"] == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 13))


def test_resume_continues_the_same_run(tmp_path):
    """6 steps, then --resume to 12, gives exactly the losses of 12 steps straight."""
    straight = train(_recipe(tmp_path / "a"), progress=False)
    first = train(_recipe(tmp_path / "b", steps=12, save_every=6), progress=False)
    assert first.losses == straight.losses
    r = _recipe(tmp_path / "c")
    train(r, progress=False, stop_after=6)  # as if the run died after step 6's checkpoint
    resumed = train(r, resume=True, progress=False)
    assert resumed.losses == pytest.approx(straight.losses[6:], rel=1e-5)
    # a save killed between its two renames leaves only .checkpoint-old (and its temp folder, here
    # a half-written one): resume finds the complete old checkpoint and continues the same run
    d = _recipe(tmp_path / "d")
    train(d, progress=False, stop_after=6)
    run = Path(d.output_dir)
    os.replace(run / "checkpoint-last", run / ".checkpoint-old")
    (run / ".ckpt.9" / "model").mkdir(parents=True)  # no trainer_state.json: incomplete, ignored
    again = train(d, resume=True, progress=False)
    assert again.losses == pytest.approx(straight.losses[6:], rel=1e-5)
    assert json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 12
    assert not (run / ".checkpoint-old").exists()


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    """Without training: checkpoint-last missing, a complete .checkpoint-old (step 6) and a complete
    temp folder (step 8, written in full before the renames) -> the temp folder becomes checkpoint-last."""
    def fake(folder: Path, step: int, complete: bool = True) -> None:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")
        (folder / "model" / "model.safetensors").write_bytes(b"")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"step": step}))

    fake(tmp_path / ".checkpoint-old", 6)
    fake(tmp_path / ".ckpt.8", 8)
    fake(tmp_path / ".ckpt.10", 10, complete=False)
    assert _recover_last(tmp_path) == tmp_path / "checkpoint-last"
    assert json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 8
    assert (tmp_path / ".checkpoint-old").is_dir()  # the older one is kept until the next save replaces it
    assert not (tmp_path / ".ckpt.10").exists()  # a half-written save's temp folder does not pile up
    assert _recover_last(tmp_path / "nothing") is None


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from in .*run"):
        train(_recipe(tmp_path), resume=True, progress=False)


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrate"):
        TrainRecipe.load(RECIPE, {"optim.lrate": 1.0})
    with pytest.raises(ConfigError, match=r"batch_size"):
        TrainRecipe.load(RECIPE, {"batch_size": "eight"})
    (tmp_path / "bad.toml").write_text("steps = [")
    with pytest.raises(ConfigError, match="cannot read recipe"):
        TrainRecipe.load(tmp_path / "bad.toml")


def test_optimizer_state_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9))
    p.sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path / "o.safetensors")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    load_optimizer(opt2, tmp_path / "o.safetensors")
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.1 and s2["param_groups"][0]["betas"] == (0.8, 0.9)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(s1["state"][0][k], s2["state"][0][k])


def test_two_process_training(tmp_path):
    """Two CPU processes (gloo) through torch.distributed.run: the losses fall, the checkpoint reloads."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "segllm.cli", "train", str(RECIPE), "--set", f'output_dir="{out}"']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["samples_seen"] == 48  # 12 steps x 2 processes x 2
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and _falls(losses)
    SegLLM.from_pretrained(out / "checkpoint-last" / "model")


def _two_processes(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "segllm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


# slow set (CI's second step): ~45 s of two fresh processes at 1 thread; test_two_process_training
# keeps the two-process path in the fast set
@pytest.mark.slow
def test_two_process_fsdp_training_resumes_on_one_process(tmp_path):
    """FSDP2 across two CPU processes (gloo): losses fall, the gathered checkpoint reloads, and a
    one-process run resumes from it and continues the loss curve."""
    out = tmp_path / "run"
    proc = _two_processes(["train", str(RECIPE), "--set", f'output_dir="{out}"', "--set", 'parallel="fsdp"',
                           "--set", "eval_every=6"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["step"] == 12
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and _falls(losses)
    assert len((out / "eval.jsonl").read_text().splitlines()) == 2  # written once per evaluation
    model = SegLLM.from_pretrained(out / "checkpoint-last" / "model")
    assert not any("DTensor" in type(p).__name__ for p in model.parameters())
    # resume on one process: the optimizer state (gathered from the shards) loads and training continues
    recipe = TrainRecipe.load(RECIPE, {"output_dir": str(out), "steps": 16, "parallel": "fsdp"})
    summary = train(recipe, resume=True, progress=False)
    assert summary.steps == 16 and len(summary.losses) == 4
    assert sum(summary.losses) / 4 < sum(losses[:3]) / 3
    # and back to two sharded processes: the full optimizer state is split into shards again
    proc = _two_processes(["train", str(RECIPE), "--resume", "--set", f'output_dir="{out}"', "--set", 'parallel="fsdp"',
                           "--set", "steps=18", "--set", "eval_every=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 18
    tail = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()][-2:]
    assert sum(tail) / 2 < sum(losses[:3]) / 3


def test_gradient_checkpointing_gives_the_same_step(tmp_path, monkeypatch):
    """Recomputing the LLM's activations changes memory, not the result."""
    import transformers.modeling_utils as mu

    calls = []
    real = mu.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)  # what gradient_checkpointing_enable binds
    losses = []
    for flag in (False, True):
        recipe = TrainRecipe.load(RECIPE, {"output_dir": str(tmp_path / str(flag)), "steps": 3, "save_every": 0,
                                           "eval_every": 0, "gradient_checkpointing": flag})
        losses.append(train(recipe, progress=False).losses)
        assert bool(calls) == flag  # the LLM's layers ran through activation checkpointing
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_data_loader_workers_give_the_same_run(tmp_path):
    """Batches built ahead in worker processes are the batches the main process would build."""
    inline = train(_recipe(tmp_path / "a", steps=4, eval_every=0), progress=False)
    ahead = train(_recipe(tmp_path / "b", steps=4, eval_every=0, workers=2), progress=False)
    assert ahead.losses == pytest.approx(inline.losses, rel=1e-5)


def test_data_start_reads_fresh_conversations_and_a_resume_keeps_it(tmp_path, monkeypatch, caplog):
    """A run from data.start reads the training set from that position on; resumed with another
    data.start on the command line, it continues its own stream."""
    from segllm.data.records import WorldConversations

    read = []
    original = WorldConversations.get

    def get(self, index):
        if self.split == "train":
            read.append(index)
        return original(self, index)

    monkeypatch.setattr(WorldConversations, "get", get)
    r = _recipe(tmp_path, steps=4, eval_every=0, save_every=2, data={"start": 100})
    train(r, progress=False, stop_after=2)
    assert read[-4:] == [100, 101, 102, 103]  # 2 steps of 2 from position 100 (before them: the tokenizer's corpus)
    assert 104 not in read
    read.clear()
    again = _recipe(tmp_path, steps=4, eval_every=0, save_every=2, data={"start": 7})
    with caplog.at_level("WARNING"):
        train(again, resume=True, progress=False)
    assert read == [104, 105, 106, 107]
    assert "data.start stays 100" in caplog.text
    read.clear()  # and its checkpoints keep it: a second resume continues the same stream
    train(_recipe(tmp_path, steps=6, eval_every=0, save_every=2, data={"start": 7}), resume=True, progress=False)
    assert read == [108, 109, 110, 111]
    with pytest.raises(ConfigError, match="data.start"):
        _recipe(tmp_path, data={"start": -1})


def test_time_budget_stops_with_a_checkpoint_and_anneals(tmp_path):
    from segllm.train.trainer import lr_lambda

    # a budget spent after the first step: one step, then a checkpoint and an evaluation
    summary = train(_recipe(tmp_path, steps=1000, time_limit_s=1e-3, eval_every=0), progress=False)
    assert summary.steps == 1
    state = json.loads((tmp_path / "run" / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["history"]["elapsed_s"] > 1e-3
    # the cosine runs on the elapsed share of the budget, not on the 1000 steps
    r = _recipe(tmp_path, steps=1000, time_limit_s=100.0)
    half, done = lr_lambda(r, lambda: 50.0), lr_lambda(r, lambda: 100.0)
    w = r.optim.warmup_steps
    assert half(w + 1) == pytest.approx(r.optim.min_lr_ratio + (1 - r.optim.min_lr_ratio) * 0.5)
    assert done(w + 1) == pytest.approx(r.optim.min_lr_ratio)
    with pytest.raises(ConfigError, match="time_limit_s"):
        _recipe(tmp_path, time_limit_s=-1)


def test_per_part_clipping_clips_each_part_and_logs_gradient_norms(tmp_path, monkeypatch):
    from accelerate import Accelerator

    calls = []
    original = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append(len(parameters))
        return original(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    summary = train(_recipe(tmp_path, steps=2, log_every=1, **{"optim.clip_mode": "per_part"}), progress=False)
    model = SegLLM.from_pretrained(tmp_path / "run" / "checkpoint-last" / "model")
    trainable = [p for p in model.parameters() if p.requires_grad]
    parts = [name for name, ps in model.part_parameters().items() if any(p.requires_grad for p in ps)]
    assert len(calls) == 2 * len(parts)  # one clip per part per step
    assert sum(calls[: len(parts)]) == len(trainable)  # every trainable parameter exactly once
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    norms = log[-1]["grad_norm"]
    assert set(norms) == set(parts) and all(v > 0 for v in norms.values())
    assert all(torch.isfinite(torch.tensor(loss)) for loss in summary.losses)


def test_recipe_loss_overrides_reach_the_model_config(tmp_path):
    recipe = _recipe(tmp_path, **{"model.loss": {"select_weight": 0.5, "lm": 0.2}})
    cfg = recipe.model_config(400)
    assert cfg.loss.select_weight == 0.5 and cfg.loss.lm == 0.2 and cfg.loss.dice_weight == 2.0
    with pytest.raises(ConfigError, match="model.loss"):
        _recipe(tmp_path, **{"model.loss": {"selekt_weight": 0.5}})


def test_validation_logs_the_grounded_rate_on_world_data(tmp_path):
    train(_recipe(tmp_path, steps=2, eval_every=2, eval_size=4, save_every=0), progress=False)
    entry = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    grounded = entry["oracle_grounded"]
    assert "1" in grounded and "all" in grounded
    assert all(0.0 <= v <= 100.0 for v in grounded.values())
    assert set(grounded) == set(entry["oracle_cIoU"])
    given = entry["oracle_iou_given_grounded"]
    assert set(given) == set(grounded) and all(v is None or 0.0 <= v <= 100.0 for v in given.values())
    families = entry["oracle_by_family"]
    assert families and all(set(f) == {"cIoU", "grounded", "iou_given_grounded"} for f in families.values())
    # the question-blind answer of the same four conversations, as segllm eval --baseline union scores it
    from segllm.eval.evaluate import evaluate_baseline
    from segllm.train.trainer import build_datasets

    blind = evaluate_baseline(build_datasets(_recipe(tmp_path))[1], limit=4)
    assert entry["question_blind_cIoU"] == {k: round(v["cIoU"], 2) for k, v in blind.metrics.items()}


def test_init_with_decoder_changes_starts_from_the_checkpoint_with_fresh_layers(tmp_path, tokenizer, three_rounds):
    cfg = with_ref_prior(tiny_config(len(tokenizer)))
    cfg.decoder.ref_prior = False
    torch.manual_seed(0)
    saved = build_segllm(cfg, copy.deepcopy(tokenizer)).eval()
    saved.save_pretrained(tmp_path / "start")
    grown = load_with_decoder_changes(tmp_path / "start", {"ref_prior": True}).eval()
    assert grown.uses_ref_masks and not saved.uses_ref_masks
    old = saved.state_dict()
    added = {k for k in grown.state_dict() if k not in old}
    assert added and all(k.startswith("decoder.ref_") for k in added)
    assert all(torch.equal(v, old[k]) for k, v in grown.state_dict().items() if k in old)
    # its new layers start at zero: the same masks as the checkpoint's
    for (ma, _), (mb, _) in zip(saved.segment([three_rounds])[0], grown.segment([three_rounds])[0]):
        np.testing.assert_array_equal(ma, mb)
    with pytest.raises(ConfigError, match="decoder changes"):
        load_with_decoder_changes(tmp_path / "start", {"ref_priorr": True})
    # the recipe's model.decoder does the same for a run started from model.init
    recipe = _recipe(tmp_path, **{"model.init": str(tmp_path / "start"), "model.decoder": {"ref_prior": True}, "steps": 1, "save_every": 0})
    train(recipe, progress=False)
    assert SegLLM.from_pretrained(tmp_path / "run" / "checkpoint-last" / "model").config.decoder.ref_prior
    with pytest.raises(ConfigError, match="model.decoder"):  # the tiny preset's SAM decoder has no such option
        _recipe(tmp_path, **{"model.decoder": {"ref_prior": True}}).model_config(400)


def test_recipe_trainable_parts_train_alone_and_are_recorded(tmp_path, tokenizer):
    torch.manual_seed(0)
    start = build_segllm(tiny_config(len(tokenizer)), copy.deepcopy(tokenizer))
    start.save_pretrained(tmp_path / "start")
    recipe = _recipe(tmp_path, **{"model.init": str(tmp_path / "start"), "model.trainable": ["decoder", "prompt_head"], "steps": 2, "save_every": 0})
    train(recipe, progress=False)
    after = SegLLM.from_pretrained(tmp_path / "run" / "checkpoint-last" / "model")
    assert after.config.trainable == ("decoder", "prompt_head")
    before, now = start.state_dict(), after.state_dict()
    moved = {k.split(".")[0] for k, v in now.items() if not torch.equal(v, before[k])}
    assert "decoder" in moved and moved <= {"decoder", "prompt_head"}  # the LLM, vision tower and memory stayed
    with pytest.raises(ConfigError, match="model.trainable"):
        _recipe(tmp_path, **{"model.trainable": ["decodr"]})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.toml")), ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_shipped_recipe_reads(path):
    # the README and the recipes' own comments give these as commands: they must at least parse
    recipe = TrainRecipe.load(path)
    assert recipe.batch_size >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about bfloat16 on the CPU")
def test_bf16_autocast_on_a_cpu_without_bfloat16_warns_and_still_trains(tmp_path, monkeypatch, caplog):
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(precision, "cpu_bfloat16_is_native", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())
    # accelerate keeps one precision a process: the other tests' runs set float32
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with caplog.at_level(logging.WARNING, logger="segllm.precision"):
            summary = train(_recipe(tmp_path, mixed_precision="bf16", steps=1), progress=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary.steps == 1
    assert ['mixed_precision = "bf16"' in r.getMessage() for r in caplog.records if r.name == "segllm.precision"] == [True]


def test_log_says_how_much_of_the_time_the_loop_waits_for_batches(tmp_path, monkeypatch):
    """``data_wait_share``: the part of each logged interval spent waiting for the next batch.
    Batch builders made slow (0.1 s more per conversation) must show as a loop that mostly waits."""
    import time

    from segllm.data.records import WorldConversations

    def shares(run):
        return [json.loads(line)["data_wait_share"] for line in (run / "log.jsonl").read_text().splitlines()]

    train(_recipe(tmp_path / "plain", steps=4), progress=False)
    plain = shares(tmp_path / "plain" / "run")
    original = WorldConversations.__getitem__

    def slow(self, index):
        time.sleep(0.1)
        return original(self, index)

    monkeypatch.setattr(WorldConversations, "__getitem__", slow)
    # the first run's tokenizer: built anew, it would read 100 (slowed) conversations first
    train(_recipe(tmp_path / "slow", steps=4, **{"tokenizer.path": str(tmp_path / "plain" / "run" / "checkpoint-last" / "model")}),
          progress=False)
    waited = shares(tmp_path / "slow" / "run")
    assert all(0.0 <= s <= 1.0 for s in plain + waited)
    # the first line's interval includes the model's first, slowest step; the later ones are steady
    assert min(waited[1:]) > 0.5 and sum(waited[1:]) / 3 > sum(plain[1:]) / 3 + 0.2, (plain, waited)
