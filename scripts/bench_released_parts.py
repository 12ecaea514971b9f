"""Time the released model's parts other than the LLM at full size, on this machine.

Full-size HIPIE-R50 (the released decoder) and CLIP ViT-L/14 at 224 px (the vision tower), with
random weights (speed does not depend on the values). HIPIE runs in three modes, alternating
within every repeat so that all see the same load:

* ``reference``: our HIPIE computing as the original does (``HipieDecoder.set_reference``):
  float32, the original's pure-PyTorch deformable sampling, full-width fusion projections, and
  the image encoded again for every prompt (the original caches nothing across prompts);
* ``fast``: the default mode, float32; the image encoded once and its prompts decoded in one
  batched call;
* ``fast_bf16``: the fast mode on a bfloat16 copy of the weights (convolutions channels-last);
  its masks are compared with the reference's (IoU of the selected [SEG] masks);
* ``fast_compiled`` (with ``--compile``): the fast mode with ``HipieDecoder.set_compiled``
  (``torch.compile`` of the image encoding and the encoder layers); its first forward, which
  compiles, is timed on its own (``compile_first_forward_s``) and not counted.

Every time is the median over ``--repeats`` and is split by stage (image encoding; the fusion
encoder; two-stage selection + decoder; heads, masks and post-processing). Every ratio divides
two medians of this run; nothing measured elsewhere is divided by.

    python scripts/bench_released_parts.py --threads 2 --repeats 3 --prompts 2 --out docs/results/bench_released_parts.json

Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import time
from dataclasses import replace

import torch

STAGES = ("image", "encoder", "decoder", "heads")


class StageClock:
    """Marks taken by forward hooks on the transformer's encoder and decoder.

    One prompt-dependent call then splits into encoder (fusion + encoder layers), decoder
    (two-stage selection + decoder layers) and heads (everything else: before the encoder and
    after the decoder). The fast mode's CPU inference runs the transformer once per prompt, so
    the stages' times are summed over every encoder and decoder call since :meth:`reset`.
    """

    def __init__(self, decoder) -> None:
        transformer = decoder.detr.detr.transformer
        self.reset()
        transformer.encoder.register_forward_pre_hook(self._encoder_start)
        transformer.encoder.register_forward_hook(self._encoder_end)
        transformer.decoder.register_forward_hook(self._decoder_end)

    def reset(self) -> None:
        self.sums = {"encoder": 0.0, "decoder": 0.0}
        self._last = 0.0

    def _encoder_start(self, *_args) -> None:
        self._last = time.perf_counter()

    def _encoder_end(self, *_args) -> None:
        now = time.perf_counter()
        self.sums["encoder"] += now - self._last
        self._last = now

    def _decoder_end(self, *_args) -> None:
        # from the encoder's end: the two-stage selection and the decoder layers
        now = time.perf_counter()
        self.sums["decoder"] += now - self._last
        self._last = now

    def split(self, start: float, end: float) -> dict[str, float]:
        """Seconds of encoder, decoder and heads for the call that ran from ``start`` to ``end``
        (the marks since the last :meth:`reset`)."""
        enc, dec = self.sums["encoder"], self.sums["decoder"]
        return {"encoder": enc, "decoder": dec, "heads": end - start - enc - dec}


def run_mode(decoder, clock: StageClock, pixels: torch.Tensor, prompts: torch.Tensor, *, per_prompt_image: bool):
    """One full forward of N prompts on one image -> (per-stage seconds, DecoderOutput of the prompts).

    ``per_prompt_image``: encode the image again for every prompt and decode the prompts one by one
    (the original's way); otherwise encode once and decode all prompts in one batched call.
    """
    times = dict.fromkeys(STAGES, 0.0)
    outs = []
    groups = [prompts[i : i + 1] for i in range(len(prompts))] if per_prompt_image else [prompts]
    features = None
    for group in groups:
        if features is None or per_prompt_image:
            t = time.perf_counter()
            features = decoder.encode_image(pixels)
            times["image"] += time.perf_counter() - t
        clock.reset()
        start = time.perf_counter()
        outs.append(decoder(features, group, torch.zeros(len(group), dtype=torch.long)))
        for stage, seconds in clock.split(start, time.perf_counter()).items():
            times[stage] += seconds
    return times, outs


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two binary masks (logits > 0); 1.0 when both are empty."""
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=3, help="prompts (<seg>s) on one image, besides the 1-prompt forward")
    parser.add_argument("--skip-clip", action="store_true", help="time HIPIE only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--reduced", action="store_true", help="the reduced test configuration at 256 px (a smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time the fast mode compiled (HipieDecoder.set_compiled)")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the fast_bf16 mode")
    args = parser.parse_args()
    if args.repeats < 1 or args.prompts < 1:
        parser.error("--repeats and --prompts must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from segllm.decoders.base import SEG
    from segllm.decoders.hipie import HipieDecoder, HipieDecoderConfig
    from segllm.linear import use_onednn_linears

    config = replace(HipieDecoderConfig.reduced(), image_size=256) if args.reduced else HipieDecoderConfig()
    reference = HipieDecoder(config).eval()
    use_onednn_linears(reference)  # as build_segllm does; the reference mode computes with F.linear all the same
    with torch.no_grad():
        # random but non-trivial sampling offsets and attention weights (their init is zero)
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    reference.set_reference(True)
    image = torch.randint(0, 256, (3, config.image_size * 3 // 4, config.image_size), dtype=torch.uint8)
    pixels = reference.preprocess(image)[0][None]

    fast = copy.deepcopy(reference).set_reference(False)
    decoders = {"reference": reference, "fast": fast}
    inputs = {"reference": (pixels, False), "fast": (pixels, False)}
    if not args.no_bf16:
        decoders["fast_bf16"] = copy.deepcopy(fast).to(torch.bfloat16).to(memory_format=torch.channels_last)
        inputs["fast_bf16"] = (pixels.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), False)
    if args.compile:
        decoders["fast_compiled"] = copy.deepcopy(fast).set_compiled(True)  # after the copy: a copy is not compiled
        inputs["fast_compiled"] = (pixels, False)
    clocks = {name: StageClock(d) for name, d in decoders.items()}

    all_prompts = torch.randn(args.prompts, config.num_prompt_tokens, config.lang_dim) * 0.5
    cases = {"1_prompt": all_prompts[:1], f"{args.prompts}_prompts": all_prompts}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {c: {m: [] for m in decoders} for c in cases}
    masks: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for case, prompts in cases.items():
                for name, decoder in decoders.items():
                    x, _ = inputs[name]
                    p = prompts.to(x.dtype)
                    if name == "fast_compiled" and repeat == 0 and case == next(iter(cases)):
                        t = time.perf_counter()
                        run_mode(decoder, clocks[name], x, p, per_prompt_image=False)  # compiles
                        compile_s = time.perf_counter() - t
                    times, outs = run_mode(decoder, clocks[name], x, p, per_prompt_image=name == "reference")
                    if repeat > 0:
                        samples[case][name].append(times)
                    masks.setdefault(case, {})[name] = torch.cat([o.mask_logits[:, SEG] for o in outs]).float()
                    print(f"repeat {repeat} {case} {name}: {sum(times.values()):.2f} s", flush=True)

        clip_s = None
        if not args.skip_clip:
            from transformers import CLIPVisionConfig, CLIPVisionModel

            from segllm.model.released import _KNOWN_VISION

            clip_cfg = {k: v for k, v in _KNOWN_VISION["openai/clip-vit-large-patch14"].items() if k != "model_type"}
            clip = CLIPVisionModel(CLIPVisionConfig(**clip_cfg)).eval()
            use_onednn_linears(clip)
            clip_in = torch.randn(2, 3, 224, 224)  # the image and one mask crop
            clip(pixel_values=clip_in, output_hidden_states=True)
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                clip(pixel_values=clip_in, output_hidden_states=True)
                runs.append(time.perf_counter() - t)
            clip_s = statistics.median(runs)

    result: dict = {
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    for case in cases:
        medians = {
            name: {stage: statistics.median(t[stage] for t in runs) for stage in STAGES}
            for name, runs in samples[case].items()
        }
        totals = {name: statistics.median(sum(t.values()) for t in runs) for name, runs in samples[case].items()}
        entry: dict = {}
        for name in decoders:
            entry[name] = {f"{stage}_s": round(medians[name][stage], 3) for stage in STAGES}
            entry[name]["total_s"] = round(totals[name], 3)
        for name in [n for n in decoders if n != "reference"]:
            entry[f"speedup_{name}_vs_reference"] = {
                **{stage: round(medians["reference"][stage] / medians[name][stage], 2) for stage in STAGES},
                "total": round(totals["reference"] / totals[name], 2),
            }
            ref_masks, got = masks[case]["reference"], masks[case][name]
            entry[f"{name}_seg_mask_iou_vs_reference"] = [round(mask_iou(a, b), 4) for a, b in zip(got, ref_masks)]
            scale = ref_masks.abs().max().item()
            entry[f"{name}_max_mask_logit_diff_over_scale"] = float(f"{(got - ref_masks).abs().max().item() / scale:.2e}")
        result[case] = entry
    if args.compile:
        result["compile_first_forward_s"] = round(compile_s, 1)
    if clip_s is not None:
        result["clip_image_plus_crop_s"] = round(clip_s, 3)
        one = result["1_prompt"]["fast"]
        result["round_first_s"] = round(one["total_s"] + clip_s, 3)
        result["round_later_s"] = round(one["total_s"] - one["image_s"] + clip_s / 2, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    from segllm.bench import report

    report(result, args.out)


if __name__ == "__main__":
    main()
