"""The best a mask decoder's output grid allows: the ground-truth masks of world conversations put
into the decoder's output frame at each given side (area-averaged, as the training targets are),
then brought back to the image the way a prediction is (bilinear on logits, threshold at 0), and
scored against themselves. A decoder whose masks score well below this is limited by what it
learned, not by its output resolution.

    python scripts/mask_ceiling.py [--split test] [--size 200] [--sides 32 64 128]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from segllm.data.records import WorldConversations
from segllm.decoders.base import Frame, logits_to_image, masks_to_frame


def ceiling(masks: list[np.ndarray], side: int, frame_size: int) -> dict[str, float]:
    """cIoU, mean IoU and P@0.9 (percent) of ``masks`` ([H, W] bool each) after a round trip
    through a ``side`` x ``side`` output grid of a decoder whose input frame is ``frame_size``."""
    inter = union = 0
    ious = []
    for m in masks:
        fr = Frame.fit(m.shape[0], m.shape[1], frame_size)
        soft = masks_to_frame(torch.from_numpy(m)[None], fr, side)  # [1, side, side] in [0, 1]
        back = (logits_to_image(soft - 0.5, fr) > 0)[0].numpy()  # a logit map whose sign is the target's
        i, u = int((back & m).sum()), int((back | m).sum())
        inter, union = inter + i, union + u
        ious.append(i / max(u, 1))
    ious_a = np.array(ious)
    return {"cIoU": 100 * inter / max(union, 1), "mIoU": 100 * float(ious_a.mean()), "P@0.9": 100 * float((ious_a >= 0.9).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--size", type=int, default=200, help="conversations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frame", type=int, default=128, help="the decoder's input frame side (the bundled model's: 128)")
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128], help="output grid sides to try")
    args = ap.parse_args()
    data = WorldConversations(args.split, args.size, seed=args.seed)
    masks = [m for i in range(len(data)) for r in data[i].rounds for m in r.masks]
    print(f"world {args.split}[0:{args.size}], seed {args.seed}: {len(masks)} target masks, decoder frame {args.frame}")
    for side in args.sides:
        r = ceiling(masks, side, args.frame)
        print(f"output {side}x{side}: cIoU {r['cIoU']:.1f}, mean IoU {r['mIoU']:.1f}, P@0.9 {r['P@0.9']:.1f}%")


if __name__ == "__main__":
    main()
