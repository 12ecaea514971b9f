"""Conversations per second per core of the world generator: a reference copy of it (another
checkout, e.g. main before a change) and the one in use, timed in the same run, interleaved on the
same indices, on one thread; prints both rates and their ratio.

    python scripts/bench_world.py --reference /path/to/other/checkout [--n 200] [--repeats 3] \
        [--unit item|sample] [--json docs/results/bench_world.json]

The reference's world modules (``segllm/data/world/*.py`` under the given checkout) are loaded
under another module name, so both generators live in this process. Each timed unit is one
dataset item as training reads it (``WorldConversations[i]``: the sample, its conversation, dense
maps and candidate masks); the conversion around the sample is this checkout's for both. With
``--unit sample`` only the generator is timed (``World.sample``: scene, conversation, checks); the
items are then converted outside the timed part, for the same comparison of outputs. CPU time
of this process is what is measured (``time.process_time``), so other load on the machine slows
both alike; the outputs of the two are compared (a digest of every item) and must be equal.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

_WORLD_MODULES = ("draws", "scene", "language", "scene_index", "dataset", "dense")


def load_reference_world(checkout: str | os.PathLike, name: str = "_reference_world") -> types.ModuleType:
    """The world package of another checkout (``<checkout>/segllm/data/world``) as module ``name``.

    Its modules are executed from their source with ``segllm.data.world`` renamed to ``name``
    (other imports, e.g. ``segllm.errors``, are this checkout's); modules it does not have
    (older checkouts) are skipped.
    """
    root = Path(checkout) / "segllm" / "data" / "world"
    if not (root / "dataset.py").is_file():
        raise SystemExit(f"no world generator under {root}")
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root)]
    sys.modules[name] = pkg
    for mod in _WORLD_MODULES:
        path = root / f"{mod}.py"
        if not path.is_file():
            continue
        src = path.read_text().replace("segllm.data.world", name)
        full = f"{name}.{mod}"
        spec = importlib.util.spec_from_loader(full, loader=None, origin=str(path))
        m = importlib.util.module_from_spec(spec)
        m.__file__ = str(path)
        sys.modules[full] = m
        exec(compile(src, str(path), "exec"), m.__dict__)
        setattr(pkg, mod, m)
    return pkg


def _digest(item) -> str:
    h = hashlib.sha256()
    h.update(item.image.tobytes())
    for r in item.rounds:
        h.update(json.dumps([r.question, r.answer, list(r.refs)]).encode())
        for m in r.masks:
            h.update(np.packbits(m).tobytes())
    for k in sorted(item.dense):
        h.update(item.dense[k].tobytes())
    h.update(np.packbits(item.candidates).tobytes())
    h.update(json.dumps([item.named, {str(k): v for k, v in item.alternatives.items()}]).encode())
    return h.hexdigest()


def _describe(checkout) -> str:
    """The checkout's path and commit (with "+changes" when its package differs from the commit;
    other files, e.g. the results file this script writes, do not count), or just the path."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *a], capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "segllm")
    except OSError:
        return str(checkout)
    return f"{checkout} @ {commit}{'+changes' if dirty else ''}" if commit else str(checkout)


def _append_json(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a checkout whose generator is the baseline")
    ap.add_argument("--split", default="train")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=200, help="conversations per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=10, help="conversations per interleaved turn")
    ap.add_argument("--max-rounds", type=int, default=8, help="rounds kept per conversation (direct_full.toml: 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unit", choices=("item", "sample"), default="item",
                    help="what is timed: the dataset item as training reads it, or World.sample alone")
    ap.add_argument("--json", help="append this run's figures (and the load average) to a JSON list here")
    args = ap.parse_args()

    from segllm.data.records import WorldConversations
    from segllm.data.world import World, WorldConfig

    load_before = os.getloadavg()
    ref = load_reference_world(args.reference)
    end = args.start + args.n
    new = WorldConversations(args.split, end, seed=args.seed, config=WorldConfig(), max_rounds=args.max_rounds)
    old = WorldConversations(args.split, end, seed=args.seed, config=WorldConfig(), max_rounds=args.max_rounds)
    old.world = ref.dataset.World(ref.dataset.WorldConfig(), seed=args.seed)
    assert isinstance(new.world, World) and not isinstance(old.world, World)

    cpu = {"reference": 0.0, "this checkout": 0.0}
    digests: dict[str, dict[int, str]] = {k: {} for k in cpu}
    for rep in range(args.repeats):
        for c0 in range(args.start, end, args.chunk):
            idx = range(c0, min(end, c0 + args.chunk))
            turns = [("reference", old), ("this checkout", new)]
            if (rep + c0 // args.chunk) % 2:
                turns.reverse()  # alternate who goes first
            for name, data in turns:
                t = time.process_time()
                if args.unit == "item":
                    items = [data[i] for i in idx]
                    cpu[name] += time.process_time() - t
                else:
                    samples = [data.world.sample(args.split, i) for i in idx]
                    cpu[name] += time.process_time() - t
                    items = []
                    for i, s in zip(idx, samples):  # converted untimed (data.sample keeps the last)
                        data._last = (i, s)
                        items.append(data[i])
                if rep == 0:
                    digests[name].update({i: _digest(it) for i, it in zip(idx, items)})
    total = args.n * args.repeats
    same = digests["reference"] == digests["this checkout"]
    rate = {k: total / v for k, v in cpu.items()}
    print(f"world {args.split}[{args.start}:{end}] x{args.repeats}, max_rounds {args.max_rounds}, "
          f"1 thread, CPU time of this process, timed unit: "
          f"{'dataset item' if args.unit == 'item' else 'World.sample'}")
    for k in cpu:
        print(f"  {k:14s} {cpu[k]:8.2f} s CPU  {rate[k]:8.1f} conversations/s per core")
    print(f"  ratio (this checkout / reference): {rate['this checkout'] / rate['reference']:.2f}x")
    print(f"  same output on all {args.n} indices: {same}")
    if args.json:
        _append_json(Path(args.json), {
            "command": "python scripts/bench_world.py " + " ".join(sys.argv[1:]),
            "reference": _describe(args.reference), "this_checkout": _describe(Path(__file__).parents[1]),
            "unit": args.unit, "split": args.split, "start": args.start, "n": args.n,
            "repeats": args.repeats, "max_rounds": args.max_rounds, "threads": 1,
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "conversations_per_s_per_core": {k: round(v, 1) for k, v in rate.items()},
            "ratio": round(rate["this checkout"] / rate["reference"], 3), "same_output": same,
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "cpu_count": os.cpu_count(),
        })
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
