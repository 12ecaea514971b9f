"""Checkpoints, pickled weights and training recipes through the Python API and the CLI.

A damaged checkpoint folder is refused by ``SegLLM.from_pretrained`` / ``Session.from_pretrained``,
``segllm chat --checkpoint`` and ``segllm demo --checkpoint`` (before any server starts) with one
error naming the file or weight; a pickle is converted only through the restricted unpickler
(``segllm convert-weights``); a recipe with a syntax error, an unknown key or a value out of
range is refused by ``TrainRecipe.load`` and ``segllm train`` before any training starts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from segllm.convert_weights import pickle_to_safetensors
from segllm.model.segllm import SegLLM
from segllm.session import Session
from segllm.train.recipe import TrainRecipe
from tests.reliability.doors import OK, Expect, check_api, check_cli, fails, run_cli

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CkptCase:
    id: str
    damage: Callable[[Path], None]  # changes a copy of the tiny checkpoint in place
    expect: Expect = OK


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        p = folder / name
        (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)

    return damage


def _remove(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        p = folder / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return damage


def _config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))

    return damage


def _weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        # copies: load_file maps the file, which is about to be overwritten
        state = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}
        change(state)
        save_file(state, str(folder / "model.safetensors"))

    return damage


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        p = folder / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return damage


def _first_key(state: dict) -> str:
    return sorted(state)[0]


def _reshape_first(state: dict) -> None:
    k = _first_key(state)
    state[k] = torch.zeros(*state[k].shape[:-1], state[k].shape[-1] + 1)


def _pickle_as_weights(folder: Path) -> None:
    state = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}  # unmapped copies
    torch.save(state, folder / "model.safetensors")


def _gone(folder: Path) -> None:
    shutil.rmtree(folder)


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()


def _remove_tokenizer(folder: Path) -> None:
    for p in folder.glob("*tok*"):
        p.unlink()


def _float64(state: dict) -> None:
    for k in state:
        state[k] = state[k].double()


CKPT = "model.safetensors"
CASES = [
    CkptCase("valid", lambda f: None),
    CkptCase("weights-stored-as-float64", _weights(_float64)),  # converted to the model's dtype on load
    CkptCase("folder-missing", _gone, fails(r"checkpoint folder not found")),
    CkptCase("folder-empty", _empty, fails(r"is not a segllm checkpoint: it has no config.json")),
    CkptCase("config-not-json", _write("config.json", "{oops"), fails(r"cannot read .*config.json")),
    CkptCase("config-a-list", _write("config.json", "[1, 2]"), fails(r"config.json is not a segllm checkpoint config: expected a JSON object, got a list")),
    CkptCase("config-unknown-key", _config(lambda c: c.update(colour="red")), fails(r"unknown config key 'colour'")),
    CkptCase("config-wrong-type", _config(lambda c: c["llm"].update(hf_config="big")), fails(r"llm.hf_config")),
    CkptCase("config-other-format", _config(lambda c: c.update(format="segllm-99")), fails(r"not a segllm checkpoint config \(format 'segllm-99'")),
    CkptCase("weights-missing", _remove(CKPT), fails(r"has no model.safetensors")),
    CkptCase("weights-random-bytes", _write(CKPT, os.urandom(4096)), fails(r"cannot read weights .*model.safetensors")),
    CkptCase("weights-truncated", _truncate(CKPT), fails(r"cannot read weights .*model.safetensors")),
    CkptCase("weights-header-claims-1e15-bytes", _write(CKPT, (10**15).to_bytes(8, "little") + b"{}"),
             fails(r"cannot read weights .*model.safetensors")),
    CkptCase("weights-a-pickle", _pickle_as_weights, fails(r"cannot read weights .*model.safetensors")),
    CkptCase("weight-missing", _weights(lambda s: s.pop(_first_key(s))), fails(r"missing weight\(s\)")),
    CkptCase("weight-unexpected", _weights(lambda s: s.update(extra=torch.zeros(2))), fails(r"unexpected weight\(s\) .*extra")),
    CkptCase("weight-wrong-shape", _weights(_reshape_first), fails(r"has shape .*the model expects")),
    CkptCase("tokenizer-missing", lambda f: _remove_tokenizer(f), fails(r"tokenizer")),
    CkptCase("tokenizer-corrupt", _write("tokenizer.json", "{not json"), fails(r"cannot load the tokenizer from .*ckpt: Exception: ")),
]


@pytest.fixture
def damaged(tmp_path, tiny_checkpoint) -> Callable[[CkptCase], Path]:
    def make(case: CkptCase) -> Path:
        folder = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint, folder)
        case.damage(folder)
        return folder

    return make


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_checkpoint_api(case: CkptCase, damaged):
    folder = damaged(case)
    model = check_api(case.expect, lambda: SegLLM.from_pretrained(folder))
    if case.expect.ok:
        r = Session(model, torch.zeros(16, 24, 3, dtype=torch.uint8).numpy(), max_new_tokens=2).ask("Segment it.", answer="<seg>")
        assert r.masks.shape[1:] == (16, 24)
        assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_checkpoint_cli_chat(case: CkptCase, damaged, tmp_path, capsys):
    folder = damaged(case)
    res = run_cli(capsys, ["chat", "--checkpoint", folder, "--ask", "Segment the cross.", "--out", tmp_path / "o",
                           "--max-new-tokens", "2"])
    check_cli(case.expect, res)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if not c.expect.ok])
def test_checkpoint_cli_demo(case: CkptCase, damaged, capsys):
    """``segllm demo --checkpoint BAD`` refuses before a server starts (a good one would serve)."""
    pytest.importorskip("gradio")
    check_cli(case.expect, run_cli(capsys, ["demo", "--checkpoint", damaged(case), "--port", "1"]))


# -- pickled weights: segllm convert-weights ----------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _pickle(obj, **kw) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "w.pth"
        torch.save(obj, path, **kw)
        return path

    return make


def _raw(data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "w.pth"
        path.write_bytes(data)
        return path

    return make


def _truncated_pickle(folder: Path) -> Path:
    path = _pickle({"a": torch.ones(64, 64)})(folder)
    path.write_bytes(path.read_bytes()[:300])
    return path


PICKLES = [
    ("state-dict", _pickle({"w": torch.ones(2, 3), "b": torch.zeros(3)}), OK),
    ("wrapped-state-dict-legacy-format", _pickle({"model": {"w": torch.ones(2)}, "iteration": 7},
                                                 _use_new_zipfile_serialization=False), OK),
    ("code-in-the-pickle", _pickle({"w": torch.ones(2), "x": _Evil()}), fails(r"refused: .*system")),
    ("not-a-pickle", _raw(b"hello world\n" * 10), fails(r"not a PyTorch weights file")),
    ("truncated-zip", _truncated_pickle, fails(r"not a PyTorch weights file")),
    ("no-tensors", _pickle({"lr": 0.1, "names": ["a"]}), fails(r"no tensors found")),
    ("missing", lambda f: f / "gone.pth", fails(r"no such file")),
]


@pytest.mark.parametrize("make, expect", [pytest.param(m, e, id=i) for i, m, e in PICKLES])
def test_pickle_api(make, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = make(tmp_path)
    got = check_api(expect, lambda: pickle_to_safetensors(src, tmp_path / "w.safetensors"), names=src.name)
    if expect.ok:
        assert set(load_file(str(tmp_path / "w.safetensors"))) == set(got) and got
    assert not (tmp_path / "pwned.txt").exists()  # nothing in a pickle ever runs


@pytest.mark.parametrize("make, expect", [pytest.param(m, e, id=i) for i, m, e in PICKLES])
def test_pickle_cli(make, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = make(tmp_path)
    res = run_cli(capsys, ["convert-weights", src, tmp_path / "w.safetensors"])
    check_cli(expect, res, names=src.name)
    if expect.ok:
        assert "wrote" in res.out and (tmp_path / "w.safetensors").is_file()
    assert not (tmp_path / "pwned.txt").exists()


# -- training recipes: TrainRecipe.load and segllm train ----------------------------------------
TINY = (ROOT / "configs" / "test_tiny.toml").read_text()

RECIPES = [
    ("toml-syntax-error", TINY + "\nsteps = = 3\n", [], fails(r"cannot read recipe .*recipe.toml")),
    ("not-utf8", b"\xff\xfe steps = 3", [], fails(r"cannot read recipe .*recipe.toml")),
    ("unknown-top-key", "stepz = 3\n" + TINY, [], fails(r"unknown config key 'stepz'")),
    ("unknown-nested-key", TINY.replace("lr = 3e-3", "lrate = 3e-3"), [], fails(r"unknown config key 'optim.lrate'")),
    ("unknown-table", TINY + "\n[optimiser]\nlr = 1\n", [], fails(r"unknown config key 'optimiser'")),
    ("wrong-type", TINY.replace("steps = 12", 'steps = "twelve"'), [], fails(r"steps")),
    ("negative-steps", TINY.replace("steps = 12", "steps = -5"), [], fails(r"steps must be >= 1, got -5")),
    ("zero-batch-size", TINY.replace("batch_size = 2", "batch_size = 0"), [], fails(r"batch_size must be >= 1")),
    ("zero-log-every", TINY.replace("log_every = 1", "log_every = 0"), [], fails(r"log_every must be >= 1, got 0")),
    ("negative-save-every", TINY.replace("save_every = 6", "save_every = -6"), [], fails(r"save_every must be >= 0, got -6")),
    ("negative-eval-size", TINY.replace("eval_size = 4", "eval_size = -4"), [], fails(r"eval_size must be >= 0")),
    ("negative-lr", TINY.replace("lr = 3e-3", "lr = -3e-3"), [], fails(r"optim.lr must be > 0")),
    ("negative-warmup", TINY.replace("warmup_steps = 2", "warmup_steps = -2"), [], fails(r"optim.warmup_steps must be >= 0")),
    ("min-lr-ratio-over-1", TINY + "", ["optim.min_lr_ratio=2.0"], fails(r"optim.min_lr_ratio must be between 0 and 1")),
    ("unknown-preset", TINY.replace('preset = "tiny"', 'preset = "huge"'), [], fails(r"preset")),
    ("set-unknown-key", TINY, ["optim.lrate=1"], fails(r"optim.lrate")),
    ("set-negative-steps", TINY, ["steps=-1"], fails(r"steps must be >= 1")),
    ("recipe-missing", None, [], fails(r"cannot read recipe .*recipe.toml")),
]


def _recipe_file(folder: Path, text) -> Path:
    path = folder / "recipe.toml"
    if text is not None:
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _overrides(sets: list[str]) -> dict:
    import tomllib

    return {k: tomllib.loads(f"v = {v}")["v"] for k, v in (s.split("=", 1) for s in sets)}


@pytest.mark.parametrize("text, sets, expect", [pytest.param(*r[1:], id=r[0]) for r in RECIPES])
def test_recipe_api(text, sets, expect, tmp_path):
    path = _recipe_file(tmp_path, text)
    check_api(expect, lambda: TrainRecipe.load(path, _overrides(sets)))


@pytest.mark.parametrize("text, sets, expect", [pytest.param(*r[1:], id=r[0]) for r in RECIPES])
def test_recipe_cli_train(text, sets, expect, tmp_path, capsys):
    path = _recipe_file(tmp_path, text)
    args = ["train", path, "--set", f"output_dir='{tmp_path / 'run'}'"]
    for s in sets:
        args += ["--set", s]
    check_cli(expect, run_cli(capsys, args))
    assert not (tmp_path / "run" / "checkpoint-last").exists()  # refused before any training


def test_train_set_without_equals_is_one_line(tmp_path, capsys):
    res = run_cli(capsys, ["train", _recipe_file(tmp_path, TINY), "--set", "steps"])
    check_cli(fails(r"--set wants KEY=VALUE, got 'steps'"), res)


CASE_COUNT = len(CASES) + len(PICKLES) + len(RECIPES) + 1
DOOR_COUNT = 2 * len(CASES) + sum(not c.expect.ok for c in CASES) + 2 * len(PICKLES) + 2 * len(RECIPES) + 1
