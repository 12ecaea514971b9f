"""Learning curves for choosing a model design: grounded rate and cIoU against conversations seen.

Trains a recipe in chunks of ``--every`` steps (fresh world scenes every step, the trainer's own
data path), and after each chunk evaluates the checkpoint on the first ``--val`` conversations of
the world's validation split, every round teacher-forced (oracle history):

- cIoU per round (sum of intersections / sum of unions);
- grounded rate: the share of predictions that overlap the target more than any other object or
  part (:func:`segllm.eval.metrics.grounding`): "picking the object" as opposed to "drawing it";
  a pick round ("segment one of the red objects") is scored against its best valid answer;
- IoU given grounded: mean IoU of the grounded predictions;
- question blindness: the mean IoU between round 1's mask for its own question and for another
  conversation's round-1 question on the same image (1.0: the question changes nothing, the
  model draws "where the objects are"; issue 13's failure mode).

Writes ``OUT/curve.jsonl`` (one line per evaluation) and prints a line per chunk. Runs resume:
a second call with the same ``--out`` continues from its last checkpoint.

    python scripts/grounding_curve.py configs/grounded.toml --out runs/curve-grounded --every 100 --steps 600
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from segllm.data.records import WorldConversations, record_to_conversation
from segllm.data.world import WorldConfig
from segllm.eval.metrics import grounding
from segllm.model.loading import load_pretrained
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import LAST, train


def evaluate_curve(model, recipe: TrainRecipe, n: int, batch: int = 16) -> dict:
    d = recipe.data
    ds = WorldConversations("val", n, seed=d.seed, config=WorldConfig.from_dict(d.world), max_rounds=d.max_rounds)
    inter: dict[int, int] = {}
    union: dict[int, int] = {}
    grounded: dict[int, list[float]] = {}
    model.eval()
    samples = [ds.world.sample("val", i) for i in range(n)]
    for start in range(0, n, batch):
        chunk = samples[start : start + batch]
        convs = [record_to_conversation(s.record, s.image, lambda mid, s=s: s.masks[mid]) for s in chunk]
        if d.max_rounds:
            convs = [c.truncated(d.max_rounds) for c in convs]
        with torch.no_grad():
            preds = model.segment(convs)
        for s, conv, per_round in zip(chunk, convs, preds):
            ids = sorted(s.masks)
            objects = [s.masks[i] for i in ids]
            for r, (masks, _scores) in enumerate(per_round[: len(conv.rounds)], start=1):
                pred = masks[0]
                alts = s.alternatives[r - 1] if len(s.alternatives) >= r and len(s.alternatives[r - 1]) > 1 else [s.targets[r - 1]]
                best = None  # (grounded, IoU, I, U) against the best valid answer
                for t in alts:
                    gt = s.masks[t]
                    i, u = int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())
                    cand = (grounding(pred, ids.index(t), objects)[0], i / max(u, 1), i, u)
                    best = cand if best is None or cand[:2] > best[:2] else best
                inter[r] = inter.get(r, 0) + best[2]
                union[r] = union.get(r, 0) + best[3]
                grounded.setdefault(r, []).append(best[1] if best[0] else -1.0)
    rounds = sorted(inter)
    all_g = [v for r in rounds for v in grounded[r]]
    blind = question_blindness(model, samples, batch)
    return {
        "question_blindness": round(blind, 3),
        "cIoU": 100 * sum(inter.values()) / max(1, sum(union.values())),
        "grounded": 100 * float(np.mean([v >= 0 for v in all_g])),
        "iou_given_grounded": 100 * float(np.mean([v for v in all_g if v >= 0])) if any(v >= 0 for v in all_g) else 0.0,
        "per_round": {
            r: {"cIoU": round(100 * inter[r] / max(1, union[r]), 2), "grounded": round(100 * float(np.mean([v >= 0 for v in grounded[r]])), 1), "n": len(grounded[r])}
            for r in rounds
        },
    }


def question_blindness(model, samples: list, batch: int = 16) -> float:
    """Mean IoU between round 1's predicted mask for its own question and for the round-1 question
    of the conversation 7 places on (same image, same history: none)."""
    convs = [record_to_conversation(s.record, s.image, lambda mid, s=s: s.masks[mid]).truncated(1) for s in samples]
    other = [dataclasses.replace(c, rounds=[dataclasses.replace(c.rounds[0], question=convs[(i + 7) % len(convs)].rounds[0].question)])
             for i, c in enumerate(convs)]
    ious = []
    for start in range(0, len(convs), batch):
        with torch.no_grad():
            own = model.segment(convs[start : start + batch])
            swapped = model.segment(other[start : start + batch])
        for a, b in zip(own, swapped):
            ma, mb = a[0][0][0], b[0][0][0]
            ious.append(np.logical_and(ma, mb).sum() / max(1, np.logical_or(ma, mb).sum()))
    return float(np.mean(ious))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=100, help="steps between evaluations")
    ap.add_argument("--steps", type=int, default=600, help="total steps (the schedule's length)")
    ap.add_argument("--val", type=int, default=64, help="validation conversations per evaluation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="recipe override, e.g. optim.lr=3e-4")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    overrides |= {"output_dir": args.out, "steps": args.steps, "eval_every": 0, "save_every": args.every, "time_limit_s": 0}
    recipe = TrainRecipe.load(args.recipe, overrides)
    out = Path(args.out)
    curve = out / "curve.jsonl"
    state = out / LAST / "trainer_state.json"
    step = json.loads(state.read_text())["step"] if state.is_file() else 0
    while step < args.steps:
        t = time.time()
        summary = train(recipe, resume=step > 0, progress=False, stop_after=min(args.steps, step + args.every))
        train_s = time.time() - t
        step = summary.steps
        model = load_pretrained(out / LAST / "model")
        t = time.time()
        res = evaluate_curve(model, recipe, args.val)
        entry = {"step": step, "conversations": step * recipe.batch_size * recipe.grad_accum, "train_s": round(train_s, 1),
                 "eval_s": round(time.time() - t, 1), "loss": round(float(np.mean(summary.losses[-20:])), 4), **res}
        with curve.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"step {step} conv {entry['conversations']} loss {entry['loss']:.3f} cIoU {res['cIoU']:.1f} "
              f"grounded {res['grounded']:.1f}% IoU|grounded {res['iou_given_grounded']:.1f} blind {res['question_blindness']:.2f} "
              f"round1 {res['per_round'].get(1, {})} ({train_s:.0f}s train)", flush=True)


if __name__ == "__main__":
    main()
