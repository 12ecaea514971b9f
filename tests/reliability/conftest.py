"""Fixtures of the adversarial suite: a tiny checkpoint and its model, the three doors (Python
API, ``segllm`` CLI in-process, the web demo's handlers) and the bounds every case runs under
(no hang, bounded memory)."""

from __future__ import annotations

import copy
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from segllm.model.builder import build_segllm
from segllm.model.loading import load_pretrained
from segllm.presets import tiny_config

HANG_S = 300  # a case still running after this is a hang (generous: CI machines may be loaded)
MEMORY_MB = 300  # peak resident memory may grow by at most this during one case (a 60000 px bomb is ~10 GB)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "hang_s(seconds): this test's own hang timeout (default HANG_S)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item) -> Iterator[None]:
    """Every case's test body (fixtures set up once are not counted): no hang (SIGALRM after
    HANG_S seconds, or the test's ``hang_s`` mark) and peak resident memory growing by less than
    MEMORY_MB."""
    mark = item.get_closest_marker("hang_s")
    limit = int(mark.args[0]) if mark else HANG_S

    def hang(signum, frame):
        raise TimeoutError(f"the case ran over {limit} s: a hang")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(limit)
    t0 = time.monotonic()
    try:
        result = yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < MEMORY_MB, f"peak resident memory grew by {grown:.0f} MB (bound {MEMORY_MB} MB) in {time.monotonic() - t0:.1f} s"
    return result


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny model saved as a checkpoint folder (config.json, model.safetensors, tokenizer)."""
    import torch

    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    torch.manual_seed(0)
    model = build_segllm(tiny_config(len(tokenizer)), copy.deepcopy(tokenizer))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_pretrained(tiny_checkpoint)


@pytest.fixture
def cached_loading(monkeypatch, tiny_checkpoint, tiny_model) -> str:
    """``segllm chat --checkpoint <tiny>`` without re-reading the checkpoint each case (the image
    doors test the image, the checkpoint doors test loading); returns the checkpoint path."""
    import segllm.session

    real = segllm.session.load_model

    def load(path=None, **kwargs):
        if path is not None and Path(path) == tiny_checkpoint:
            return tiny_model
        return real(path, **kwargs)

    monkeypatch.setattr(segllm.session, "load_model", load)
    return str(tiny_checkpoint)


@pytest.fixture(scope="session")
def demo(tiny_model):
    """The web demo on the tiny model (never launched: its handlers are called directly)."""
    pytest.importorskip("gradio")
    from segllm.demo import build_demo

    app = build_demo(tiny_model, max_new_tokens=2)
    handlers = {f.fn.__name__: f.fn for f in app.fns.values() if getattr(f, "fn", None) is not None}
    from types import SimpleNamespace

    yield SimpleNamespace(app=app, **handlers)
    try:
        app.close()
    except Exception:  # never launched: only the store needs closing
        app.segllm_store.close()
