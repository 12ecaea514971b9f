"""Training survives kill -9 at random moments: ``scripts/fault_test.py`` in small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import fault_test  # noqa: E402


def test_log_reading_skips_a_line_cut_by_the_kill(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert fault_test.logged_steps(log, 0) == [1, 2]
    assert fault_test.logged_steps(log, len('{"step": 1}\n')) == [2]


def test_where_a_kill_landed_is_read_from_the_folder(tmp_path):
    def ckpt(name: str, step: int | None) -> None:
        (tmp_path / name).mkdir()
        if step is not None:
            (tmp_path / name / "trainer_state.json").write_text(json.dumps({"step": step}))

    assert fault_test.landed(tmp_path) == "before the first save"
    ckpt(".checkpoint-old", 4)
    assert fault_test.landed(tmp_path) == "between the renames (no checkpoint-last)"
    assert fault_test.newest_saved(tmp_path) == 4
    ckpt("checkpoint-last", 6)
    assert fault_test.landed(tmp_path) == "after the renames (old checkpoint not yet deleted)"
    assert fault_test.newest_saved(tmp_path) == 6
    os.rename(tmp_path / ".checkpoint-old", tmp_path / ".ckpt.8")
    assert fault_test.landed(tmp_path) == "writing the new checkpoint (temp folder)"


@pytest.mark.slow
@pytest.mark.hang_s(1800)  # three training starts: ~10 s each on an idle machine, minutes on a loaded one
def test_three_kills_three_resumes(tmp_path):
    """Three SIGKILLs of a tiny run (about two of them inside a checkpoint write), each followed
    by --resume: every resume succeeds and loses at most one save interval."""
    out = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_test.py"), "--kills", "3", "--seed", "3",
                          "--save-share", "0.67", "--json", str(out)], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(out.read_text())
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary["kills"] == summary["successful_resumes"] == 3
    assert summary["max_steps_lost"] <= summary["save_every"]
