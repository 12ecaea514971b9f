"""Batch segmentation against one Session per image, measured in the same run (issue 17).

Both answer the same conversations (world test scenes, their own questions, references as
``[REF:k]``) with the answer forced to ``"<seg>"``, so they compute the same masks; the script
checks that they agree and prints images/s and rounds/s of each, and their ratio.

    python scripts/bench_segment.py --images 64 --batch-size 16 --json docs/results/bench_segment.json
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    data = WorldConversations("test", args.images, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(len(data)):
            conv = data[i]
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(conv.image).save(path)
            qs = [r.question + "".join(f" [REF:{k}]" for k in r.refs) for r in conv.rounds]
            items.append(Item(str(i + 1), str(path), qs))
        rounds = sum(len(it.questions) for it in items)

        segment_items(model, items[: args.batch_size], Path(tmp) / "warm", batch_size=args.batch_size, progress=False)
        t0 = time.perf_counter()
        summary = segment_items(model, items, Path(tmp) / "out", batch_size=args.batch_size, progress=False)
        batched_s = time.perf_counter() - t0
        recs = {json.loads(line)["id"]: json.loads(line) for line in (Path(tmp) / "out" / "results.rank0.jsonl").read_text().splitlines()}

        t0 = time.perf_counter()
        agree = total = done = 0
        for it in items:
            s = Session(model, it.image)
            got = recs[it.key]["rounds"]
            for k, q in enumerate(it.questions):
                try:
                    reply = s.ask(q, answer="<seg>")
                except ValueError:  # a reference to an empty mask: the batch stopped there too
                    break
                done += 1
                if k < len(got):
                    total += 1
                    agree += bool(np.array_equal(from_rle(got[k]["masks"][0]), reply.masks[0]))
        single_s = time.perf_counter() - t0

    result = {
        "images": len(items), "rounds_asked": rounds, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "batched": {"seconds": round(batched_s, 2), "rounds": summary.rounds, "images_per_s": round(len(items) / batched_s, 2),
                    "rounds_per_s": round(summary.rounds / batched_s, 2)},
        "one_session_per_image": {"seconds": round(single_s, 2), "rounds": done, "images_per_s": round(len(items) / single_s, 2),
                                  "rounds_per_s": round(done / single_s, 2)},
        "speedup": round(single_s / batched_s, 2),
        "masks_identical": f"{agree}/{total}",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
