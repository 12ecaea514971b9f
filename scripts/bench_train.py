"""Training throughput and peak memory of a recipe on this machine.

Runs ``--steps`` optimizer steps of RECIPE (after ``--warmup`` untimed ones) into a temporary
folder and prints conversations per second, seconds per step and the process's peak resident
memory (CPU) or peak allocated GPU memory. Checkpoints and evaluation are switched off.

    python scripts/bench_train.py configs/default.toml --steps 20 --threads 2 --out docs/results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the recipe's setting)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (TOML)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--plain-linear", action="store_true",
                        help="linear layers with F.linear only (segllm.linear off): the baseline of the oneDNN products")
    args = parser.parse_args()

    import tomllib

    import torch

    from segllm import linear
    from segllm.train.recipe import TrainRecipe
    from segllm.train.trainer import train

    if args.plain_linear:
        linear.set_enabled(False)

    overrides = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (kv.split("=", 1) for kv in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        base = {**overrides, "output_dir": tmp, "eval_every": 0, "save_every": 0, "log_every": 1}
        if args.threads:
            base["threads"] = args.threads
        recipe = TrainRecipe.load(args.recipe, {**base, "steps": args.warmup + args.steps})
        # timed by the trainer's own log: the rate over the steps after the warm-up ones
        start = time.perf_counter()
        train(recipe, progress=False)
        total = time.perf_counter() - start
        log = [json.loads(line) for line in open(f"{tmp}/log.jsonl")]
    # the log's rate is cumulative (conversations since the start / seconds since the start):
    # recover the clock at each step and time only the steps after the warm-up ones
    seen = {b["step"]: b["step"] * recipe.batch_size for b in log}
    clock = {b["step"]: seen[b["step"]] / b["conv_per_s"] for b in log}
    w, e = args.warmup, args.warmup + args.steps
    rate = (seen[e] - seen[w]) / (clock[e] - clock[w]) if w in clock and e in clock else float("nan")
    peak = (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "recipe": args.recipe,
        "overrides": overrides,
        "batch_size": recipe.batch_size,
        "threads": recipe.threads,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "steps_timed": args.steps,
        "linear_layers": "F.linear" if args.plain_linear else "oneDNN where it applies (segllm.linear)",
        "conversations_per_s": round(rate, 2),
        "seconds_per_step": round(recipe.batch_size / rate, 3) if rate == rate and rate > 0 else None,
        "wall_s_including_setup": round(total, 1),
        "peak_memory_mb": round(peak),
    }
    from segllm.bench import report

    report(result, args.out)


if __name__ == "__main__":
    main()
