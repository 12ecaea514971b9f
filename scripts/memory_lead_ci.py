"""How sure is the memory lead? A paired bootstrap over conversations of "memory minus text-only"
cIoU on rounds >= 4 (all of them, and those only memory can answer), from two evaluations'
per-round records (``segllm eval`` writes them to ``OUT/NAME.PROTOCOL.rank0.jsonl``).

    python scripts/memory_lead_ci.py docs/results/memory.own.rank0.jsonl \
        docs/results/s14_twin_test.own.rank0.jsonl [--resamples 10000] [--seed 0]

With ``--min-round 1 --names new bundled`` it compares any two models evaluated on the same
conversations (e.g. a training run's checkpoint against the bundled model) over all rounds;
``--max-round`` ends the slice (``--min-round 1 --max-round 1``: round 1 alone).

Each resample draws the conversations with replacement, the same draw for both models, and
recomputes each model's cIoU (summed intersections over summed unions) on the drawn rounds.
"""

from __future__ import annotations

import argparse

import numpy as np

from segllm.eval.evaluate import log_rows


def read(path: str, min_round: int = 4, max_round: int | None = None) -> dict[int, np.ndarray]:
    """Conversation index -> per-slice sums [[I_all, U_all], [I_notres, U_notres]] of its rounds
    min_round..max_round (no end when None; unusable records and lines cut short left out, as
    ``segllm eval`` reads its logs)."""
    out = {}
    for index, rows in log_rows([path]).items():
        sums = np.zeros((2, 2))
        for rd, inter, union, *_, resolvable in rows:
            if rd >= min_round and (max_round is None or rd <= max_round):
                sums[0] += (inter, union)
                if resolvable is False:
                    sums[1] += (inter, union)
        out[index] = sums
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("memory")
    ap.add_argument("text_only")
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-round", type=int, default=4, help="rounds from this one on (4: issue 13's memory lead)")
    ap.add_argument("--max-round", type=int, default=None, help="rounds up to this one (default: all)")
    ap.add_argument("--names", nargs=2, default=("memory", "text-only"), help="what to call the two models")
    args = ap.parse_args()
    try:
        a, b = read(args.memory, args.min_round, args.max_round), read(args.text_only, args.min_round, args.max_round)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if a.keys() != b.keys():
        raise SystemExit("the two evaluations cover different conversations")
    keys = sorted(a)
    A = np.stack([a[k] for k in keys])  # [C, 2 slices, (I, U)]
    B = np.stack([b[k] for k in keys])
    rng = np.random.default_rng(args.seed)
    draws = rng.integers(0, len(keys), size=(args.resamples, len(keys)))

    def ciou(x: np.ndarray) -> np.ndarray:  # [..., C, 2, 2] -> [..., 2] in percent (nan: a slice without pixels)
        s = x.sum(axis=-3)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100 * s[..., 0] / s[..., 1]

    lead = ciou(A) - ciou(B)
    boot = ciou(A[draws]) - ciou(B[draws])  # [R, 2]
    r, big, (na, nb) = args.min_round, args.max_round, args.names
    span = f"all rounds >= {r}" if big is None else f"round {r}" if big == r else f"rounds {r}-{big}"
    for j, name in enumerate((span, f"{span.removeprefix('all ')} only memory can answer")):
        if np.isnan(lead[j]):  # e.g. round 1, which no text leaves unresolved
            print(f"{name}: no rounds")
            continue
        lo, hi = np.nanpercentile(boot[:, j], [2.5, 97.5])
        below, worse = float((boot[:, j] < 10).mean()), float((boot[:, j] < 0).mean())
        print(f"{name}: lead {lead[j]:+.1f} ({na} {ciou(A)[j]:.1f}, {nb} {ciou(B)[j]:.1f}); "
              f"95% interval [{lo:+.1f}, {hi:+.1f}]; share of resamples below +10: {below:.2f}, below 0: {worse:.2f}")
    print(f"({len(keys)} conversations, {args.resamples} paired resamples, seed {args.seed})")


if __name__ == "__main__":
    main()
