"""Lanes: several batches answered at once in one process, each on its own Python thread, with
the torch threads shared out among them (batch segmentation and evaluation use them).

Why: the bundled model's operations are small (a round's LLM pass over ~20 tokens a row,
convolutions on 32 x 32 maps), and two of them at once on one thread each use two cores better
than one at a time on two threads (README, "Batch segmentation"). Each batch is computed as it
would be alone, so the results do not depend on the lanes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

__all__ = ["default_lanes", "lane_pool"]


def default_lanes(model, lanes: int) -> int:
    """``lanes``, or for 0 the default: 2 on a CPU with 2 or more torch threads for a model
    under a billion parameters and without a compiled decoder, else 1."""
    if lanes < 0:
        raise ValueError(f"lanes must be 0 (automatic) or more, got {lanes}")
    if lanes:
        return lanes
    on_cpu = next(model.parameters()).device.type == "cpu"
    # a compiled HIPIE decoder: its compilation is not made for several threads at once
    compiled = bool(getattr(model.decoder, "compiled", False))
    # a large model's operations already fill the cores, and a second lane would double the
    # activations (a 7B's key/value cache for a batch of 16 conversations is about 2.5 GB)
    small = sum(p.numel() for p in model.parameters()) < _LANES_MAX_PARAMETERS
    return 2 if on_cpu and small and not compiled and torch.get_num_threads() >= 2 else 1


_LANES_MAX_PARAMETERS = 10**9  # default lanes only below this many parameters


@contextmanager
def lane_pool(lanes: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``lanes`` threads, with torch's threads shared out among them
    (``torch.get_num_threads() // lanes`` each, at least 1) while it is open; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // lanes))
    try:
        with ThreadPoolExecutor(lanes, thread_name_prefix="segllm-lane") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
