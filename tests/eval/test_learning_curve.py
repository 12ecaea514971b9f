"""scripts/learning_curve.py: evaluation JSONs read into points, a line in log10(conversations)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

SCRIPT = Path(__file__).parents[2] / "scripts" / "learning_curve.py"
learning_curve = load_script("learning_curve")


def test_a_line_in_log_conversations_is_recovered_with_where_it_reaches_a_target():
    n = [1e5, 1e6, 1e7]
    out = learning_curve.fit(n, [50.0, 60.0, 70.0], (80.0,))
    assert out["per_tenfold"] == pytest.approx(10.0, rel=1e-9)
    assert out["se"] == pytest.approx(0.0, abs=1e-6)
    assert out["conversations_for"]["80.0"] == pytest.approx(1e8, rel=1e-6)


def test_a_falling_curve_never_reaches_a_target():
    out = learning_curve.fit([1e5, 1e6], [60.0, 55.0], (80.0,))
    assert out["conversations_for"]["80.0"] == math.inf
    assert math.isnan(out["se"])  # two points: no residual left to estimate an error from


def _result(path: Path, own: float, oracle: float, r1: float) -> None:
    results = [{"protocol": "own", "per_round": {"1": {"cIoU": r1}, "all": {"cIoU": own}}},
               {"protocol": "oracle", "per_round": {"1": {"cIoU": 0.0}, "all": {"cIoU": oracle}}}]
    path.write_text(json.dumps({"meta": {}, "results": results}))


def test_the_command_reads_each_split_of_each_point(tmp_path):
    for name, own in (("a", 60.0), ("b", 70.0)):
        for split, shift in (("test", 0.0), ("heldout", -5.0)):
            _result(tmp_path / f"{name}_{split}.json", own + shift, own + 4 + shift, own + 10 + shift)
    out = tmp_path / "curve.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--point", "b", "100000", str(tmp_path / "b_{split}.json"),
                           "--point", "a", "10000", str(tmp_path / "a_{split}.json"), "--json", str(out)],
                          capture_output=True, text=True, check=True)
    curve = json.loads(out.read_text())
    assert list(curve["points"]) == ["a", "b"]  # sorted by conversations
    assert curve["points"]["a"]["heldout oracle"] == 59.0 and curve["points"]["b"]["test own r1"] == 80.0
    assert curve["fits"]["test own"]["per_tenfold"] == pytest.approx(10.0)
    assert "| b | 100,000 | 70.0 | 80.0 | 74.0 | 65.0 | 75.0 | 69.0 |" in done.stdout
