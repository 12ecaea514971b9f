"""Batch segmentation against one Session per image, measured in the same run (issue 17).

Both answer the same conversations (world test scenes, their own questions, references as
``[REF:k]``) with the answer forced to ``"<seg>"``, so they compute the same masks; the script
checks that they agree and prints images/s and rounds/s of each, and their ratio.

    python scripts/bench_segment.py --images 64 --batch-size 16 --json docs/results/bench_segment.json
    python scripts/bench_segment.py --images 64 --batch-size 16 32 64 --repeats 2   # alternating, under a changing load
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segllm.batch_segment import Item, segment_items
from segllm.data.records import WorldConversations
from segllm.default import load_model
from segllm.export import from_rle
from segllm.session import Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[16], help="one or more batch sizes, each measured")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="measure every side this many times, alternating (the load may change)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    data = WorldConversations("test", args.images, seed=0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(len(data)):
            conv = data[i]
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(conv.image).save(path)
            qs = [r.question + "".join(f" [REF:{k}]" for k in r.refs) for r in conv.rounds]
            items.append(Item(str(i + 1), str(path), qs))
        rounds = sum(len(it.questions) for it in items)
        for bs in args.batch_size:
            segment_items(model, items[:bs], Path(tmp) / "warm", batch_size=bs, progress=False)

        single_s: list[float] = []
        batched_s: dict[int, list[float]] = {bs: [] for bs in args.batch_size}
        done_rounds: dict[int, int] = {}
        replies: list[list[np.ndarray]] = []
        sides = ["session"] + list(args.batch_size)
        for rep in range(args.repeats):
            # alternate the order, so that a load that rises or falls during the run hits every side alike
            for side in sides if rep % 2 == 0 else sides[::-1]:
                if side == "session":
                    t0 = time.perf_counter()
                    replies = _sessions(model, items)
                    single_s.append(time.perf_counter() - t0)
                    continue
                out = Path(tmp) / f"out{side}_{rep}"
                t0 = time.perf_counter()
                summary = segment_items(model, items, out, batch_size=side, progress=False)
                batched_s[side].append(time.perf_counter() - t0)
                done_rounds[side] = summary.rounds
        masks_identical = {bs: _agreement(Path(tmp) / f"out{bs}_0", items, replies) for bs in args.batch_size}

    single = sum(single_s)
    n_single = sum(len(r) for r in replies)
    result = {
        "images": len(items), "rounds_asked": rounds, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "one_session_per_image": {"seconds": _round(single_s), "rounds": n_single, "images_per_s": round(len(items) * args.repeats / single, 2),
                                  "rounds_per_s": round(n_single * args.repeats / single, 2)},
        "batched": [
            {"batch_size": bs, "seconds": _round(batched_s[bs]), "rounds": done_rounds[bs],
             "images_per_s": round(len(items) * args.repeats / sum(batched_s[bs]), 2),
             "rounds_per_s": round(done_rounds[bs] * args.repeats / sum(batched_s[bs]), 2),
             "speedup": round(single / sum(batched_s[bs]), 2),
             "speedup_each": [round(s / b, 2) for s, b in zip(single_s, batched_s[bs])],
             "masks_identical": masks_identical[bs]}
            for bs in args.batch_size
        ],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _sessions(model, items: list[Item]) -> list[list[np.ndarray]]:
    """One Session per item, every round answered ``"<seg>"``: each item's masks, round by round
    (stopping, as the batch does, at a reference to an empty mask)."""
    replies = []
    for it in items:
        s = Session(model, it.image)
        masks = []
        for q in it.questions:
            try:
                masks.append(s.ask(q, answer="<seg>").masks[0])
            except ValueError:  # a reference to an empty mask: the batch stopped there too
                break
        replies.append(masks)
    return replies


def _agreement(out: Path, items: list[Item], replies: list[list[np.ndarray]]) -> str:
    """'identical/compared' masks of a batched run against the sessions' (a round that only one
    side answered counts as compared and not identical)."""
    recs = {rec["id"]: rec for rec in map(json.loads, (out / "results.rank0.jsonl").read_text().splitlines())}
    agree = total = 0
    for it, masks in zip(items, replies):
        got = recs[it.key]["rounds"]
        total += max(len(got), len(masks))
        agree += sum(bool(np.array_equal(from_rle(g["masks"][0]), want)) for g, want in zip(got, masks))
    return f"{agree}/{total}"


def _round(seconds: list[float]) -> float | list[float]:
    """Total seconds (one measurement) or each measurement's seconds."""
    return round(seconds[0], 2) if len(seconds) == 1 else [round(s, 2) for s in seconds]


if __name__ == "__main__":
    main()
