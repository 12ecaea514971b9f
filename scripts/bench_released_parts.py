"""Time the released model's parts other than the LLM at full size, on this machine.

Full-size HIPIE-R50 (the released decoder) and CLIP ViT-L/14 at 224 px (the vision tower), with
random weights (speed does not depend on the values), fp32. One round of the released model
outside the 7B LLM is: HIPIE's image encoding (once per image; a session caches it), CLIP on the
image (once per image) and on one mask crop, and HIPIE's prompt-dependent part for one <seg>.

    python scripts/bench_released_parts.py --threads 2 --repeats 3 --out docs/results/bench_released_parts.json

Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import CLIPVisionConfig, CLIPVisionModel

    from segllm.decoders.hipie import HipieDecoder, HipieDecoderConfig
    from segllm.model.released import _KNOWN_VISION

    decoder = HipieDecoder(HipieDecoderConfig()).eval()
    clip_cfg = {k: v for k, v in _KNOWN_VISION["openai/clip-vit-large-patch14"].items() if k != "model_type"}
    clip = CLIPVisionModel(CLIPVisionConfig(**clip_cfg)).eval()

    image = torch.randint(0, 256, (3, 768, 1024), dtype=torch.uint8)
    pixels = decoder.preprocess(image)[0][None]
    prompts = torch.randn(1, 8, 768) * 0.5
    clip_in = torch.randn(2, 3, 224, 224)  # the image and one mask crop
    with torch.no_grad():
        features = decoder.encode_image(pixels)
        t_encode = timed(lambda: decoder.encode_image(pixels), args.repeats)
        t_prompt = timed(lambda: decoder(features, prompts, torch.zeros(1, dtype=torch.long)), args.repeats)
        t_full = timed(lambda: decoder(decoder.encode_image(pixels), prompts, torch.zeros(1, dtype=torch.long)), args.repeats)
        t_clip = timed(lambda: clip(pixel_values=clip_in, output_hidden_states=True), args.repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "hipie_image_encoding_s": round(t_encode, 3),
        "hipie_per_prompt_s": round(t_prompt, 3),
        "hipie_full_forward_s": round(t_full, 3),
        "clip_image_plus_crop_s": round(t_clip, 3),
        "round_first_s": round(t_full + t_clip, 3),
        "round_later_s": round(t_prompt + t_clip / 2, 3),
        # no ratio to the original's HIPIE: a figure from another run, machine and load cannot be
        # divided by (issue 18); a same-run reference mode is what such a ratio needs
        "peak_rss_mb": round(peak_mb),
    }
    from segllm.bench import report

    report(result, args.out)


if __name__ == "__main__":
    main()
