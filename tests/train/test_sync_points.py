"""How often a training step reads a value back from the device. On a GPU every such read (a
tensor's truth value, ``int(t)``, ``.item()``, indexing by a boolean mask) waits for all queued
work, so the Python side cannot run ahead: the stage-6 runs on an H200 kept the GPU about half
busy. Counted here on the CPU with a torch function mode, on the bundled model's shape."""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

from segllm.data.records import WorldConversations
from segllm.data.world import WorldConfig
from segllm.default import load_model
from segllm.train.objective import training_loss

_READS = {"__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "numpy", "unique", "__index__", "masked_select", "argwhere"}


def _is_mask(a) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == torch.bool
    return isinstance(a, (tuple, list)) and any(_is_mask(x) for x in a)


class _CountReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _READS or (name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask(args[1])):
            frames = [f for f in traceback.extract_stack(limit=8)[:-1] if "/segllm/" in f.filename and "/tests/" not in f.filename]
            self.where[f"{name} at {frames[-1].filename.rsplit('/segllm/', 1)[-1]}:{frames[-1].lineno}" if frames else name] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_back_from_the_device_a_bounded_number_of_times():
    model = load_model().train()
    data = WorldConversations("train", 4, seed=0, config=WorldConfig(multi_target_prob=0.15), max_rounds=8)
    batch = model.prepare([data[i] for i in range(4)])
    counter = _CountReads()
    with counter:
        out = training_loss(model, batch)
    assert torch.isfinite(out.loss)
    # what remains are input checks (placeholders, decoder indices); the dense loss (3 terms x 5
    # label groups), the box slots and the LM / reference losses' selections read nothing
    assert sum(counter.where.values()) <= 8, counter.where.most_common()
    assert not any(f in w for w in counter.where for f in ("dense_head.py", "objective.py")), counter.where.most_common()
