"""What one data-loader worker delivers: conversations per second per core of the training data
pipeline (the world generator, then ``model.prepare``: tokenising, crops for the mask memory,
mask targets, dense maps), and the bytes of the batches it hands over; optionally beside another
checkout, measured in the same run.

    python scripts/bench_data.py [--reference /path/to/other/checkout] [--n 256] [--batch 128] \
        [--repeats 3] [--json docs/results/bench_data.json]

Each side runs in its own fresh process (the checkout's own ``segllm`` package, loaded from its
folder), one thread, on the same conversations (world train split, the bundled recipe's world:
``multi_target_prob`` 0.15, up to 8 rounds) with the same model (the bundled default model of that
checkout). 128 untimed conversations first (caches, first-call costs), then ``--n`` conversations
generated and prepared in batches of ``--batch``; CPU time of the process (``time.process_time``),
so other load on the machine slows both alike. With ``--reference`` the two sides alternate,
``--repeats`` times each, and every ratio is this checkout's rate over the reference's in the
same repeat. On a GPU, training with W workers is fed at most about W times the pipeline rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import importlib.util, json, os, sys, time
# this checkout's package, whatever is installed (an editable install's finder would win over
# PYTHONPATH): the package is loaded from its folder, its submodules then follow its __path__
_pkg = os.path.join(os.environ["SEGLLM_BENCH_CHECKOUT"], "segllm")
_spec = importlib.util.spec_from_file_location("segllm", os.path.join(_pkg, "__init__.py"), submodule_search_locations=[_pkg])
segllm = importlib.util.module_from_spec(_spec)
sys.modules["segllm"] = segllm
_spec.loader.exec_module(segllm)
import torch
torch.set_num_threads(1)
from segllm.data.records import WorldConversations
from segllm.data.world import WorldConfig
from segllm.default import load_model

n, batch = int(sys.argv[1]), int(sys.argv[2])
model = load_model()
model.train()
data = WorldConversations("train", 10**6, seed=0, config=WorldConfig(multi_target_prob=0.15), max_rounds=8)
warm = [data[i] for i in range(10**5, 10**5 + 128)]  # fills the generator's and the processor's caches, as a long run has them
model.prepare(warm)
t0 = time.process_time()
convs = [data[i] for i in range(n)]
t1 = time.process_time()
nbytes = 0
for s in range(0, n, batch):
    b = model.prepare(convs[s:s + batch])
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in vars(b).values() if isinstance(v, torch.Tensor) and v.numel()}
    nbytes += sum(storages.values())  # a tensor two fields share is handed over once
t2 = time.process_time()
print(json.dumps({"package": os.path.dirname(segllm.__file__), "generate_s": t1 - t0, "prepare_s": t2 - t1,
                  "bytes": nbytes}))
"""


def run_side(checkout: Path, n: int, batch: int) -> dict:
    """One measurement in a fresh process with ``checkout``'s package first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SEGLLM_BENCH_CHECKOUT=str(checkout))
    out = subprocess.run([sys.executable, "-c", _WORKER, str(n), str(batch)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the measurement in {checkout} failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = (checkout / "segllm").resolve()
    if Path(got["package"]).resolve() != expected:
        raise SystemExit(f"measured the package at {got['package']}, not {expected}")
    total = got["generate_s"] + got["prepare_s"]
    return {
        "generate_ms_per_conv": round(1e3 * got["generate_s"] / n, 3),
        "prepare_ms_per_conv": round(1e3 * got["prepare_s"] / n, 3),
        "conversations_per_s_per_core": round(n / total, 1),
        "batch_mib_per_conv": round(got["bytes"] / n / 2**20, 3),
    }


def _describe(checkout: Path) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *a], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "segllm")
    return f"{checkout} @ {commit}{'+changes' if dirty else ''}" if commit else str(checkout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", help="another checkout, measured beside this one")
    ap.add_argument("--n", type=int, default=256, help="conversations per measurement")
    ap.add_argument("--batch", type=int, default=128, help="conversations per prepared batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="append this run's figures (and the load average) to a JSON list here")
    args = ap.parse_args()
    if args.n < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("--n, --batch and --repeats must be >= 1")
    sides = {"this": ROOT}
    if args.reference:
        ref = Path(args.reference).resolve()
        if not (ref / "segllm" / "batch.py").is_file():
            raise SystemExit(f"no segllm package under {ref}")
        sides["reference"] = ref
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for rep in range(args.repeats):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]  # alternate: a changing load hits both
        for name in order:
            runs[name].append(run_side(sides[name], args.n, args.batch))
    result = {"n": args.n, "batch": args.batch, "repeats": args.repeats, "threads": 1,
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    for name, rs in runs.items():
        result[name] = {"checkout": _describe(sides[name]), "runs": rs,
                        **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
    if args.reference:
        ratios = [t["conversations_per_s_per_core"] / r["conversations_per_s_per_core"]
                  for t, r in zip(runs["this"], runs["reference"])]
        prep = [r["prepare_ms_per_conv"] / t["prepare_ms_per_conv"] for t, r in zip(runs["this"], runs["reference"])]
        result["pipeline_ratio_each"] = [round(x, 2) for x in ratios]
        result["prepare_ratio_each"] = [round(x, 2) for x in prep]
    print(json.dumps(result, indent=1))
    for name in runs:
        r = result[name]
        print(f"{name:10s} generate {r['generate_ms_per_conv']:.2f} ms + prepare {r['prepare_ms_per_conv']:.2f} ms a conversation: "
              f"{r['conversations_per_s_per_core']:.1f} conversations/s per core, {r['batch_mib_per_conv']:.2f} MiB of batch each")
    if args.reference:
        print(f"this / reference, same repeats: pipeline {result['pipeline_ratio_each']}, prepare alone {result['prepare_ratio_each']}")
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.is_file() else []
        rows.append(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
