"""Per-round IoU of a model on the bundled example conversations, with its own history (the
path `segllm chat` takes), against the world's ground truth for those scenes (a pick round: its
best valid answer). Issue 13 asks that the bundled model answer them correctly, round by round.

    python scripts/score_examples.py [CHECKPOINT]     # default: the bundled model
"""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

from segllm.data.world import World, WorldConfig
from segllm.default import EXAMPLES, load_model
from segllm.errors import SegLLMError
from segllm.model.segllm import SegLLM
from segllm.session import Session

NAMES = ("shapes", "scene2", "scene3")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main(checkpoint: str | None) -> None:
    model = SegLLM.from_pretrained(checkpoint).eval() if checkpoint else load_model()
    world = World(WorldConfig(), seed=0)
    right = total = 0
    for name in NAMES:
        spec = json.loads((EXAMPLES / f"{name}.json").read_text())
        sample = world.sample("test", int(spec["source"].rsplit(" ", 1)[1]))
        image = np.asarray(Image.open(EXAMPLES / f"{name}.png").convert("RGB"))
        session = Session(model, image)
        cells = []
        for k, (question, rec) in enumerate(zip(spec["questions"], sample.record["rounds"]), start=1):
            total += 1
            try:
                reply = session.ask(question)
            except SegLLMError:  # e.g. a reference to an earlier round whose own mask is empty
                cells.append(f"r{k}:refused")
                continue
            pred = reply.masks[0] if len(reply.masks) else np.zeros(image.shape[:2], bool)
            best = max(iou(pred, sample.masks[t]) for t in (rec.get("alternatives") or rec["mask_ids"]))
            right += best >= 0.5
            cells.append(f"r{k}:{best:.2f}")
        print(name, " ".join(cells))
    print(f"rounds with IoU >= 0.5: {right}/{total}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
