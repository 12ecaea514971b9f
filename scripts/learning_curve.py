"""The bundled model's learning curve from `segllm eval` results: cIoU against conversations seen,
one point per checkpoint, and a least-squares line in log10(conversations) per figure, with the
conversations at which the line reaches given targets (an extrapolation, said as one).

    python scripts/learning_curve.py \
        --point st7 703104 'docs/results/s39_curve_st7_{split}1000.json' \
        --point s38 1035616 'docs/results/s39_s38_{split}1000.json' ... [--json OUT]

Each result file is a `segllm eval --out DIR --name NAME` JSON; `{split}` is filled with each of
--splits (test heldout). Figures: all rounds under each protocol found, and round 1 under own history.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def figures(path: Path) -> dict[str, float]:
    """'own' / 'oracle' (all rounds) and 'own r1' cIoU from one evaluation JSON."""
    out = {}
    for result in json.loads(path.read_text())["results"]:
        protocol = result.get("protocol")
        if protocol in ("own", "oracle"):
            out[protocol] = result["per_round"]["all"]["cIoU"]
            if protocol == "own":
                out["own r1"] = result["per_round"]["1"]["cIoU"]
    return out


def fit(conversations: list[int], values: list[float], targets: tuple[float, ...]) -> dict:
    """cIoU = a + b * log10(conversations) by least squares: b per tenfold with its standard error
    (nan with two points), and the conversations at which the line reaches each target."""
    x = np.log10(np.asarray(conversations, float))
    y = np.asarray(values, float)
    design = np.stack([np.ones_like(x), x], 1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - 2
    se = math.sqrt(((y - design @ (a, b)) ** 2).sum() / dof * np.linalg.inv(design.T @ design)[1, 1]) if dof > 0 else math.nan
    reach = {str(t): (10 ** ((t - a) / b) if b > 0 else math.inf) for t in targets}
    return {"per_tenfold": float(b), "se": se, "conversations_for": reach}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", nargs=3, action="append", required=True, metavar=("NAME", "CONVERSATIONS", "PATTERN"))
    ap.add_argument("--splits", nargs="+", default=["test", "heldout"])
    ap.add_argument("--targets", nargs="+", type=float, default=[80.0, 90.0])
    ap.add_argument("--json", help="also write the points and fits here")
    args = ap.parse_args()
    points = sorted(((name, int(n), pattern) for name, n, pattern in args.point), key=lambda p: p[1])
    table = {name: {"conversations": n, **{f"{split} {k}": v for split in args.splits
                                              for k, v in figures(Path(pattern.format(split=split))).items()}}
             for name, n, pattern in points}
    keys = [k for k in next(iter(table.values())) if k != "conversations"]
    print("| model | conversations | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, row in table.items():
        print(f"| {name} | {row['conversations']:,} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    fits = {}
    for k in keys:
        rows = [r for r in table.values() if k in r]
        fits[k] = fit([r["conversations"] for r in rows], [r[k] for r in rows], tuple(args.targets))
        reach = ", ".join(f"{t} at {n:,.0f}" for t, n in fits[k]["conversations_for"].items())
        print(f"{k}: {fits[k]['per_tenfold']:+.1f} per tenfold (standard error {fits[k]['se']:.1f}); the line reaches {reach} conversations")
    if args.json:
        Path(args.json).write_text(json.dumps({"points": table, "fits": fits}, indent=1) + "\n")


if __name__ == "__main__":
    main()
