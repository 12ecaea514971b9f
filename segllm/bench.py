"""``segllm bench``: per-round latency of a conversation, incremental vs full recompute.

Each (model, mode) runs in a fresh process so peak memory (resident set size) is its own.
Rounds use teacher-forced one-mask answers, so both modes do the same work per round and the
latency does not depend on what a model happens to generate.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from segllm.bench_released import ReleasedShape, released_table, run_released
from segllm.conversation import load_image
from segllm.default import EXAMPLES, load_model
from segllm.model.builder import build_segllm
from segllm.presets import llama_config
from segllm.session import Session

QUESTIONS = [
    "Segment the cross.",
    "Segment the largest object left of instance 1.",
    "Where is the object that has the colour of instance 2?",
    "Segment the house lower than instance 3.",
    "Find the tree closest to instance 2.",
    "Now segment the part of instance 4 that is cyan.",
    "Segment the large object that is not shaped like instance 3.",
    "Now segment the house that is closest to instance 7.",
]


def _large_model(width: int, layers: int):
    """The bundled model's parts with a LLaMA of the released model's width (few layers), random.

    Its random LLM states can give a round an empty mask, which a later round that refers to it
    cannot use (the session refuses such a reference), so each [SEG] map is shifted to peak at +1
    (one more elementwise operation per round, the same work otherwise)."""
    base = load_model()
    cfg = copy.deepcopy(base.config)
    cfg.llm.hf_config = llama_config(vocab_size=len(base.tokenizer), hidden=width, layers=layers, heads=32, ffn=11008, context=4096)
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(base.tokenizer))
    model.decoder.register_forward_hook(_never_empty)
    return model


def _never_empty(module, args, out):
    out.mask_logits = out.mask_logits - out.mask_logits.amax(dim=(-2, -1), keepdim=True) + 1.0
    return out


def _run(args) -> dict:
    name, incremental, rounds, repeats, threads, width, layers, device, dtype = args

    if threads:
        torch.set_num_threads(threads)
    model = load_model() if name == "bundled" else _large_model(width, layers)
    model.to(device=device, dtype=getattr(torch, dtype)).eval()
    image = load_image(EXAMPLES / "shapes.png")
    times = np.zeros((repeats, rounds))
    set_image = []
    for rep in range(repeats + 1):  # the first pass warms up
        t0 = time.perf_counter()
        s = Session(model, image, incremental=incremental)
        t_img = time.perf_counter() - t0
        for k in range(rounds):
            t = time.perf_counter()
            s.ask(QUESTIONS[k % len(QUESTIONS)], answer="<seg>")
            if rep:
                times[rep - 1, k] = time.perf_counter() - t
        if rep:
            set_image.append(t_img)
    return {
        "model": name,
        "mode": "incremental" if incremental else "full",
        "round_ms": [float(v) * 1000 for v in np.median(times, axis=0)],
        "set_image_ms": float(np.median(set_image)) * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "device": device,
        "dtype": dtype,
    }


def run(
    *, rounds: int = 8, repeats: int = 3, threads: int = 0, large: bool = True, width: int = 4096, layers: int = 2,
    device: str = "cpu", dtype: str = "float32",
) -> list[dict]:
    """Per-round latency of each (model, mode), each in its own process; ``dtype`` is a torch dtype's
    name ("float32", "bfloat16", "float16"), passed by name to the spawned process."""
    jobs = [("bundled", inc, rounds, repeats, threads, width, layers, device, dtype) for inc in (True, False)]
    if large:
        jobs += [("large-llm", inc, rounds, max(1, repeats - 1), threads, width, layers, device, dtype) for inc in (True, False)]
    ctx = mp.get_context("spawn")
    results = []
    for job in jobs:
        with ctx.Pool(1) as pool:
            results.append(pool.apply(_run, (job,)))
    return results


def table(results: list[dict]) -> str:
    lines = []
    by = {(r["model"], r["mode"]): r for r in results}
    for model in dict.fromkeys(r["model"] for r in results):
        inc, full = by.get((model, "incremental")), by.get((model, "full"))
        lines.append(f"\n{model} ({inc['params_m']:.1f}M parameters, {inc.get('dtype', 'float32')} on {inc.get('device', 'cpu')})")
        lines.append("| round | incremental ms | full recompute ms |")
        lines.append("|---|---|---|")
        for k, (a, b) in enumerate(zip(inc["round_ms"], full["round_ms"]), start=1):
            lines.append(f"| {k} | {a:.1f} | {b:.1f} |")
        n = len(inc["round_ms"])
        lines.append(
            f"set_image: {inc['set_image_ms']:.1f} ms incremental (features + prefix cache), {full['set_image_ms']:.1f} ms full; "
            f"round {n} / round 1 (incremental): {inc['round_ms'][-1] / inc['round_ms'][0]:.2f}x; "
            f"full / incremental at round {n}: {full['round_ms'][-1] / inc['round_ms'][-1]:.2f}x; "
            f"peak RSS: {inc['peak_rss_mb']:.0f} MB incremental, {full['peak_rss_mb']:.0f} MB full"
        )
    return "\n".join(lines)


def main(args) -> int:
    if getattr(args, "released_shape", False):
        return released_main(args)
    results = run(rounds=args.rounds or 8, repeats=args.repeats, threads=args.threads, large=not args.no_large, width=args.width,
                  layers=args.layers or 2, device=args.device, dtype=args.dtype)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def released_main(args) -> int:
    """``segllm bench --released-shape``: see :mod:`segllm.bench_released`. The JSON (``--json``)
    is rewritten after each setting, so a run stopped part way keeps what it measured."""
    shape = ReleasedShape().with_llm(width=args.width, layers=args.layers)
    settings = tuple(args.setting or ("bfloat16", "8bit"))
    meta = {"command": "segllm " + " ".join(sys.argv[1:]), "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "weights": "random (no download); masks compare two settings of the same random model"}
    done: list[dict] = []

    def write(rep: dict) -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"meta": meta, **rep}, indent=1) + "\n")

    def partial(result: dict) -> None:
        done.append(result)
        gpu = "" if result.get("peak_gpu_mb") is None else f", peak GPU memory {result['peak_gpu_mb'] / 1024:.1f} GB"
        print(f"{result['setting']}: done (peak RSS {result['peak_rss_mb'] / 1024:.1f} GB{gpu})", flush=True)
        write({"results": done, "mask_iou_vs_bfloat16": {}})

    rep = run_released(settings=settings, shape=shape, rounds=args.rounds or 4, threads=args.threads, device=args.device or "cpu",
                       tokenizer=args.tokenizer, image=args.image, on_result=partial, masks_dir=args.masks_dir,
                       warmup=args.warmup, compile=args.compile)
    write(rep)
    print(released_table(rep))
    return 0


def report(result: dict, out: str | None = None) -> None:
    """Print a benchmark script's result as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
