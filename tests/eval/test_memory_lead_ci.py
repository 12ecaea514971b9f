"""scripts/memory_lead_ci.py, the paired bootstrap that judges the memory lead and every cycle
against the bundled model (issue 13): its slices and its verdicts on logs of known values."""

from __future__ import annotations

import re

import pytest

from tests.helpers import load_script, write_eval_log


def _log(path, conversations):
    return str(write_eval_log(path, conversations))


def _conversations(hit: int, n: int = 40):
    """n conversations of rounds 1 and 4 (round 4 not text-resolvable) whose round-1 masks hit
    ``hit`` of 10 pixels and whose round-4 masks are perfect."""
    return [[[1, hit, 10, hit / 10, True, True, "attribute", True], [4, 10, 10, 1.0, True, True, "pick", False]]
            for _ in range(n)]


def _run(script, monkeypatch, capsys, *argv):
    monkeypatch.setattr("sys.argv", ["memory_lead_ci.py", *argv])
    script.main()
    return capsys.readouterr().out


def test_rounds_are_sliced_and_a_known_difference_is_beyond_the_noise(tmp_path, monkeypatch, capsys):
    script = load_script("memory_lead_ci")
    better, worse = _log(tmp_path / "a.jsonl", _conversations(9)), _log(tmp_path / "b.jsonl", _conversations(5))
    assert script.read(better, 1)[0].tolist() == [[19, 20], [10, 10]]
    assert script.read(better, 1, 1)[0].tolist() == [[9, 10], [0, 0]]
    assert script.read(better, 4)[0].tolist() == [[10, 10], [10, 10]]

    out = _run(script, monkeypatch, capsys, better, worse, "--min-round", "1", "--max-round", "1", "--resamples", "200")
    lead = re.search(r"round 1: lead \+(\d+\.\d) .*interval \[\+(\d+\.\d), \+(\d+\.\d)\].*below 0: (\d\.\d\d)", out)
    assert lead and float(lead[1]) == pytest.approx(40.0) and float(lead[2]) == pytest.approx(40.0)
    assert float(lead[4]) == 0.0
    assert "round 1 only memory can answer: no rounds" in out  # round 1 here is all text-resolvable

    out = _run(script, monkeypatch, capsys, better, worse, "--resamples", "200")  # rounds >= 4: identical
    assert "all rounds >= 4: lead +0.0" in out and "rounds >= 4 only memory can answer: lead +0.0" in out


def test_different_conversations_are_refused(tmp_path, monkeypatch, capsys):
    script = load_script("memory_lead_ci")
    a, b = _log(tmp_path / "a.jsonl", _conversations(9, 4)), _log(tmp_path / "b.jsonl", _conversations(9, 3))
    with pytest.raises(SystemExit, match="different conversations"):
        _run(script, monkeypatch, capsys, a, b)
