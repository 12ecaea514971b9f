"""Plain helpers shared by test modules (no fixtures: those are in conftest.py): where the
released fixtures live, masks and lying image headers made on the spot, the miniature LLaVA-1.5's
shape and folder writers."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

# TorchInductor's CPU code needs a C++ compiler; the tests that compile for real skip without one
# (the package then runs uncompiled, with a warning: tested with a stand-in compiler)
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))

# the released checkpoint's miniature and HIPIE's golden outputs, made from the original code
# (see shared/fixtures/released); tests that need them skip where they are absent
RELEASED_FIXTURES = Path(os.environ.get("SEGLLM_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared/fixtures/released"))

def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_eval_log(path: Path, conversations) -> Path:
    """An evaluation log as ``segllm eval`` writes it (``NAME.PROTOCOL.rankR.jsonl``): conversation
    i's rows, each (round, intersection, union, IoU, box hit, grounded, family, text-resolvable)."""
    path.write_text("".join(json.dumps({"index": i, "masks": [list(r) for r in rows], "empty_refs": 0, "no_seg_answers": 0}) + "\n"
                            for i, rows in enumerate(conversations)))
    return path


def with_ref_prior(cfg):
    """``cfg`` (a tiny config) with a direct decoder that reads the mask each round refers to."""
    from segllm.decoders.direct import DirectDecoderConfig

    cfg.decoder = DirectDecoderConfig(image_size=64, stride=4, encoder_width=16, encoder_depth=1, dim=cfg.prompt_head.dim,
                                      fuse_dim=16, fuse_depth=1, context_grid=4, heads=2, ref_prior=True)
    return cfg


def wake_ref_prior(model, seed: int = 0):
    """Set the ref_prior layers (zero at initialisation) to random values, so that the referenced
    mask changes the decoded masks."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("ref_map", "ref_film", "ref_query"):
            w = getattr(model.decoder, name).weight
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype))
    return model


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


LLAVA_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}


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


class ListData:
    """Conversations in a list, read the way evaluation reads a dataset (``len`` and ``get``)."""

    def __init__(self, convs):
        self.convs = convs

    def __len__(self):
        return len(self.convs)

    def get(self, i):
        return self.convs[i]


def varied_answers(model, seed: int = 1):
    """``model`` (a tiny model, changed in place and returned) with answers that vary: its output
    layer's rows for ``<seg>`` and the end token point along random directions, so some states
    say ``<seg>``, some end the answer and some say other words (a random model's answers are
    otherwise never masks)."""
    import torch

    head, proc = model.llm.get_output_embeddings(), model.processor
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tid in (proc.seg_id, proc.eos_id):
            head.weight[tid] = torch.randn(head.weight.shape[1], generator=g, dtype=head.weight.dtype) * 4
    return model


def miniature_released_model():
    """The miniature released checkpoint (HIPIE decoder, 1024 frame) loaded for inference, or the
    test skipped where the fixture is absent."""
    import pytest

    from segllm.model.segllm import SegLLM

    path = RELEASED_FIXTURES / "segllm_tiny/checkpoint"
    if not (path / "model.safetensors").exists():
        pytest.skip("released fixture absent")
    return SegLLM.from_pretrained(path).eval()
