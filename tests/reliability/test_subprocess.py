"""A few cases through the real ``segllm`` command in a subprocess: what a user's terminal shows
is one ``error:`` line naming the problem, never a Python traceback (the in-process doors of the
other modules cannot see what the interpreter itself would print)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability import inputs as mk

ROOT = Path(__file__).resolve().parents[2]


def _segllm(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "segllm.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _bomb(tmp: Path, ckpt: Path) -> tuple[list, str]:
    return ["chat", mk.png_declaring(60000, 60000, "bomb.png")(tmp), "--checkpoint", ckpt, "--ask", "x"], "bomb.png"


def _corrupt_checkpoint(tmp: Path, ckpt: Path) -> tuple[list, str]:
    import shutil

    folder = tmp / "ckpt"
    shutil.copytree(ckpt, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    return ["chat", "--checkpoint", folder, "--ask", "x"], "cannot read weights"


def _bad_recipe(tmp: Path, ckpt: Path) -> tuple[list, str]:
    (tmp / "r.toml").write_text("steps = 10\nlog_every = 0\n")
    return ["train", tmp / "r.toml"], "log_every must be >= 1"


def _missing_script(tmp: Path, ckpt: Path) -> tuple[list, str]:
    return ["chat", mk.rgb(tmp, "img.png"), "--checkpoint", ckpt, "--script", tmp / "none.txt"], "cannot read the script"


@pytest.mark.slow
@pytest.mark.parametrize("make", [_bomb, _corrupt_checkpoint, _bad_recipe, _missing_script])
def test_the_terminal_shows_one_error_line(make, tmp_path, tiny_checkpoint):
    args, names = make(tmp_path, tiny_checkpoint)
    res = _segllm(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], res.stderr


CASE_COUNT = 4
DOOR_COUNT = 4
