"""The suite's size as its package docstring states it: at least 40 cases, and the stated
numbers of cases and of case x door runs are the tables' own (so the docstring cannot go stale)."""

from __future__ import annotations

import re

import tests.reliability as suite
from tests.reliability import test_checkpoints, test_images, test_records, test_subprocess

MODULES = [test_images, test_records, test_checkpoints, test_subprocess]


def test_the_docstring_counts_are_the_tables():
    cases = sum(m.CASE_COUNT for m in MODULES)
    doors = sum(m.DOOR_COUNT for m in MODULES)
    stated = re.search(r"(\d+) cases, (\d+) case x door runs", suite.__doc__)
    assert stated, suite.__doc__
    assert (int(stated[1]), int(stated[2])) == (cases, doors)
    assert cases >= 40
