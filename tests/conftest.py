"""Shared fixtures: a tokenizer trained on the spot, tiny models, small conversations, the
miniature released data layout, a miniature LLaVA-1.5; and where the released fixtures live."""

from __future__ import annotations

import copy
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from segllm.conversation import Conversation, Round
from segllm.model.builder import build_segllm
from segllm.presets import tiny_config
from segllm.tokenizer import train_bpe_tokenizer
from tests.released_layout import build_released_layout

# the released checkpoint's miniature and HIPIE's golden outputs, made from the original code
# (see shared/fixtures/released); tests that need them skip where they are absent
RELEASED_FIXTURES = Path(os.environ.get("SEGLLM_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared/fixtures/released"))

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


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def png_declaring(path: Path, width: int, height: int) -> Path:
    """Write a few-byte PNG whose header (IHDR) declares ``width`` x ``height`` RGB pixels but whose
    data is one short row: what a decompression bomb or a lying header looks like to a reader."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 16))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


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


LLAVA_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}


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


def write_llava_folder(folder: Path, tok, config: dict, state: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    tok.save_pretrained(str(folder))
    return folder


def llava_original(parts) -> Path:
    """``llava_parts`` written as a LLaVA-1.5 folder in the original repository's layout."""
    root, tok, llm, proj = parts
    config = {"model_type": "llava", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "vocab_size": len(tok), **LLAVA_LLAMA}
    state = {**llm, **{f"model.mm_projector.{k}": v for k, v in proj.items()}}
    return write_llava_folder(root / "original", tok, config, state)
