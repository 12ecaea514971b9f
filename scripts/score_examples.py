"""Per-round IoU of a model on the bundled example conversations, with its own history (the
path `segllm chat` takes), against the world's ground truth for those scenes (a pick round: its
best valid answer). Issue 13 asks that the bundled model answer them correctly, round by round.

    python scripts/score_examples.py [CHECKPOINT]     # default: the bundled model
    python scripts/score_examples.py --figure docs/examples.png   # also draw every round

The figure has two rows per example: the ground truth of each round (magenta, outlined) and the model's
masks (its round's colour, as ``segllm chat`` draws them) with the round's IoU, so that the
README shows what the model does with the examples, right or wrong.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image, ImageDraw

from segllm import viz
from segllm.data.world import World, WorldConfig
from segllm.default import EXAMPLES, load_model
from segllm.errors import SegLLMError
from segllm.model.segllm import SegLLM
from segllm.session import Session

NAMES = ("shapes", "scene2", "scene3")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


SCALE = 2  # the examples are 128 px: drawn at twice that, pixels kept crisp
TRUTH = (255, 0, 255)  # magenta: no object in the world has that colour


def _cell(image: np.ndarray, masks: list[np.ndarray], rnd: int, caption: str, colour=None) -> Image.Image:
    """One round's image [H, W, 3] with its masks drawn (``colour``: one colour for all, else the
    round's own), upscaled, with a caption strip under it."""
    pil = viz.overlay(image, [(rnd, m) for m in masks], labels=[""] * len(masks), fill=colour,
                      alpha=0.5 if colour is None else 0.65)
    pil = pil.resize((pil.width * SCALE, pil.height * SCALE), Image.NEAREST)
    out = Image.new("RGB", (pil.width, pil.height + 14), "white")
    out.paste(pil, (0, 0))
    ImageDraw.Draw(out).text((3, pil.height + 1), caption, fill=(0, 0, 0))
    return out


def score(model: SegLLM, name: str, world: World | None = None) -> list[tuple[float | None, list[np.ndarray], np.ndarray]]:
    """Each round of the bundled example ``name`` asked as ``segllm chat`` does (own history): the
    best IoU of its first mask against the round's valid answers (None: the round was refused, e.g.
    it refers to an earlier round whose mask is empty), the round's masks [H, W] (bool), and the
    ground truth it is scored against [H, W] (bool)."""
    world = world or World(WorldConfig(), seed=0)
    spec = json.loads((EXAMPLES / f"{name}.json").read_text())
    sample = world.sample("test", int(spec["source"].rsplit(" ", 1)[1]))
    image = np.asarray(Image.open(EXAMPLES / f"{name}.png").convert("RGB"))
    session = Session(model, image)
    rounds = []
    for question, rec in zip(spec["questions"], sample.record["rounds"]):
        valid = rec.get("alternatives") or rec["mask_ids"]
        try:
            reply = session.ask(question)
        except SegLLMError:
            rounds.append((None, [], sample.masks[valid[0]]))
            continue
        pred = reply.masks[0] if len(reply.masks) else np.zeros(image.shape[:2], bool)
        best_id = max(valid, key=lambda t: iou(pred, sample.masks[t]))
        rounds.append((iou(pred, sample.masks[best_id]), list(reply.masks), sample.masks[best_id]))
    return rounds


def main(checkpoint: str | None, figure: str | None = None) -> None:
    model = SegLLM.from_pretrained(checkpoint).eval() if checkpoint else load_model()
    world = World(WorldConfig(), seed=0)
    right = total = 0
    rows: list[list[Image.Image]] = []
    for name in NAMES:
        image = np.asarray(Image.open(EXAMPLES / f"{name}.png").convert("RGB"))
        cells, truth_row, model_row = [], [], []
        for k, (best, masks, truth) in enumerate(score(model, name, world), start=1):
            total += 1
            truth_row.append(_cell(image, [truth], k, f"{name} {k}: truth", TRUTH))
            if best is None:
                cells.append(f"r{k}:refused")
                model_row.append(_cell(image, [], k, f"{k}: refused"))
                continue
            right += best >= 0.5
            cells.append(f"r{k}:{best:.2f}")
            model_row.append(_cell(image, masks, k, f"{k}: IoU {best:.2f}" + (" ok" if best >= 0.5 else "")))
        rows += [truth_row, model_row]
        print(name, " ".join(cells))
    print(f"rounds with IoU >= 0.5: {right}/{total}")
    if figure:
        w, h = rows[0][0].size
        sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
        for i, row in enumerate(rows):
            for j, cell in enumerate(row):
                sheet.paste(cell, (j * w, i * h))
        sheet.save(figure)
        print(f"wrote {figure}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="a checkpoint folder (default: the bundled model)")
    ap.add_argument("--figure", help="also write a PNG of every round: ground truth and the model's masks")
    args = ap.parse_args()
    main(args.checkpoint, args.figure)
