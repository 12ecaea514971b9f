"""The adversarial suite's doors and expected outcomes: the Python API, the ``segllm`` CLI run
in-process, and the web demo's handlers called directly (never through a browser)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from segllm.errors import SegLLMError


@dataclass(frozen=True)
class Expect:
    """A case's expected outcome: handled (``error`` None), or one :class:`SegLLMError` whose
    message matches ``error`` (a regex naming the problem)."""

    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


OK = Expect()


def fails(pattern: str) -> Expect:
    return Expect(pattern)


# -- the doors ---------------------------------------------------------------------------------
def check_api(expect: Expect, fn: Callable[[], object], *, names: str | None = None) -> object:
    """Run ``fn``; the expected outcome or exactly one SegLLMError matching ``expect.error`` (and
    naming ``names``, e.g. the file). Any other exception fails the test with its traceback."""
    if expect.ok:
        return fn()
    with pytest.raises(SegLLMError) as err:
        fn()
    msg = str(err.value)
    assert re.search(expect.error, msg), f"message {msg!r} does not match {expect.error!r}"
    if names is not None:
        assert names in msg, f"message {msg!r} does not name {names!r}"
    return err.value


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def run_cli(capsys, args: list[str]) -> CliResult:
    """``segllm ARGS`` in-process: its exit status and what it printed."""
    from segllm.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return CliResult(rc, cap.out, cap.err)


def check_cli(expect: Expect, res: CliResult, *, names: str | None = None, ok_rc: int = 0) -> None:
    """A handled case exits ``ok_rc``; a refused one exits 2 with one ``error:`` line that matches
    ``expect.error``. Never a traceback."""
    both = res.out + res.err
    assert "Traceback" not in both, both
    if expect.ok:
        assert res.rc == ok_rc, f"exit {res.rc}: {res.err}"
        return
    lines = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert res.rc == 2 and len(lines) == 1, f"exit {res.rc}, stderr {res.err!r}"
    assert re.search(expect.error, lines[0]), f"{lines[0]!r} does not match {expect.error!r}"
    if names is not None:
        assert names in lines[0], f"{lines[0]!r} does not name {names!r}"


def demo_request() -> SimpleNamespace:
    """What the handlers read of Gradio's request: a fresh browser session's id."""
    return SimpleNamespace(session_hash=uuid.uuid4().hex)


def no_progress(*args, **kwargs) -> None:
    """Stands in for Gradio's progress bar."""


def check_demo(expect: Expect, fn: Callable[[], object], *, names: str | None = None) -> object:
    """A handled case returns; a refused one raises one ``gr.Error`` whose message matches
    ``expect.error``: a message naming the problem, not the catch-all "internal error"."""
    import gradio as gr

    if expect.ok:
        return fn()
    with pytest.raises(gr.Error) as err:
        fn()
    msg = str(err.value.message)
    assert not msg.startswith("internal error"), msg
    assert re.search(expect.error, msg), f"message {msg!r} does not match {expect.error!r}"
    if names is not None:
        assert names in msg, f"message {msg!r} does not name {names!r}"
    return err.value
