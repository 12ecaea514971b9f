"""Copy a trained checkpoint into the package as the bundled default model (weights in float16).

Usage: python scripts/bundle_model.py runs/default/checkpoint-last
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from segllm.default import DEFAULT_MODEL
from segllm.model.segllm import SegLLM


def main(src: str) -> None:
    src_path = Path(src)
    state = json.loads((src_path / "trainer_state.json").read_text())
    model = SegLLM.from_pretrained(src_path / "model")
    extra = {
        "what": "segllm's bundled default model, trained on the procedural multi-round world",
        "recipe": state["recipe"],
        "step": state["step"],
        "samples_seen": state["samples_seen"],
        "weights": "stored in float16, loaded as float32",
    }
    model.save_pretrained(DEFAULT_MODEL, extra=extra, dtype=torch.float16)
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) / 2**20
    print(f"bundled step {state['step']} into {DEFAULT_MODEL} ({size:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])
