"""scripts/compare_cycle.sh, the comparison that decides whether a CPU cycle becomes the bundled
model (issue 13), end to end at a toy size: the bundled model against its own logs must come out
exactly level, and a missing baseline must be named. Slow (three evaluations, ~25 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "segllm" / "assets" / "default_model"

pytestmark = pytest.mark.slow


def test_the_bundled_model_against_its_own_logs_is_level_and_a_missing_log_is_named(tmp_path):
    # the bundled model's own logs of the test split only: the heldout split has no baseline
    subprocess.run([sys.executable, "-m", "segllm.cli", "eval", "--split", "test", "--size", "3", "--protocol",
                    "own", "oracle", "--threads", "1", "--out", str(tmp_path), "--name", "base_test3"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "MODEL": str(BUNDLED), "OUT": str(tmp_path / "cmp"), "SIZE": "3",
           "BASE": str(tmp_path / "base"), "THREADS": "1", "PY": sys.executable}
    done = subprocess.run(["bash", "scripts/compare_cycle.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    leads = re.findall(r"lead ([+-]\d+\.\d)", done.stdout)  # all rounds, own and oracle; round 1, own
    assert len(leads) == 3 and all(float(x) == 0.0 for x in leads), done.stdout
    assert "round 1: lead" in done.stdout, done.stdout
    assert done.stdout.count("no bundled log at") == 2 and "base_heldout3.own.rank0.jsonl" in done.stdout
    assert (tmp_path / "cmp" / "comparison.txt").read_text() == done.stdout
    assert re.search(r"^shapes( r\d:(\d\.\d\d|refused))+$", done.stdout, re.M), done.stdout  # the examples, round by round
    assert (tmp_path / "cmp" / "examples.png").stat().st_size > 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
