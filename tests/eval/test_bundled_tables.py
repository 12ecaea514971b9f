"""scripts/bundled_tables.py: the README's tables of the bundled model are the committed
evaluation files' numbers, and the script computes them as scripts/memory_lead_ci.py does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import load_script, write_eval_log

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _first_numbers(cells: list[str]) -> list[str]:
    """Each cell's first number (a target mark, bold or a bracketed older figure after it is ignored)."""
    return [m.group(0) if (m := NUMBER.search(c)) else c for c in cells]


def test_readme_rows_hold_the_printed_numbers(capsys, monkeypatch):
    script = load_script("bundled_tables")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["bundled_tables.py"])
    script.main()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## The bundled default model"):text.index("\n### How it was trained")]
    readme: dict[str, list[str]] = {}
    for line in section.splitlines():  # the first row of each label: the two tables come first
        if line.startswith("| "):
            readme.setdefault(_cells(line)[0], _cells(line))
    rows = [_cells(line) for line in printed if _cells(line)[1] not in ("with memory, oracle", "memory")]
    assert len(rows) == 9 + 9  # rounds 1-8 and all; nine memory-against-twin rows
    for row in rows:
        assert row[0] in readme, f"README has no row {row[0]!r}"
        assert _first_numbers(readme[row[0]][1:]) == _first_numbers(row[1:]), row[0]


def test_slices_sum_intersections_over_unions(tmp_path):
    script = load_script("bundled_tables")
    # (round, intersection, union, IoU, box hit, grounded, family, text-resolvable)
    log = write_eval_log(tmp_path / "m.own.rank0.jsonl", [
        [(1, 10, 20, 0.5, True, True, "attribute", True), (4, 30, 30, 1.0, True, True, "attribute", False)],
        [(4, 0, 50, 0.0, False, False, "ordinal", True), (5, 20, 20, 1.0, True, True, "attribute", False)],
    ])
    assert script.ciou(log, script.SLICES["all rounds"]) == pytest.approx((100 * 60 / 120, 4))
    assert script.ciou(log, script.SLICES["all rounds >= 4"]) == pytest.approx((100 * 50 / 100, 3))
    assert script.ciou(log, script.SLICES["rounds >= 4 that only memory can answer"]) == pytest.approx((100.0, 2))
    assert script.ciou(log, script.SLICES["rounds >= 4 that the text can resolve"]) == pytest.approx((0.0, 1))
    with pytest.raises(SystemExit, match="no rounds"):
        script.ciou(log, lambda rd, res: rd == 9)


def test_targets_are_marked_met_or_missed(tmp_path):
    script = load_script("bundled_tables")

    def summary(path, values, n):
        results = [{"protocol": p, "per_round": {k: {"cIoU": v, "n": n[k]} for k, v in values.items()}}
                   for p in ("own", "oracle", "baseline-union")]
        path.write_text(json.dumps({"results": results}))

    n = {"1": 100, "2": 100, "3": 20, "all": 220}
    summary(tmp_path / "m.json", {"1": 91.0, "2": 79.9, "3": 85.0, "all": 84.0}, n)
    summary(tmp_path / "t.json", {"1": 50.0, "2": 40.0, "3": 30.0, "all": 40.0}, n)
    lines = script.round_table(tmp_path / "m.json", tmp_path / "t.json").splitlines()
    assert "| 91.0 (>= 90: met) |" in lines[2]
    assert "| 79.9 (>= 80: missed) |" in lines[3]
    assert "| 85.0 (>= 80: met, on 20 rounds) |" in lines[4]
    assert lines[5].startswith("| all | 84.0 | 84.0 | 40.0 | 40.0 | 84.0 | 220 |")
