"""8-bit and 4-bit LLM weights against bfloat16 and float32, measured in one run.

For each model (the bundled one; the released checkpoint's miniature from the golden fixture,
where present) and each setting, it reports the LLM decoder's weight bytes, the seconds per
incremental round of a Session, and how well the masks agree with the bfloat16 model's (IoU per
mask, two empty masks agreeing). Every figure comes from this run.

    python scripts/bench_quantize.py --json docs/results/bench_quantize.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segllm import SegLLM  # noqa: E402
from segllm.data.records import WorldConversations  # noqa: E402
from segllm.default import DEFAULT_MODEL  # noqa: E402
from segllm.errors import MaskError  # noqa: E402
from segllm.eval.metrics import mask_scores  # noqa: E402
from segllm.model.quantize import llm_weight_bytes  # noqa: E402
from segllm.session import Session  # noqa: E402
from tests.helpers import RELEASED_FIXTURES  # noqa: E402

SETTINGS = [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
            ("8bit", torch.bfloat16, "8bit"), ("4bit", torch.bfloat16, "4bit")]
RELEASED_QUESTIONS = ["Segment the person on the left.", "Segment the chair next to instance 1.[REF:1]",
                      "Segment the table near instance 2.[REF:2]"]


def _run(model: SegLLM, work: list[tuple[np.ndarray, list[tuple[str, tuple]]]]) -> tuple[list[np.ndarray], float, int, int]:
    """Every conversation of ``work`` through an incremental Session (answers forced to "<seg>"):
    (each round's mask, seconds per round, rounds answered, rounds refused). A round that refers
    to an earlier round whose mask came out empty is refused (MaskError); it and the rest of its
    conversation count as empty masks."""
    masks, seconds, rounds, refused = [], 0.0, 0, 0
    for image, questions in work:
        session = Session(model, image)
        for n, (q, refs) in enumerate(questions):
            t = time.perf_counter()
            try:
                reply = session.ask(q, refs=refs or None, answer="<seg>")
            except MaskError:
                empty = np.zeros(image.shape[:2], bool)
                masks += [empty] * (len(questions) - n)
                refused += len(questions) - n
                break
            seconds += time.perf_counter() - t
            rounds += 1
            masks.append(reply.masks[0])
    return masks, seconds / max(rounds, 1), rounds, refused


def bench(name: str, path: Path, work) -> list[dict]:
    rows, reference = [], {}
    for label, dtype, quantize in SETTINGS:
        model = SegLLM.from_pretrained(path, dtype=dtype, quantize=quantize)
        masks, per_round, rounds, refused = _run(model, work)
        reference.setdefault(label, masks)
        row = {"model": name, "setting": label, "llm_weight_mb": round(llm_weight_bytes(model) / 2**20, 2),
               "s_per_round": round(per_round, 4), "rounds": rounds, "refused": refused}
        for base in ("float32", "bfloat16"):
            if base in reference and base != label:
                ious = [mask_scores(b, a)[2] for a, b in zip(reference[base], masks)]
                row[f"iou_vs_{base}_mean"] = round(float(np.mean(ious)), 4)
                row[f"iou_vs_{base}_min"] = round(float(np.min(ious)), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=8, help="world test conversations for the bundled model")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--bundled-only", action="store_true", help="skip the released miniature (~4 minutes)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ds = WorldConversations("test", args.conversations)
    convs = [ds[i] for i in range(args.conversations)]
    rows = bench("bundled", DEFAULT_MODEL, [(c.image, [(r.question, r.refs) for r in c.rounds]) for c in convs])
    tiny = RELEASED_FIXTURES / "segllm_tiny" / "checkpoint"
    if (tiny / "model.safetensors").exists() and not args.bundled_only:
        from safetensors.torch import load_file

        photo = load_file(RELEASED_FIXTURES / "hipie/inputs.safetensors")["image_rgb_uint8"].numpy()
        rows += bench("released miniature (random weights)", tiny, [(photo, [(q, ()) for q in RELEASED_QUESTIONS])])
    if args.json:
        meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
