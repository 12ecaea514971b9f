"""Building training batches (``SegLLM.prepare``: tokens, image and memory-crop preprocessing,
mask targets) per conversation: a reference checkout and this one, timed in the same run.

On a lent GPU the bundled recipe was limited by the CPU workers that build batches, not by the
GPU (README, "The bundled default model"), and ``prepare`` costs more than generating the
conversations. Both checkouts build batches of the same world conversations with the bundled
model's configuration, one thread each, in separate processes started alternately (each
measures its own CPU time, ``time.process_time``); the batches' tensors are compared. A
checkout whose batches carry the memory crops as uint8, to be preprocessed on the model's device
(where a GPU does it in one product), is timed without that step, as a data-loader worker runs.

    python scripts/bench_prepare.py --reference /path/to/other/checkout [--conversations 256] [--repeats 3] [--json FILE]
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


def _worker(n: int, batch: int, out: str) -> None:
    """Runs inside one checkout: CPU seconds per conversation of ``prepare``, and a digest of
    the batches' tensors written to ``out``."""
    import torch

    torch.set_num_threads(1)
    from segllm.data.records import WorldConversations
    from segllm.data.world import WorldConfig
    from segllm.default import load_model

    model = load_model()
    data = WorldConversations("train", n, seed=0, config=WorldConfig(), max_rounds=8)
    convs = [data[i] for i in range(n)]
    for start in range(0, n, batch):  # a first pass untimed: allocations, per-size tables (a training run's steady state)
        model.prepare(convs[start : start + batch])
    spent, tensors = 0.0, {}
    for start in range(0, n, batch):
        t = time.process_time()
        b = model.prepare(convs[start : start + batch])
        spent += time.process_time() - t
        for k, v in vars(b).items():
            if isinstance(v, torch.Tensor) and k not in ("memory_crops", "memory_sides"):
                tensors[f"{start}.{k}"] = v
        # the memory crops' vision input, wherever it is made (a checkout that leaves it to the
        # model's device hands over the uint8 crops): compared, not timed
        tensors[f"{start}.memory_pixels"] = b.memory_inputs(model.vision) if hasattr(b, "memory_inputs") else b.memory_pixels
    torch.save(tensors, out)
    print(json.dumps({"cpu_s_per_conversation": spent / n}))


def _run(checkout: Path, n: int, batch: int, out: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, __file__, "--worker", str(n), str(batch), out], env=env, cwd=checkout,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{checkout}: worker failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["cpu_s_per_conversation"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", help="a checkout whose prepare is the baseline")
    ap.add_argument("--conversations", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="conversations per prepare call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="append the figures to a JSON list here")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    import torch

    here = Path(__file__).resolve().parents[1]
    sides = {"reference": Path(args.reference).resolve(), "this checkout": here}
    times: dict[str, list[float]] = {k: [] for k in sides}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = list(sides) if rep % 2 == 0 else list(sides)[::-1]  # alternate who goes first
            for name in order:
                times[name].append(_run(sides[name], args.conversations, args.batch, f"{tmp}/{name.replace(' ', '_')}.pt"))
        a = torch.load(f"{tmp}/reference.pt")
        b = torch.load(f"{tmp}/this_checkout.pt")
    worst = {}
    for k in a:
        x, y = a[k], b.get(k)
        if y is None or x.shape != y.shape or x.dtype != y.dtype:
            raise SystemExit(f"batches differ in {k}")
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        worst[k.split(".", 1)[1]] = max(worst.get(k.split(".", 1)[1], 0.0), d)
    best = {k: min(v) for k, v in times.items()}
    ratio = best["reference"] / best["this checkout"]
    print(f"prepare, {args.conversations} world train conversations in batches of {args.batch}, 1 thread, CPU time:")
    for k, v in times.items():
        print(f"  {k:14s} " + "  ".join(f"{1e3 * t:.2f}" for t in v) + f"  ms a conversation (best {1e3 * best[k]:.2f})")
    print(f"  ratio (reference / this checkout, best of each): {ratio:.2f}x")
    print("  largest difference per tensor: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items() if v))
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.is_file() else []
        rows.append({"command": "python scripts/bench_prepare.py " + " ".join(sys.argv[1:]), "conversations": args.conversations,
                     "batch": args.batch, "ms_per_conversation": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()},
                     "ratio_best": round(ratio, 3), "max_abs_difference": worst,
                     "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]})
        path.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
