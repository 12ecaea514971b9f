"""How often a training step reads a value back from the device. On a GPU every such read (a
tensor's truth value, ``int(t)``, ``.item()``, indexing by a boolean mask) waits for all queued
work, so the Python side cannot run ahead: the stage-6 runs on an H200 kept the GPU about half
busy. Counted here on the CPU with a torch function mode, on the bundled model's shape."""

from __future__ import annotations

import collections
import dataclasses
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
        self.functions: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _READS or (name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask(args[1])):
            frames = [f for f in traceback.extract_stack(limit=8)[:-1] if "/segllm/" in f.filename and "/tests/" not in f.filename]
            self.where[f"{name} at {frames[-1].filename.rsplit('/segllm/', 1)[-1]}:{frames[-1].lineno}" if frames else name] += 1
            self.functions[frames[-1].name if frames else "?"] += 1
        return func(*args, **(kwargs or {}))


def _count(own_ref_prob: float) -> _CountReads:
    model = load_model().train()
    # the bundled model was trained with own_ref_prob = 0.5 (stage 7); both settings are counted
    model.config.loss = dataclasses.replace(model.config.loss, own_ref_prob=own_ref_prob)
    data = WorldConversations("train", 4, seed=0, config=WorldConfig(multi_target_prob=0.15), max_rounds=8)
    batch = model.prepare([data[i] for i in range(4)])
    counter = _CountReads()
    with counter:
        out = training_loss(model, batch)
    assert torch.isfinite(out.loss)
    return counter


def test_a_training_step_reads_back_from_the_device_a_bounded_number_of_times():
    counter = _count(0.0)
    # what remains are input checks (placeholders, decoder indices); the dense loss (3 terms x 5
    # label groups), the box slots and the LM / reference losses' selections read nothing
    assert sum(counter.where.values()) <= 8, counter.where.most_common()
    assert not any(f in w for w in counter.where for f in ("dense_head.py", "objective.py")), counter.where.most_common()


def test_own_mask_references_add_only_their_decoding_and_a_host_side_choice():
    base, own = _count(0.0), _count(1.0)
    extra = own.functions - base.functions
    # the second (gradient-free) decoding's index check, and the choice of rows in own_ref_masks,
    # made from host tensors (Batch.ref_pick stays there: below), nothing else
    assert set(extra) <= {"check_decoder_inputs", "own_ref_masks"}, extra
    assert sum(extra.values()) <= 4, own.where.most_common()
    assert not any("dense_head.py" in w for w in own.where), own.where.most_common()


def test_the_host_side_fields_stay_on_the_host():
    model = load_model()
    data = WorldConversations("train", 2, seed=0, max_rounds=4)
    batch = model.prepare([data[i] for i in range(2)])
    moved = batch.to("meta")  # stands for an accelerator: every other tensor goes there
    assert moved.ref_pick.device.type == "cpu" and torch.equal(moved.ref_pick, batch.ref_pick)
    assert moved.seg_targets.device.type == "meta" and moved.labels.device.type == "meta"
