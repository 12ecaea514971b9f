"""A key/value cache that grows in place, for batch segmentation's many small appends.

transformers' :class:`~transformers.DynamicCache` appends a round's keys and values with
``torch.cat``, copying the whole cache of every row on every round: for a batch of 32
conversations that was about 3% of batch segmentation on the bundled model. Here each layer keeps
buffers with spare room along the sequence and writes a round into that room; the keys and values
the attention reads are views of the buffers' filled part (the scaled-dot-product attention takes
them as they are). The buffers double when full, so a conversation of R rounds copies its cache
O(log R) times instead of R times. The values are those of ``DynamicCache``, exactly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

_MIN_ROOM = 64  # tokens of room at the first growth


class GrowingLayer(DynamicLayer):
    """One layer's keys and values [B, H, T, d] as views of buffers [B, H, capacity, d]."""

    def lazy_initialization(self, key_states: Tensor) -> None:
        super().lazy_initialization(key_states)
        self._keys_buf: Tensor | None = None
        self._values_buf: Tensor | None = None

    def _in_buffers(self) -> bool:
        """Whether ``keys``/``values`` are still the filled part of the buffers (another cache
        operation, e.g. a batch selection by index, may have replaced them)."""
        k, kb = self.keys, self._keys_buf
        return (kb is not None and k.shape[:2] == kb.shape[:2] and k.data_ptr() == kb.data_ptr()
                and k.stride() == kb.stride() and self.values.data_ptr() == self._values_buf.data_ptr())

    def update(self, key_states: Tensor, value_states: Tensor, cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        n = key_states.shape[-2]
        filled = self.keys.shape[-2] if self.keys.numel() else 0
        if not (filled and self._in_buffers()) or filled + n > self._keys_buf.shape[-2]:
            capacity = max(2 * (filled + n), _MIN_ROOM)
            B, H, _, d = key_states.shape
            keys = key_states.new_empty(B, H, capacity, d)
            values = value_states.new_empty(B, H, capacity, value_states.shape[-1])
            if filled:
                keys[:, :, :filled] = self.keys
                values[:, :, :filled] = self.values
            self._keys_buf, self._values_buf = keys, values
        self._keys_buf[:, :, filled : filled + n] = key_states
        self._values_buf[:, :, filled : filled + n] = value_states
        self.keys = self._keys_buf[:, :, : filled + n]
        self.values = self._values_buf[:, :, : filled + n]
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor | slice) -> None:
        """Keep the rows ``indices``: the buffers keep their room (a slice of rows is a view)."""
        if self.get_seq_length() > 0 and self._in_buffers():
            filled = self.keys.shape[-2]
            self._keys_buf = self._keys_buf[indices, ...]
            self._values_buf = self._values_buf[indices, ...]
            self.keys = self._keys_buf[:, :, :filled]
            self.values = self._values_buf[:, :, :filled]
        else:
            super().batch_select_indices(indices)


class GrowingCache(Cache):
    """A :class:`~transformers.cache_utils.Cache` of :class:`GrowingLayer` (one per LLM layer,
    made on first use), for any transformers LLM that takes ``past_key_values``."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)
