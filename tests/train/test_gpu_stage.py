"""scripts/gpu_stage.sh, the one prepared command a lent GPU machine runs (README "The bundled
default model", stages 6-7), end to end on the CPU at a toy budget: a GPU session cannot afford to
find it broken. Slow (short trainings of the bundled model, about 45-55 s on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "segllm" / "assets" / "default_model"

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    full = {**os.environ, "OUT": str(out), "SCRATCH": str(scratch), "PY": sys.executable,
            "TRAIN_S": "3", "HARD_S": "240", "BATCH": "2", "SAVE": "1", "OMP_NUM_THREADS": "1",
            # float32: bfloat16 autocast is emulated (many times slower) on a CPU without it
            "EXTRA": '--set mixed_precision="no" --set eval_size=2', **env}
    return subprocess.run(["bash", "scripts/gpu_stage.sh"], cwd=ROOT, env=full, capture_output=True, text=True, timeout=400)


def _changed(path: Path) -> bool:
    """Whether the float16 weights at path differ from the bundled model's (training moved them)."""
    new, old = load_file(path), load_file(BUNDLED / "model.safetensors")
    assert new.keys() == old.keys()
    return any(not torch.equal(new[k], old[k]) for k in new)


def test_one_run_brings_back_a_trained_float16_model_that_loads(tmp_path):
    done = _run(tmp_path, WORKERS="1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] >= 1
    assert (out / "log.jsonl").read_text().strip()
    model_dir = out / "model"
    assert _changed(model_dir / "model.safetensors")
    # what comes back has no tokenizer files: the bundled model's are added, as INIT=... does
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BUNDLED / name, model_dir / name)
    from segllm.default import load_model

    model = load_model(model_dir)
    assert model.config.memory.enabled


def test_pair_brings_back_the_memory_model_and_its_text_only_twin(tmp_path):
    done = _run(tmp_path, PAIR="1", WORKERS="2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    for side in ("memory", "twin"):
        assert _changed(out / side / "model.safetensors"), side
    listing = subprocess.run(["tar", "-tzf", str(out / "rest.tgz")], capture_output=True, text=True, check=True).stdout
    assert "memory_log.jsonl" in listing and "twin_log.jsonl" in listing
    assert "twin_trainer_state.json" in listing
