"""The README's two tables of the bundled model ("The bundled default model"), printed as
Markdown from the evaluation files `scripts/bundled_figures.sh` writes, so that a newly bundled
model's tables are regenerated rather than typed.

    python scripts/bundled_tables.py                       # docs/results/memory.* and the twin's
    python scripts/bundled_tables.py --results /tmp/figs   # a candidate's (bundled_figures.sh OUT=)

1. cIoU per round, test split: memory (oracle, own history, with issue 13's targets marked),
   the text-only twin (oracle, own) and the question-blind baseline, from the summaries
   (``NAME.json``, ``TWIN.json``).
2. Memory against the twin on the rounds issue 13's memory target reads (own history unless
   the row says otherwise; test, then heldout): cIoU of each subset as summed intersections over
   summed unions of the per-round logs (``NAME.PROTOCOL.rank0.jsonl``), the same arithmetic as
   ``scripts/memory_lead_ci.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from segllm.eval.evaluate import log_rows

ROUND1_TARGET, LATER_TARGET, LEAD_TARGET = 90.0, 80.0, 10.0  # issue 13
FEW_ROUNDS = 50  # a round met on fewer rounds than this says how many


def per_round(summary: Path, protocol: str) -> dict[str, dict]:
    """``per_round`` of one protocol's result in a ``segllm eval`` summary JSON."""
    for result in json.loads(summary.read_text())["results"]:
        if result["protocol"] == protocol:
            return result["per_round"]
    raise SystemExit(f"{summary} has no {protocol!r} result")


def round_table(name: Path, twin: Path) -> str:
    mem_o, mem_s, blind = per_round(name, "oracle"), per_round(name, "own"), per_round(name, "baseline-union")
    twin_o, twin_s = per_round(twin, "oracle"), per_round(twin, "own")
    lines = ["| round | with memory, oracle | with memory, own (target) | text-only twin, oracle | "
             "text-only twin, own | question-blind (union of all objects) | rounds |",
             "|---|---|---|---|---|---|---|"]
    for key in mem_s:
        own = mem_s[key]["cIoU"]
        if key == "all":
            mark = ""
        else:
            target = ROUND1_TARGET if key == "1" else LATER_TARGET
            met = own >= target
            few = f", on {mem_s[key]['n']} rounds" if met and mem_s[key]["n"] < FEW_ROUNDS else ""  # says how little it shows
            mark = f" (>= {target:.0f}: {'met' if met else 'missed'}{few})"
        lines.append(f"| {key} | {mem_o[key]['cIoU']:.1f} | {own:.1f}{mark} | {twin_o[key]['cIoU']:.1f} | "
                     f"{twin_s[key]['cIoU']:.1f} | {blind[key]['cIoU']:.1f} | {mem_s[key]['n']:,} |")
    return "\n".join(lines)


def ciou(log: Path, keep) -> tuple[float, int]:
    """cIoU (percent) over the rows of a per-round log that ``keep(round, resolvable)`` accepts,
    and how many rows those are."""
    inter = union = n = 0
    for rows in log_rows([log]).values():
        for rd, i, u, *_, resolvable in rows:
            if keep(rd, resolvable):
                inter, union, n = inter + i, union + u, n + 1
    if union == 0:
        raise SystemExit(f"{log}: no rounds in a slice the table needs")
    return 100.0 * inter / union, n


SLICES = {  # row label -> which rows of a log it reads
    "round 1 (nothing to remember)": lambda rd, res: rd == 1,
    "all rounds": lambda rd, res: True,
    "rounds >= 4 that only memory can answer": lambda rd, res: rd >= 4 and res is False,
    "rounds >= 4 that the text can resolve": lambda rd, res: rd >= 4 and res is True,
    "all rounds >= 4": lambda rd, res: rd >= 4,
}
TARGETED = ("rounds >= 4 that only memory can answer", "all rounds >= 4")  # the target reads these


def lead_table(name: Path, twin: Path, heldout_name: Path, heldout_twin: Path) -> str:
    lines = ["| | memory | text-only twin | memory minus twin |", "|---|---|---|---|"]

    def row(label: str, mem_log: Path, twin_log: Path, keep, targeted: bool) -> None:
        (m, n), (t, _) = ciou(mem_log, keep), ciou(twin_log, keep)
        lead = f"{m - t:+.1f}"
        if targeted:
            lead = f"**{lead} (target >= {LEAD_TARGET:.0f})**"
        count = "" if label.startswith("round 1") or label == "all rounds" else f" ({n:,})"
        lines.append(f"| {label}{count} | {m:.1f} | {t:.1f} | {lead} |")

    def log(stem: Path, protocol: str) -> Path:
        return stem.with_name(f"{stem.name}.{protocol}.rank0.jsonl")

    for label, keep in SLICES.items():
        row(label, log(name, "own"), log(twin, "own"), keep, label in TARGETED)
    for label in TARGETED:
        row(f"oracle history: {label}", log(name, "oracle"), log(twin, "oracle"), SLICES[label], False)
    for label in TARGETED:
        row(f"heldout: {label}", log(heldout_name, "own"), log(heldout_twin, "own"), SLICES[label], True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("docs/results"), help="where NAME's files are")
    ap.add_argument("--name", default="memory", help="the test split's evaluation (heldout: heldout_NAME)")
    ap.add_argument("--twin", type=Path, default=Path("docs/results/s14_twin_test"), help="the twin's test evaluation (path stem)")
    ap.add_argument("--twin-heldout", type=Path, default=Path("docs/results/s14_twin_heldout"))
    args = ap.parse_args()
    name, heldout = args.results / args.name, args.results / f"heldout_{args.name}"
    print(round_table(name.with_name(f"{name.name}.json"), args.twin.with_name(f"{args.twin.name}.json")))  # (a name may hold dots)
    print()
    print(lead_table(name, args.twin, heldout, args.twin_heldout))


if __name__ == "__main__":
    main()
