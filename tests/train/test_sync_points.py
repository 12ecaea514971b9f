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


class _StackedReads(TorchFunctionMode):
    """Every read of a value (as _CountReads), with the files of its whole stack."""

    def __init__(self) -> None:
        super().__init__()
        self.stacks: list[tuple[str, list[str]]] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if self.paused:
            pass
        elif name in _READS or (name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask(args[1])):
            self.stacks.append((name, [f"{f.filename}:{f.name}" for f in traceback.extract_stack(limit=40)[:-1]]))
        return func(*args, **(kwargs or {}))


def test_a_whole_training_step_on_an_accelerator_reads_nothing_back(tmp_path, monkeypatch):
    """The trainer's step (batch building aside) as it runs on a GPU: the input checks queue
    assertions instead of reading (segllm/checks.py; the host branch is switched off here, as
    every tensor would be on the device), the loss terms come back one step late without a wait
    (trainer._PendingTerms), the time budget is read from the host's clock, and the LLM gets its
    causal mask ready-made (segllm.model.llm.causal_mask), so transformers does not ask whether
    the batch has padding. What remains reads host tensors: the optimizer's step counters, the
    own-mask references' choice of rows and the memory crops' sides (host fields)."""
    import segllm.checks
    import segllm.decoders.base
    import segllm.processor
    from segllm.train import trainer as T
    from segllm.train.recipe import TrainRecipe

    for module in (segllm.checks, segllm.decoders.base, segllm.processor):
        monkeypatch.setattr(module, "on_host", lambda t: False)
    monkeypatch.setattr(torch, "_assert_async", lambda ok, message: None)
    counter = _StackedReads()
    step, init = T._Run.train_step, T._Run.__init__

    def counted_step(self):
        with counter:
            return step(self)

    def unobserved_batches(self, *args, **kwargs):  # batches are built on the host (data-loader workers)
        init(self, *args, **kwargs)
        batches = self.batches

        def building():
            while True:
                counter.paused = True
                try:
                    item = next(batches)
                finally:
                    counter.paused = False
                yield item
        self.batches = building()

    monkeypatch.setattr(T._Run, "train_step", counted_step)
    monkeypatch.setattr(T._Run, "__init__", unobserved_batches)
    recipe = TrainRecipe.load("configs/direct_refine.toml", {
        "output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4, "log_every": 100, "save_every": 0, "eval_every": 0,
        "time_limit_s": 1000, "mixed_precision": "no", "workers": 0,
        "model": {"init": "segllm/assets/default_model", "loss": {"own_ref_prob": 0.5}}})
    T.train(recipe, progress=False)
    host_side = ("own_ref_masks", "preprocess_crops")
    left = [(name, stack[-1]) for name, stack in counter.stacks
            if not any("/torch/optim/" in f for f in stack) and not any(stack[-1].endswith(h) for h in host_side)]
    assert not left, left


def test_batches_are_pinned_for_the_device_once_per_tensor_and_keep_their_host_fields(monkeypatch):
    """On a CUDA machine the data loader pins each batch (Batch.pin_memory) so that its copy to
    the GPU need not wait; page-locked memory needs CUDA, so a copy stands for it here."""
    model = load_model()
    data = WorldConversations("train", 2, seed=0, max_rounds=4)
    batch = model.prepare([data[i] for i in range(2)])
    pinned = []

    def pin(self):
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    out = batch.pin_memory()
    assert out.ref_pick is batch.ref_pick and out.memory_sides is batch.memory_sides  # host fields: as they are
    assert torch.equal(out.seg_targets, batch.seg_targets) and out.seg_targets is not batch.seg_targets
    assert len({id(t) for t in pinned}) == len(pinned)  # each tensor once, also one two fields share
    if batch.dense_decoder is not None and batch.dense_decoder is batch.dense_vision:
        assert out.dense_decoder is out.dense_vision
