"""float32 linear layers on this CPU: torch's default ``F.linear`` (MKL's sgemm) against oneDNN's
kernel (``segllm.linear``), on the shapes the models run, timed alternately in one run.

    python scripts/bench_linear.py --threads 2 [--repeats 5] [--json docs/results/bench_linear.json]

Prints each shape's GFLOP/s both ways and their ratio, which of the two ``segllm.linear`` picks
for it (oneDNN from ``MIN_MACS`` multiply-adds up), and the largest difference of the two results
relative to the output's scale (float32 rounding: another summation order).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from segllm import linear as lin

# (rows, in, out, where it occurs)
SHAPES = [
    (1, 256, 768, "bundled LLM, one generated token (MLP up)"),
    (20, 256, 768, "bundled LLM, a Session's round (MLP up)"),
    (1184, 256, 768, "bundled LLM, a batch's round: 32 rows x 37 tokens (MLP up)"),
    (1184, 768, 256, "bundled LLM, a batch's round (MLP down)"),
    (2112, 256, 256, "bundled LLM, a batch's prefix (attention projection)"),
    (1024, 256, 2048, "HIPIE encoder FFN in, one chunk of 1,024 tokens"),
    (1024, 2048, 256, "HIPIE encoder FFN out"),
    (21760, 256, 256, "HIPIE value projection, a 1024 px image"),
    (290, 4096, 4096, "7B LLaMA, a 290-token prefix (attention projection)"),
]


def _time(fn, repeats: int) -> float:
    """Median seconds of one call over ``repeats`` timings of enough calls to take ~0.2 s."""
    fn()
    t = time.perf_counter()
    fn()
    calls = max(1, int(0.2 / max(time.perf_counter() - t, 1e-6)))
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not lin.available():
        raise SystemExit("this torch has no oneDNN linear kernel: nothing to compare")
    torch.manual_seed(0)

    def onednn(x, w, b):
        return lin._OP(x, w, b, "none", [], "")

    rows = []
    print(f"{'rows x in -> out':>22} | F.linear GFLOP/s | oneDNN GFLOP/s | ratio | segllm uses | max diff / scale | where")
    with torch.no_grad():
        for m, k, n, where in SHAPES:
            x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
            plain_s = onednn_s = None
            for _ in range(2):  # alternating: a change in load meets both
                plain_s = _time(lambda x=x, w=w, b=b: F.linear(x, w, b), args.repeats)
                onednn_s = _time(lambda x=x, w=w, b=b: onednn(x, w, b), args.repeats)
            ref = F.linear(x, w, b)
            diff = float((onednn(x, w, b) - ref).abs().max() / ref.abs().max())
            flop = 2 * m * k * n
            row = {"rows": m, "in": k, "out": n, "where": where, "f_linear_gflops": round(flop / plain_s / 1e9, 1),
                   "onednn_gflops": round(flop / onednn_s / 1e9, 1), "ratio": round(plain_s / onednn_s, 2),
                   "max_diff_over_scale": float(f"{diff:.1e}"), "segllm_uses": "oneDNN" if m * k * n >= lin.MIN_MACS else "F.linear"}
            rows.append(row)
            print(f"{m:>6} x {k:>5} -> {n:>5} | {row['f_linear_gflops']:>16} | {row['onednn_gflops']:>14} | {row['ratio']:>5} | {row['segllm_uses']:>11} | {row['max_diff_over_scale']:>16} | {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
                       "shapes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
