"""Input checks that do not stall an accelerator (segllm/checks.py): on the host they raise at
once with the values in the message; elsewhere they queue an assertion and read nothing back.
The accelerator branch is exercised here by making every tensor count as device-resident and
every host read of a value an error."""

import pytest
import torch

import segllm.checks
import segllm.decoders.base
import segllm.processor
from segllm.checks import require
from segllm.decoders.base import check_decoder_inputs
from segllm.errors import PlaceholderMismatchError


def test_require_on_the_host_raises_the_given_error():
    require(torch.tensor(True), "fine")
    with pytest.raises(PlaceholderMismatchError, match="two features"):
        require(torch.tensor(False), "two features", PlaceholderMismatchError)


class _AsIfOnAGpu:
    """Inside ``with``: every tensor counts as device memory, reading a value back raises, and
    torch._assert_async records each queued check and fails as the device would (later; here
    at once)."""

    def __init__(self, monkeypatch):
        self.mp, self.queued = monkeypatch, []

    def __enter__(self):
        originals = {name: getattr(torch.Tensor, name) for name in ("__bool__", "__int__", "__float__", "item", "tolist")}

        def assert_async(ok, message):
            self.queued.append(message)
            if not originals["__bool__"](ok):
                raise RuntimeError(f"device-side assertion: {message}")

        def no_read(name):
            def read(self, *args, **kwargs):
                raise AssertionError(f"a value was read back from the device ({name})")
            return read

        for module in (segllm.checks, segllm.decoders.base, segllm.processor):
            self.mp.setattr(module, "on_host", lambda t: False)
        self.mp.setattr(torch, "_assert_async", assert_async)
        for name in originals:
            self.mp.setattr(torch.Tensor, name, no_read(name))
        return self.queued

    def __exit__(self, *exc):
        self.mp.undo()


def test_decoder_index_check_queues_instead_of_reading(monkeypatch):
    feats, prompts = torch.zeros(2, 8, 4, 4), torch.zeros(3, 2, 8)
    good, bad = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 1])
    with _AsIfOnAGpu(monkeypatch) as queued:
        check_decoder_inputs(feats, prompts, good, width=8, grid=4, tokens=2)
        assert queued == ["batch_index out of range: there are 2 images"]
        with pytest.raises(RuntimeError, match="batch_index out of range"):
            check_decoder_inputs(feats, prompts, bad, width=8, grid=4, tokens=2)


def test_placeholder_checks_queue_instead_of_reading(make_model, monkeypatch):
    proc = make_model().processor
    ph = proc.image_id
    a, b, c = [t for t in range(5, 100) if t not in {proc.image_id, proc.mask_id, proc.box_id}][:3]  # plain tokens
    ids, att = torch.tensor([[a, ph, ph, b, c]]), torch.ones(1, 5, dtype=torch.long)
    rows, cols = torch.tensor([0, 0]), torch.tensor([1, 2])
    stray = ids.clone()
    stray[0, 3] = ph  # a placeholder no feature fills
    off = torch.tensor([1, 3])  # the second feature points at a token that is no placeholder
    twice = torch.tensor([1, 1])
    with _AsIfOnAGpu(monkeypatch) as queued:
        proc.check_placeholders(ids, att, rows, cols, [(ph, 2)])  # well-formed: passes, reading nothing
        assert len(queued) == 3
        with pytest.raises(RuntimeError, match="placeholder tokens in the input are not the 2 feature"):
            proc.check_placeholders(stray, att, rows, cols, [(ph, 2)])
        with pytest.raises(RuntimeError, match="no placeholder token of its kind"):
            proc.check_placeholders(ids, att, rows, off, [(ph, 2)])
        with pytest.raises(RuntimeError, match="two features point at the same"):
            proc.check_placeholders(ids, att, rows, twice, [(ph, 2)])
    # the same inputs on the host: the clear errors, with the counts
    with pytest.raises(PlaceholderMismatchError, match="3 placeholder token"):
        proc.check_placeholders(stray, att, rows, cols, [(ph, 2)])
    with pytest.raises(PlaceholderMismatchError, match="two features point at the same"):
        proc.check_placeholders(ids, att, rows, twice, [(ph, 2)])
