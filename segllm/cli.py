"""The ``segllm`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from segllm.errors import SegLLMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segllm", description="Multi-round reasoning segmentation with mask memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="segment objects in an image, round by round")
    chat.add_argument("image", nargs="?", help="image file (default: the bundled example image)")
    chat.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                      help="a round's question; repeat for more rounds; '[REF:k]' or 'instance k' refers to round k")
    chat.add_argument("--checkpoint", help="model folder (default: the bundled model)")
    chat.add_argument("--out", default="segllm-out", help="folder for overlays and masks (default: %(default)s)")
    chat.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    chat.add_argument("--max-new-tokens", type=int, default=32)
    chat.set_defaults(func=_chat)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except SegLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _chat(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from segllm.conversation import Conversation, Round, load_image, parse_refs
    from segllm.default import EXAMPLES, load_model
    from segllm.viz import overlay

    questions = list(args.ask)
    image_path = args.image
    if image_path is None:
        image_path = EXAMPLES / "shapes.png"
        if not questions:
            questions = json.loads((EXAMPLES / "shapes.json").read_text())["questions"]
    if not questions:
        print("error: give at least one --ask QUESTION", file=sys.stderr)
        return 2
    image = load_image(image_path)
    model = load_model(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conv = Conversation(image, [])
    shown: list[tuple[int, np.ndarray]] = []
    for n, q in enumerate(questions, start=1):
        text, refs = parse_refs(q)
        conv.rounds.append(Round(text, refs))
        pred = model.predict(conv, max_new_tokens=args.max_new_tokens)
        if not pred.masks.shape[0]:
            # the model answered without <seg>: ask for one mask, as the released demo always does
            pred = model.predict(conv, answer="<seg>")
        conv.rounds[-1] = Round(text, refs, pred.text, list(pred.masks))
        for j, m in enumerate(pred.masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(out / f"round{n}_mask{j + 1}.png")
        shown += [(n, m) for m in pred.masks]
        overlay(image, shown).save(out / f"round{n}_overlay.png")
        boxes = ", ".join(f"[{', '.join(f'{v:.0f}' for v in b)}] score {s:.2f}" for b, s in zip(pred.boxes, pred.scores))
        ref_note = f" (refers to {', '.join(map(str, refs))})" if refs else ""
        print(f"round {n}{ref_note}: {text}\n  -> {pred.text!r}  {boxes}")
    print(f"overlays and masks written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
