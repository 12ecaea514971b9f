"""``segllm bench --released-shape`` on the released architecture's toy size (the full size is a
measurement, not a test: README, docs/results/bench_released_shape.json)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from segllm.bench_released import (
    ReleasedShape,
    _Filler,
    build_released_shape,
    load_tokenizer,
    mask_agreement,
    released_table,
    run_released,
)
from segllm.errors import ConfigError
from segllm.model.quantize import quantize_llm

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_released_shape_defaults_are_the_7b_and_tiny_keeps_the_module_tree():
    full = ReleasedShape()
    assert (full.llm_width, full.llm_layers, full.llm_heads, full.llm_ffn) == (4096, 32, 32, 11008)
    assert (full.vision["hidden_size"], full.vision["num_hidden_layers"], full.vision_size) == (1024, 24, 224)
    assert (full.hipie.enc_layers, full.hipie.image_size) == (6, 1024)
    assert full.with_llm(layers=2).llm_layers == 2
    assert full.with_llm(width=2048).llm_ffn == 5504
    with pytest.raises(ConfigError, match="multiple of its 32 heads"):
        full.with_llm(width=100)
    tok = load_tokenizer(None)
    model = build_released_shape(ReleasedShape.tiny(), tok)
    assert not any(p.is_meta for p in model.parameters()) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.vision.num_tokens == 16 and model.config.memory.crop_frame == "decoder"  # configured as the released model
    # the same seed gives the same weights in another build: the settings compare one random model
    again = build_released_shape(ReleasedShape.tiny(), load_tokenizer(None))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_filler_scales_matrices_by_fan_in_and_sets_norms_and_biases():
    filler = _Filler(0, torch.float32, torch.device("cpu"))
    w = filler.make("llm.layers.0.mlp.down_proj.weight", torch.empty(512, 1024, device="meta"))
    assert abs(float(w.std()) - 1024**-0.5) < 0.1 * 1024**-0.5
    assert torch.equal(filler.make("x.norm.weight", torch.empty(8, device="meta")), torch.ones(8))
    assert torch.equal(filler.make("x.proj.bias", torch.empty(8, device="meta")), torch.zeros(8))
    # the offset depends on the name, not on the order of the calls
    assert not torch.equal(filler.make("a.weight", torch.empty(4, 4)), filler.make("b.weight", torch.empty(4, 4)))
    assert torch.equal(filler.make("a.weight", torch.empty(4, 4)), filler.make("a.weight", torch.empty(4, 4)))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (segllm[quant]) is not installed")
def test_quantizing_layer_by_layer_gives_the_quantized_full_model():
    """The 8-bit build makes each LLM weight only when it quantizes it; it must equal quantizing
    the built float model."""
    lazy = build_released_shape(ReleasedShape.tiny(), load_tokenizer(None), quantize="8bit")
    eager = build_released_shape(ReleasedShape.tiny(), load_tokenizer(None))
    quantize_llm(eager, "8bit")
    a, b = lazy.state_dict(), eager.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_released_reports_every_part_positive_and_finite():
    settings = ("bfloat16", "8bit") if HAS_BNB else ("bfloat16",)
    report = run_released(settings=settings, shape=ReleasedShape.tiny(), rounds=3, threads=1, isolate=False)
    assert [r["setting"] for r in report["results"]] == list(settings)
    for r in report["results"]:
        assert r["finite"] and r["shape"]["llm_layers"] == 2
        b, o = r["build"], r["open"]
        assert all(_positive(b[k]) for k in ("build_s", "params_m", "llm_weight_mb", "rss_after_build_mb", "peak_rss_build_mb"))
        assert o["prefix_tokens"] > 16  # the system prompt and the 16 image tokens
        assert all(_positive(o[k]) for k in ("total_ms", "clip_image_ms", "hipie_image_ms", "llm_prefix_ms"))
        assert o["total_ms"] >= o["clip_image_ms"] + o["hipie_image_ms"] + o["llm_prefix_ms"]
        assert _positive(r["peak_rss_mb"]) and r["peak_rss_mb"] >= b["rss_after_build_mb"]
        assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
        encoded: set[int] = set()
        for x in r["rounds"]:
            assert x["tokens"] > 0 and all(_positive(x[k]) for k in ("total_ms", "llm_ms", "hipie_ms"))
            assert x["total_ms"] >= x["llm_ms"] + x["hipie_ms"] + x["memory_ms"]
            # a round after the first refers to the latest earlier mask that is not empty; the
            # memory (crop + CLIP) runs once per mask, the first time one is referred to
            assert (x["memory_ms"] > 0) == bool(set(x["refs"]) - encoded)
            encoded |= set(x["refs"])
        assert r["rounds"][1]["refs"] == [1] or r["rounds"][0]["mask_pixels"] == 0
    if HAS_BNB:
        assert report["results"][0]["weights_checksum"] == report["results"][1]["weights_checksum"]
        ious = report["mask_iou_vs_bfloat16"]["8bit"]
        assert len(ious) == 3 and all(0 <= v <= 1 for v in ious)
        assert report["results"][1]["build"]["llm_weight_mb"] < report["results"][0]["build"]["llm_weight_mb"]
    table = released_table(report)
    assert table.count("\n| bfloat16 |") == 5 and "(reference)" in table  # the summary row, the image and 3 rounds


def test_mask_agreement_and_bad_settings():
    a = [np.array([[True, False]]), np.zeros((1, 2), bool)]
    b = [np.array([[True, True]]), np.zeros((1, 2), bool)]
    assert mask_agreement({"bfloat16": a, "8bit": b}) == {"8bit": [0.5, 1.0]}
    assert mask_agreement({"8bit": b}) == {}
    with pytest.raises(ConfigError, match="unknown setting"):
        run_released(settings=("int3",), isolate=False)
    with pytest.raises(ConfigError, match="rounds"):
        run_released(rounds=0, isolate=False)
    with pytest.raises(ConfigError, match="warmup"):
        run_released(warmup=-1, isolate=False)


def test_warmup_conversations_leave_the_timed_one_unchanged(tmp_path):
    """An untimed warm-up conversation (for a GPU's start-up) runs on the same model and leaves
    the timed conversation's masks as without it; on a CPU no GPU memory is reported."""
    runs = [run_released(settings=("bfloat16",), shape=ReleasedShape.tiny(), rounds=2, threads=1, isolate=False, warmup=w,
                         masks_dir=tmp_path / str(w))
            for w in (0, 1)]
    assert [r["results"][0]["warmup"] for r in runs] == [0, 1]
    assert all(r["results"][0]["peak_gpu_mb"] is None for r in runs)
    masks = [np.load(tmp_path / str(w) / "bfloat16.npz")["masks"] for w in (0, 1)]
    assert masks[0].shape[0] == 2 and np.array_equal(masks[0], masks[1])


def test_compiled_hipie_runs_are_named_and_compared_with_the_uncompiled_ones(tmp_path, monkeypatch):
    """``compile``: HIPIE's compiled steps (here a stand-in compiler that counts its calls, the
    real one is tested in tests/decoders/test_hipie_compiled.py) run in the conversation; the
    result is "bfloat16+compiled" and its masks compare with an earlier uncompiled run's. In
    bfloat16 on the CPU the image step runs folded, compiled or not; the encoder layers compile."""
    from segllm.decoders.hipie import compiled as compiled_mod

    compiled_fns = []
    monkeypatch.setattr(compiled_mod.torch, "compile", lambda fn, **kw: compiled_fns.append(fn) or fn)
    kw = {"settings": ("bfloat16",), "shape": ReleasedShape.tiny(), "rounds": 2, "threads": 1, "isolate": False, "masks_dir": tmp_path}
    run_released(**kw)
    assert not compiled_fns
    report = run_released(**kw, compile=True)
    assert len(compiled_fns) == ReleasedShape.tiny().hipie.enc_layers  # every encoder layer's chunk
    assert report["results"][0]["setting"] == "bfloat16+compiled" and (tmp_path / "bfloat16+compiled.npz").exists()
    assert report["mask_iou_vs_bfloat16"] == {"bfloat16+compiled": [1.0, 1.0]}


def test_cli_released_shape_defaults_to_the_7b_in_bf16_and_8bit_and_writes_json(tmp_path, monkeypatch):
    """`segllm bench --released-shape` reaches run_released with the 7B shape, 4 rounds, bf16 and
    8-bit (the run itself replaced: a 7B build is a measurement, not a test)."""
    import json

    import segllm.bench
    from segllm.cli import main

    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return run_released(settings=("bfloat16",), shape=ReleasedShape.tiny(), rounds=1, isolate=False, on_result=kwargs["on_result"])

    monkeypatch.setattr(segllm.bench, "run_released", fake_run)
    out = tmp_path / "r.json"
    assert main(["bench", "--released-shape", "--threads", "1", "--json", str(out)]) == 0
    assert seen["settings"] == ("bfloat16", "8bit") and seen["rounds"] == 4 and seen["shape"] == ReleasedShape()
    assert seen["warmup"] == 0 and not seen["compile"]
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1 and data["results"][0]["setting"] == "bfloat16" and "mask_iou_vs_bfloat16" in data
    main(["bench", "--released-shape", "--layers", "3", "--setting", "4bit", "--rounds", "2", "--warmup", "1"])
    assert seen["shape"].llm_layers == 3 and seen["settings"] == ("4bit",) and seen["rounds"] == 2 and seen["warmup"] == 1
    main(["bench", "--released-shape", "--compile"])
    assert seen["compile"]
