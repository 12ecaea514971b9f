"""Batch segmentation against one Session per image, measured in the same run (issue 17).

Both answer the same conversations (world test scenes, their own questions, references as
``[REF:k]``) with the answer forced to ``"<seg>"``, so they compute the same masks; the script
checks that they agree and prints images/s and rounds/s of each, and their ratio.

    python scripts/bench_segment.py --images 64 --batch-size 16 --json docs/results/bench_segment.json
    python scripts/bench_segment.py --images 64 --batch-size 16 32 64 --repeats 2   # alternating, under a changing load
    python scripts/bench_segment.py --batch-size 16 32 --processes 1 2 --threads 2  # also split over 2 processes
    python scripts/bench_segment.py --batch-size 32 --lanes 1 2 --threads 2         # one process, 1 and 2 lanes

With ``--processes N`` the batched side also runs as ``torchrun --nproc-per-node N`` would split
it: N worker processes (this script with ``--worker``), each taking every N-th image with
threads / N torch threads, each loading the model and warming up untimed, then all started
together; the time is from the first start to the last finish. ``--session-processes N`` splits
the one-``Session``-per-image side the same way (a comparison at equal parallelism: what
batching adds beyond using every core). ``--lanes`` measures the one-process batched side with
that many lanes (``segment_items``' ``lanes``: batches on as many threads of this process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segllm.batch_segment import Item, segment_items
from segllm.config import MAX_NEW_TOKENS
from segllm.data.records import WorldConversations
from segllm.default import load_model
from segllm.export import from_rle
from segllm.session import Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[16], help="one or more batch sizes, each measured")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1],
                    help="also measure batch segmentation split over this many processes (as under torchrun: every "
                         "n-th image each, threads / n threads each); 1: in this process")
    ap.add_argument("--lanes", type=int, nargs="+", default=[1],
                    help="lanes of the batched side in one process (segment_items' lanes: batches answered at once on as "
                         "many threads, the torch threads shared out); each value measured (default: 1)")
    ap.add_argument("--session-processes", type=int, nargs="+", default=[],
                    help="also measure one Session per image split over this many processes (every n-th image each, "
                         "threads / n threads each)")
    ap.add_argument("--repeats", type=int, default=1, help="measure every side this many times, alternating (the load may change)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--edge-filter", default=None, choices=("on", "off"),
                    help="the bundled model's edge filter on or off on both sides (default: the model's setting, on)")
    ap.add_argument("--generate", action="store_true",
                    help="both sides let the model write its answers (segment_items' generate, as segllm segment --generate; "
                         "a Session's own answers) instead of answering every round '<seg>'; in this process only")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="longest generated answer, with --generate (default: %(default)s)")
    ap.add_argument("--worker", nargs=7, metavar=("ITEMS", "OUT", "BATCH", "RANK", "WORLD", "THREADS", "EDGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    if args.generate and (any(n > 1 for n in args.processes) or args.session_processes):
        ap.error("--generate is measured in this process only (no --processes above 1, no --session-processes)")
    gen = dict(generate=args.generate, max_new_tokens=args.max_new_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = load_model(edge_filter=_edge(args.edge_filter))
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
        items_file = Path(tmp) / "items.json"
        items_file.write_text(json.dumps([[it.key, it.image, it.questions] for it in items]))
        rounds = sum(len(it.questions) for it in items)
        # first calls (allocations, kernel choices for new shapes) outside every timing, both sides
        _sessions(model, items[:4], **gen)
        for bs in args.batch_size:
            for lanes in args.lanes:
                segment_items(model, items[: bs * lanes], Path(tmp) / f"warm{lanes}", batch_size=bs, progress=False, lanes=lanes, **gen)

        # (batch size, processes, lanes): lanes in one process; processes of one lane each
        batched = [(bs, n, lanes) for bs in args.batch_size for n in args.processes for lanes in (args.lanes if n == 1 else [1])]
        single_s: list[float] = []
        batched_s: dict[tuple[int, int, int], list[float]] = {side: [] for side in batched}
        replies: list[list[np.ndarray]] = []
        split_s: dict[int, list[float]] = {n: [] for n in args.session_processes}
        sides: list = ["session"] + batched + [("sessions", n) for n in args.session_processes]
        for rep in range(args.repeats):
            # alternate the order, so that a load that rises or falls during the run hits every side alike
            for side in sides if rep % 2 == 0 else sides[::-1]:
                if side == "session":
                    t0 = time.perf_counter()
                    replies = _sessions(model, items, **gen)
                    single_s.append(time.perf_counter() - t0)
                    continue
                if side[0] == "sessions":  # batch size 0: the worker runs one Session per image
                    split_s[side[1]].append(_processes(items_file, Path(tmp) / f"s{side[1]}_{rep}", 0, side[1], max(1, threads // side[1]),
                                                          args.edge_filter))
                    continue
                bs, n, lanes = side
                out = Path(tmp) / f"out{bs}x{n}x{lanes}_{rep}"
                if n == 1:
                    t0 = time.perf_counter()
                    segment_items(model, items, out, batch_size=bs, progress=False, lanes=lanes, **gen)
                    batched_s[side].append(time.perf_counter() - t0)
                else:
                    batched_s[side].append(_processes(items_file, out, bs, n, max(1, threads // n), args.edge_filter))
        done = {side: _results(Path(tmp) / f"out{side[0]}x{side[1]}x{side[2]}_0") for side in batched}
        done_rounds = {side: sum(len(rec["rounds"]) for rec in recs.values()) for side, recs in done.items()}

    single = sum(single_s)
    n_single = sum(len(r) for r in replies)
    result = {
        "images": len(items), "rounds_asked": rounds, "threads": threads, "repeats": args.repeats,
        "edge_filter": model.config.edge_filter.on,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "one_session_per_image": {"seconds": _round(single_s), "rounds": n_single, "images_per_s": round(len(items) * args.repeats / single, 2),
                                  "rounds_per_s": round(n_single * args.repeats / single, 2)},
        "batched": [
            {"batch_size": bs, "processes": n, "lanes": lanes, "threads_each": max(1, threads // (n * lanes)),
             "seconds": _round(batched_s[bs, n, lanes]), "rounds": done_rounds[bs, n, lanes],
             "images_per_s": round(len(items) * args.repeats / sum(batched_s[bs, n, lanes]), 2),
             "rounds_per_s": round(done_rounds[bs, n, lanes] * args.repeats / sum(batched_s[bs, n, lanes]), 2),
             "speedup": round(single / sum(batched_s[bs, n, lanes]), 2),
             "speedup_each": [round(s / b, 2) for s, b in zip(single_s, batched_s[bs, n, lanes])],
             "masks_identical": _agreement(done[bs, n, lanes], items, replies)}
            for bs, n, lanes in batched
        ],
        "sessions_split": [
            {"processes": n, "threads_each": max(1, threads // n), "seconds": _round(split_s[n]),
             "images_per_s": round(len(items) * args.repeats / sum(split_s[n]), 2),
             "batched_speedup_vs_it": {f"{bs}x{m}x{lanes}": round(sum(split_s[n]) / sum(batched_s[bs, m, lanes]), 2)
                                       for bs, m, lanes in batched}}
            for n in args.session_processes
        ],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _edge(flag: str | None) -> bool | None:
    """--edge-filter on/off -> True/False; not given ("default" in a worker's arguments) -> None."""
    return None if flag in (None, "default") else flag == "on"


def _processes(items_file: Path, out: Path, batch_size: int, n: int, threads_each: int, edge: str | None = None) -> float:
    """Batch segmentation in n worker processes (each every n-th image, as under torchrun): each
    loads the model and warms up untimed, then all start together; the wall-clock seconds from
    the first start to the last finish."""
    cmd = [sys.executable, __file__, "--worker", str(items_file), str(out), str(batch_size), "", str(n), str(threads_each), edge or "default"]
    procs = []
    for rank in range(n):
        cmd[-4] = str(rank)
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:  # each says "ready" once warm
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a worker failed to start (exit {p.wait()})")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    stamps = []
    for p in procs:
        out_text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        stamps.append(json.loads(out_text.strip().splitlines()[-1]))
    return max(s["end"] for s in stamps) - min(s["start"] for s in stamps)


def _worker(items_file: str, out: str, batch_size: str, rank: str, world: str, threads: str, edge: str) -> None:
    """One process of :func:`_processes`: what ``segllm segment`` does in one rank under torchrun."""
    torch.set_num_threads(int(threads))
    items = [Item(k, img, qs) for k, img, qs in json.loads(Path(items_file).read_text())]
    model = load_model(edge_filter=_edge(edge))
    bs = int(batch_size)
    if bs == 0:  # one Session per image, every world-th image from rank on
        _sessions(model, items[:2])
    else:
        segment_items(model, items[:bs], Path(out + f".warm{rank}"), batch_size=bs, progress=False, lanes=1)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()  # wall clock: compared across processes
    if bs == 0:
        _sessions(model, items[int(rank) :: int(world)])
    else:
        segment_items(model, items, Path(out), batch_size=bs, progress=False, rank=int(rank), world_size=int(world), lanes=1)
    print(json.dumps({"start": start, "end": time.time()}), flush=True)


def _sessions(model, items: list[Item], generate: bool = False, max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[np.ndarray]]:
    """One Session per item, every round answered ``"<seg>"`` (or, with ``generate``, as the
    model writes it): each item's masks, round by round ([k, H, W] each; k = 1 for ``"<seg>"``),
    stopping, as the batch does, at a reference to an empty mask."""
    replies = []
    for it in items:
        s = Session(model, it.image, max_new_tokens=max_new_tokens)
        masks = []
        for q in it.questions:
            try:
                masks.append(s.ask(q).masks if generate else s.ask(q, answer="<seg>").masks)
            except ValueError:  # a reference to an empty mask: the batch stopped there too
                break
        replies.append(masks)
    return replies


def _results(out: Path) -> dict[str, dict]:
    """Every process's result lines of a run, by image id."""
    return {rec["id"]: rec for p in sorted(out.glob("results.rank*.jsonl")) for rec in map(json.loads, p.read_text().splitlines())}


def _agreement(recs: dict[str, dict], items: list[Item], replies: list[list[np.ndarray]]) -> str:
    """'identical/compared' masks of a batched run against the sessions' (a round that only one
    side answered counts as compared and not identical)."""
    agree = total = 0
    for it, masks in zip(items, replies):
        got = recs[it.key]["rounds"]
        total += max(len(got), len(masks))
        agree += sum(len(g["masks"]) == len(want) and all(np.array_equal(from_rle(r), w) for r, w in zip(g["masks"], want))
                     for g, want in zip(got, masks))
    return f"{agree}/{total}"


def _round(seconds: list[float]) -> float | list[float]:
    """Total seconds (one measurement) or each measurement's seconds."""
    return round(seconds[0], 2) if len(seconds) == 1 else [round(s, 2) for s in seconds]


if __name__ == "__main__":
    main()
