"""The own-history evaluation in batches (the default) against one Session per conversation, timed
in the same run on the same world conversations, alternating; checks that both log the same.

    python scripts/bench_eval.py --n 200 --batch-size 16 --threads 2 --repeats 2 --json docs/results/bench_eval.json

Both sides run ``segllm.eval.evaluate.evaluate(..., protocol="own")`` on the bundled model (or
``--checkpoint``): the batched side with ``batch_size`` conversations at a time through
``RoundEngine.extend_batch``, once per ``--lanes`` value (batches on as many threads at once,
:mod:`segllm.lanes`; 0 is ``segllm eval``'s default), the other with ``session_factory=Session``
(one conversation at a time, as before session 21). Each side is warmed up on a few
conversations first; wall-clock seconds; the ratio of each repeat and of the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from segllm.data.records import WorldConversations
from segllm.default import load_model
from segllm.eval.evaluate import evaluate
from segllm.lanes import default_lanes
from segllm.model.segllm import SegLLM
from segllm.session import Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="world test conversations")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--lanes", type=int, nargs="+", default=[1, 0],
                    help="lanes of the batched side (evaluate's lanes; 0: its default, as segllm eval), each measured "
                         "(default: 1 and 0)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = SegLLM.from_pretrained(args.checkpoint).eval() if args.checkpoint else load_model()
    data = WorldConversations("test", args.n, seed=0)
    load_before = os.getloadavg()
    sides = {"one Session per conversation": {"session_factory": Session}}
    for lanes in args.lanes:
        n = default_lanes(model, lanes)
        sides[f"batched, {n} lane{'s' if n > 1 else ''}"] = {"batch_size": args.batch_size, "lanes": n}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    logs: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for options in sides.values():  # first calls outside the timings
            evaluate(model, WorldConversations("test", 4, seed=1), protocol="own", **options)
        for rep in range(args.repeats):
            for name in list(sides) if rep % 2 == 0 else list(sides)[::-1]:
                log = Path(tmp) / f"{len(seconds[name])}-{name[:3]}.jsonl"
                t0 = time.perf_counter()
                result = evaluate(model, data, protocol="own", log_path=log, **sides[name])
                seconds[name].append(time.perf_counter() - t0)
                logs.setdefault(name, log.read_text().splitlines())
    rounds = result.metrics["all"]["n"]
    single = seconds["one Session per conversation"]
    batched = [k for k in sides if k.startswith("batched")]
    out = {
        "command": "python scripts/bench_eval.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None),
        "conversations": args.n, "rounds": rounds, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "conversations_per_s": {k: round(args.n * len(v) / sum(v), 2) for k, v in seconds.items()},
        "speedup": {k: round(sum(single) / sum(seconds[k]), 2) for k in batched},
        "speedup_each": {k: [round(x / y, 2) for x, y in zip(single, seconds[k])] for k in batched},
        "logs_identical": all(logs[k] == logs["one Session per conversation"] for k in batched),
        "own_cIoU_all_rounds": round(result.metrics["all"]["cIoU"], 2),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not out["logs_identical"]:
        raise SystemExit("the two sides logged different masks")


if __name__ == "__main__":
    main()
