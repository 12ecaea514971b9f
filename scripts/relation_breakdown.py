"""An evaluation log of the procedural world, broken down by each round's relation.

``segllm eval`` reports per question family ("positional", "ordinal", ...); a family holds
several relations ("extreme": "the left-most star", "nearest": "the circle nearest to instance
2", ...) that a model can get very differently. The world's records keep the family only, so this
joins a log's rows with the queries the world generates for the same conversations (same split,
seed and world settings as the evaluation; the world is deterministic by index).

    segllm eval --data world:test --size 200 --protocol own --log-dir runs/eval
    python scripts/relation_breakdown.py runs/eval/own.rank0.jsonl [--split test] [--seed 0] [--json out.json]

Per relation: rounds scored, how many were grounded (the mask overlaps its target more than any
other object) and their share, P@0.5, and cIoU (summed intersections over summed unions), over
all rounds and over round 1 alone; sorted by the rounds not grounded, most first.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from segllm.data.world import World, WorldConfig
from segllm.eval.evaluate import log_rows


def breakdown(rows_by_index: dict[int, list[tuple]], relations_of) -> dict[str, dict[str, dict]]:
    """{relation: {"all": stats, "round 1": stats}} from log rows.

    Args:
        rows_by_index: conversation index -> its log rows, (round, I, U, IoU, box hit, grounded,
            family, text-resolvable) each (:class:`segllm.eval.evaluate._Log`'s ``masks``).
        relations_of: conversation index -> each round's relation, in order.

    Each stats dict: rounds, grounded (count; rows not checked for grounding count as not),
    grounded_pct, p50 (percent of rows with IoU > 0.5) and ciou (100 * sum I / sum U).
    """
    acc: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
    for index, rows in rows_by_index.items():
        relations = relations_of(index)
        for row in rows:
            n, inter, union, iou, _hit, grounded = row[:6]
            if not 1 <= n <= len(relations):
                raise ValueError(f"conversation {index}: a row for round {n}, but the world has {len(relations)} rounds there"
                                 " (another split, seed or world setting than the evaluation's?)")
            for scope in ("all", "round 1") if n == 1 else ("all",):
                a = acc[relations[n - 1], scope]
                a[0] += 1
                a[1] += bool(grounded)
                a[2] += iou > 0.5
                a[3] += inter
                a[4] += union
    out: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for (relation, scope), (rounds, grounded, p50, inter, union) in acc.items():
        out[relation][scope] = {"rounds": rounds, "grounded": grounded, "grounded_pct": round(100 * grounded / rounds, 1),
                                "p50": round(100 * p50 / rounds, 1), "ciou": round(100 * inter / union, 1) if union else 0.0}
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="evaluation log(s) (JSONL, one line per conversation; several ranks' files together)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    try:
        rows = log_rows(args.logs)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if not rows:
        raise SystemExit("no scored conversation in the log(s)")
    world = World(WorldConfig(), seed=args.seed)
    table = breakdown(rows, lambda i: [q.relation for q in world.sample(args.split, i).queries])
    order = sorted(table, key=lambda r: (table[r]["all"]["grounded"] - table[r]["all"]["rounds"], r))
    print(f"{len(rows)} conversations of world {args.split} (seed {args.seed}), by relation; "
          "rounds not grounded, most first")
    print(f"  {'relation':18s} {'rounds':>6s} {'wrong':>5s} {'grounded':>8s} {'P@0.5':>6s} {'cIoU':>6s}   "
          f"{'round 1':>7s} {'wrong':>5s} {'cIoU':>6s}")
    for r in order:
        a, f = table[r]["all"], table[r].get("round 1")
        first = f"{f['rounds']:7d} {f['rounds'] - f['grounded']:5d} {f['ciou']:6.1f}" if f else f"{'-':>7s} {'-':>5s} {'-':>6s}"
        print(f"  {r:18s} {a['rounds']:6d} {a['rounds'] - a['grounded']:5d} {a['grounded_pct']:7.1f}% {a['p50']:6.1f} "
              f"{a['ciou']:6.1f}   {first}")
    if args.json:
        Path(args.json).write_text(json.dumps({"logs": args.logs, "split": args.split, "seed": args.seed,
                                               "conversations": len(rows), "by_relation": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
