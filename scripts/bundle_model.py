"""Copy a trained checkpoint into the package as the bundled default model (weights in float16).

Usage: python scripts/bundle_model.py runs/default/checkpoint-last [--out DIR]

With --out the float16 copy goes to DIR instead of the package (e.g. to start another run from it,
or to bring a run's model back from another machine at half the size).

The copy's segllm.json keeps the provenance: the "history" of the folder the run started from
(recipe.model.init, where it has one) with this run appended, so that re-bundling does not lose
how the earlier stages were trained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segllm.default import DEFAULT_MODEL
from segllm.model.segllm import SegLLM


def main(src: str, out: Path = DEFAULT_MODEL) -> None:
    src_path = Path(src)
    state = json.loads((src_path / "trainer_state.json").read_text())
    model = SegLLM.from_pretrained(src_path / "model")
    recipe = state["recipe"]
    init = (recipe.get("model") or {}).get("init")
    this_run = (f"then from {init or 'scratch'}: {state['step']} steps, {state['samples_seen']:,} conversations"
                f" (the 'recipe' above, data.start {recipe.get('data', {}).get('start')})")
    earlier = ""
    if init and (Path(init) / "segllm.json").is_file():
        earlier = json.loads((Path(init) / "segllm.json").read_text()).get("history", "")
    extra = {
        "what": "segllm's bundled default model, trained on the procedural multi-round world",
        "recipe": state["recipe"],
        "step": state["step"],
        "samples_seen": state["samples_seen"],
        "weights": "stored in float16, loaded as float32",
        "history": f"{earlier}; {this_run}" if earlier else this_run,
    }
    model.save_pretrained(out, extra=extra, dtype=torch.float16)
    size = sum(p.stat().st_size for p in Path(out).iterdir()) / 2**20
    print(f"bundled step {state['step']} into {out} ({size:.1f} MB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training run's checkpoint folder (with model/ and trainer_state.json)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL, help="where to write (default: the package's bundled model)")
    args = parser.parse_args()
    main(args.checkpoint, args.out)
