"""``segllm bench`` (segllm/bench.py): the latency bench runs its whole conversation."""

import pytest

from segllm.bench import QUESTIONS, _run


@pytest.mark.parametrize("name", ["bundled", "large-llm"])
def test_every_round_of_the_conversation_is_timed(name):
    # the large configuration has a random LLM: its rounds must still be answerable when later
    # questions refer to earlier masks (QUESTIONS 2-8 all do)
    rounds = len(QUESTIONS)
    got = _run((name, True, rounds, 1, 0, 64, 1, "cpu", "float32"))
    assert got["model"] == name and got["mode"] == "incremental"
    assert len(got["round_ms"]) == rounds and all(ms > 0 for ms in got["round_ms"])
