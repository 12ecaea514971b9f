"""Shared fixtures: a tokenizer trained on the spot, tiny models, small conversations, the
miniature released data layout, a miniature LLaVA-1.5; and where the released fixtures live."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from segllm.conversation import Conversation, Round
from segllm.model.builder import build_segllm
from segllm.presets import tiny_config
from segllm.tokenizer import train_bpe_tokenizer
from tests.helpers import LLAVA_LLAMA, box_mask, wake_ref_prior, with_ref_prior
from tests.released_layout import build_released_layout

# Set SEGLLM_TEST_NORMAL_EXIT=1 to let pytest's process end the usual way (see pytest_unconfigure).
_NORMAL_EXIT = os.environ.get("SEGLLM_TEST_NORMAL_EXIT") == "1"
_exit_status: list[int] = []

# pytest-xdist runs the suite in one worker process per core (pyproject's addopts): one torch
# thread each, so that the workers do not oversubscribe the cores. On session 41's 2-core machine
# two workers of two threads each took the README's command from 272 s (one process) to 227 s,
# of one thread each to 167 s.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    _exit_status[:] = [int(exitstatus)]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's exit status once pytest is done, skipping the interpreter's
    teardown. Once in seven full runs of the suite (sessions 30-31, on a 2-core AVX2 machine),
    after every test had passed and pytest had printed its summary, the process aborted in that
    teardown ("terminate called without an active exception", exit 134), which fails CI. At the
    end of a run no thread is left but idle daemon ones (tqdm's monitor,
    huggingface_hub's telemetry, two multiprocessing queue feeders), so it is most likely
    torch's own C++ static destructors running in an unsafe order at exit, a known class of
    failure. pytest has written every report by now; what is skipped is only that teardown."""
    if _NORMAL_EXIT or not _exit_status:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[0])


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
    def make(seed: int = 0, **kwargs):
        cfg = tiny_config(len(tokenizer), **kwargs)
        torch.manual_seed(seed)
        return build_segllm(cfg, copy.deepcopy(tokenizer))

    return make


def _confident(module, args, out):
    # random weights give logits near 0: spread them and shift them up so every mask is
    # non-empty (later rounds must be able to refer to it)
    out.mask_logits = out.mask_logits * 1000 + 0.5
    return out


@pytest.fixture
def confident_model(make_model):
    """A tiny model in float64 whose every mask is non-empty: for comparing two inference paths
    (float64, so their rounding differences, ~1e-15, cannot flip a thresholded pixel) over rounds
    that refer to earlier masks."""
    m = make_model(seed=4).to(torch.float64).eval()
    m.decoder.register_forward_hook(_confident)
    return m


@pytest.fixture
def ref_prior_confident_model(make_model, tokenizer):
    """As ``confident_model``, with a direct decoder that also reads the mask each round refers
    to (its ref_prior layers set non-zero, so that the referenced mask matters)."""
    cfg = with_ref_prior(copy.deepcopy(make_model().config))
    torch.manual_seed(4)
    m = wake_ref_prior(build_segllm(cfg, copy.deepcopy(tokenizer))).to(torch.float64).eval()
    m.decoder.register_forward_hook(_confident)
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


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory) -> dict[str, Path]:
    """The miniature released data layout (see tests/released_layout.py): root, images, ann, convs."""
    return build_released_layout(tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def llava_parts(tmp_path_factory, tokenizer):
    """A tiny LLaMA (with the test tokenizer), its projector weights and a tiny CLIP vision folder:
    (root folder, tokenizer, LLaMA state dict, projector state dict)."""
    root = tmp_path_factory.mktemp("llava")
    tok = copy.deepcopy(tokenizer)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **LLAVA_LLAMA))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            image_size=224, patch_size=32))
    clip.save_pretrained(root / "clip")
    projector = {"0.weight": torch.randn(64, 32), "0.bias": torch.randn(64), "2.weight": torch.randn(64, 64), "2.bias": torch.randn(64)}
    return root, tok, llm.state_dict(), projector
