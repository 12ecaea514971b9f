"""Where the bundled model's ordinal answers land: the asked rank, a neighbouring rank of the
same ordering, another object, or none (issue 13's weakest question family).

For each ordinal round ("the second small object from the left", "the first star right of
instance 2") of the first N validation conversations, teacher-forced (oracle history), the
object the mask overlaps best (IoU > 0.3) is compared with the objects that ranks 1-4 of the same
question denote (the world's own resolver, the head, direction and references unchanged).

    python scripts/ordinal_errors.py [--size 192] [--split val]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import numpy as np
import torch

from segllm.data.records import WorldConversations
from segllm.data.world.scene_index import SceneIndex
from segllm.default import load_model

ORDINAL = ("ordinal", "ordinal_from")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    data = WorldConversations(args.split, args.size, seed=0)
    convs = [data[i] for i in range(args.size)]
    samples = [data.sample(i) for i in range(args.size)]
    preds = [p for a in range(0, args.size, 16) for p in model.segment(convs[a : a + 16])]
    found: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for s, conv, pred in zip(samples, convs, preds):
        index = SceneIndex(s.objects, data.world.margins)
        targets = [r["mask_ids"][0] for r in s.record["rounds"]]
        for k, q in enumerate(s.queries[: len(conv.rounds)]):
            if q.relation in ORDINAL:
                ranks = {r: index.is_unique(dataclasses.replace(q, rank=r), targets[:k]) for r in (1, 2, 3, 4)}
                found[q.relation, q.rank][_landing(pred[k][0][0], s.masks, targets[k], ranks)] += 1
    print(f"{args.split}[0:{args.size}], oracle history: ordinal rounds by where the mask lands")
    for (relation, rank), counts in sorted(found.items()):
        total = sum(counts.values())
        print(f"  {relation} rank {rank}: {total} rounds; " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


def _landing(pred: np.ndarray, masks: dict[int, np.ndarray], target: int, ranks: dict[int, int | None]) -> str:
    """'asked rank', 'rank r', 'another object' or 'no object' (best IoU <= 0.3)."""
    def iou(m: np.ndarray) -> float:
        union = (m | pred).sum()
        return float((m & pred).sum() / union) if union else 0.0
    best = max(masks, key=lambda oid: iou(masks[oid]))
    if iou(masks[best]) <= 0.3:
        return "no object"
    if best == target:
        return "asked rank"
    hit = [r for r, oid in ranks.items() if oid == best]
    return f"rank {hit[0]}" if hit else "another object"


if __name__ == "__main__":
    main()
