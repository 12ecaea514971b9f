"""A training mix of several conversation sources, sampled the released recipes' way: each
global batch (the conversations of one optimizer step over all processes) comes from one source
drawn uniformly, and its conversations are drawn from that source with replacement.

Deterministic by (seed, step, slot), so every process agrees on the source of a step and a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segllm.conversation import Conversation
from segllm.data.records import Skipped


class MixedConversations:
    """Conversation sources mixed per global batch.

    Args:
        sources: datasets with ``len`` and ``get(i) -> Conversation | None`` (and ``skipped``).
        global_batch: conversations per optimizer step over all processes; global sample
            index ``i`` belongs to step ``i // global_batch``.
        seed: the draw's seed.
    """

    def __init__(self, sources: Sequence, *, global_batch: int, seed: int = 0) -> None:
        if not sources:
            raise ValueError("a mix needs at least one source")
        empty = [i for i, s in enumerate(sources) if len(s) == 0]
        if empty:
            raise ValueError(f"mix source(s) {empty} hold no conversations")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.sources = list(sources)
        self.global_batch = global_batch
        self.seed = seed
        self.skipped = Skipped()

    def __len__(self) -> int:
        # sampling is with replacement: indices never run out (the trainer takes i % len)
        return 2**62

    @property
    def epoch_size(self) -> int:
        """Conversations in one pass over the mix: those of all sources together."""
        return sum(len(s) for s in self.sources)

    def source_of(self, index: int) -> int:
        """Which source global sample ``index`` is drawn from (the same for a whole step)."""
        step = index // self.global_batch
        return int(np.random.default_rng([self.seed, step]).integers(len(self.sources)))

    def where(self, index: int) -> str:
        s = self.source_of(index)
        return f"mix source {s}, draw {index}"

    def get(self, index: int) -> Conversation | None:
        s = self.source_of(index)
        source = self.sources[s]
        j = int(np.random.default_rng([self.seed, index // self.global_batch, index % self.global_batch + 1]).integers(len(source)))
        conv = source.get(j)
        if conv is None and len(source.skipped):
            self.skipped.items.append(source.skipped.items[-1])  # the source has logged it
        return conv


class ConcatConversations:
    """Several conversation sources read one after another as one dataset (an evaluation over
    every file a conversation config lists): index ``i`` runs through the first source, then the
    next. ``where(i)`` is the source's own (it names the file)."""

    def __init__(self, sources: Sequence) -> None:
        if not sources:
            raise ValueError("nothing to concatenate")
        self.sources = list(sources)
        self.starts = np.cumsum([0] + [len(s) for s in self.sources]).tolist()
        self.skipped = Skipped()

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, index: int) -> tuple[object, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"conversation {index} out of range ({len(self)} in all)")
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[s], index - self.starts[s]

    def where(self, index: int) -> str:
        source, j = self._locate(index)
        return source.where(j)

    def __getitem__(self, index: int) -> Conversation:
        source, j = self._locate(index)
        return source[j]

    def get(self, index: int) -> Conversation | None:
        source, j = self._locate(index)
        conv = source.get(j)
        if conv is None and len(source.skipped):
            self.skipped.items.append(source.skipped.items[-1])  # the source has logged it
        return conv
