"""Where the bundled model's wrong picks land, by kind: a top-level object or a part (issue 13).

Each test conversation is answered by one Session with its own history (answers forced to
``<seg>``, references as ``[REF:k]``, the path ``segllm segment`` takes). A round is right when
its mask overlaps the target (or, in a pick round, any valid answer) with IoU >= 0.5 (a
conversation stops at a reference to an empty mask, as ``segllm segment`` does); a wrong
round's target and prediction are each matched to the scene's candidate (every object and part)
they overlap best (IoU), and counted by the two candidates' kinds.

    python scripts/pick_kinds.py [--size 200] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from segllm.data.records import WorldConversations
from segllm.default import load_model
from segllm.errors import MaskError
from segllm.session import Session


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=200, help="test conversations")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    data = WorldConversations("test", args.size, seed=0)
    counts: Counter[str] = Counter()
    for i in range(len(data)):
        conv = data[i]
        cand, kind = conv.candidates.astype(bool), conv.candidate_groups  # kind 1: a part
        session = Session(model, conv.image)
        for r, rnd in enumerate(conv.rounds):
            question = rnd.question + "".join(f" [REF:{k}]" for k in rnd.refs)
            try:
                mask = np.asarray(session.ask(question, answer="<seg>").masks[0]).astype(bool)
            except MaskError:  # refers to an earlier round whose mask came out empty
                counts["not asked: refers to an empty mask"] += len(conv.rounds) - r
                break
            target = np.asarray(rnd.masks[0]).astype(bool)
            valid = [target] + [cand[a] for a in ((conv.alternatives or {}).get(r) or [])]
            if max(iou(mask, v) for v in valid) >= 0.5:
                counts["right"] += 1
                continue
            t = int(np.argmax([iou(target, c) for c in cand]))
            p = int(np.argmax([iou(mask, c) for c in cand]))
            counts[f"wrong: target {'part' if kind[t] else 'object'}, mask on {'a part' if kind[p] else 'an object'}"] += 1
    skipped = counts.pop("not asked: refers to an empty mask", 0)
    total = sum(counts.values())
    wrong = total - counts["right"]
    print(f"{total} rounds of {len(data)} test conversations answered ({skipped} not: after a reference to an empty mask); "
          f"right (IoU >= 0.5): {counts['right']}")
    for key, n in sorted(counts.items()):
        if key != "right":
            print(f"  {key}: {n} ({100 * n / max(1, wrong):.0f}% of the {wrong} wrong)")


if __name__ == "__main__":
    main()
