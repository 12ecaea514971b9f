"""Shared fixtures: a tokenizer trained on the spot, tiny models, small conversations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segllm.conversation import Conversation, Round
from segllm.model.builder import build_segllm
from segllm.presets import tiny_config
from segllm.tokenizer import train_bpe_tokenizer

CORPUS = [
    "Segment the red circle.", "Segment the square left of instance 1.", "Can you segment the blue star?",
    "It is <seg>.", "Sure, <seg>.", "<seg> and <seg>", "the one near instance 2", "Where is the table?",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(CORPUS * 20, vocab_size=320)


@pytest.fixture
def make_model(tokenizer):
    """Factory: a tiny model (fresh tokenizer copy so added tokens never leak between tests)."""
    import copy

    def make(seed: int = 0, **kwargs):
        cfg = tiny_config(len(tokenizer), **kwargs)
        torch.manual_seed(seed)
        return build_segllm(cfg, copy.deepcopy(tokenizer))

    return make


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)


@pytest.fixture
def three_rounds(image):
    """Round 3 refers to round 1; round 2 to round 1."""
    h, w = image.shape[:2]
    return Conversation(
        image,
        [
            Round("Segment the red circle.", (), "<seg>", [box_mask(h, w, 5, 20, 10, 30)]),
            Round("Segment the square left of instance 1.", (1,), "It is <seg>.", [box_mask(h, w, 25, 40, 40, 70)]),
            Round("Segment the one near instance 1.", (1,), "Sure, <seg>.", [box_mask(h, w, 0, 10, 0, 10)]),
        ],
    )
