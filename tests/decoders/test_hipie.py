"""HIPIE-R50 decoder: module tree vs the released keys, and stage-by-stage parity with the
golden tensors produced by the original SegLLM code (fp32, CPU) on the reduced configuration.

Tolerances (max abs error unless stated): backbone and input projections 1e-4 (exact in
practice); fusion, encoder, two-stage scores, decoder states and heads 1e-4 (observed <= 5e-6);
mask logits 5e-4 (values up to ~35; observed 6e-5); boxes in 1024-pixel units 1e-2 (observed
1.2e-4); final masks: IoU >= 0.99 with the released binary mask (observed 1.0).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from segllm.decoders.base import REF, SEG, DecoderOutput, MaskDecoder
from segllm.decoders.hipie import HipieDecoder, HipieDecoderConfig, load_released_hipie
from segllm.decoders.hipie.deform_attn import multi_scale_deformable_sample, multi_scale_deformable_sample_reference
from segllm.decoders.hipie.fusion import BiMultiHeadAttention
from segllm.decoders.hipie.transformer import CHUNK, EncoderLayer, encoder_reference_points
from segllm.errors import CheckpointError
from segllm.linear import use_onednn_linears
from tests.helpers import RELEASED_FIXTURES
from tests.tolerance import assert_close_scaled, scaled_atol

HIPIE = RELEASED_FIXTURES / "hipie"

needs_fixtures = pytest.mark.skipif(
    not (HIPIE / "weights.safetensors").exists(),
    reason=f"released HIPIE golden fixtures not found under {HIPIE} (set SEGLLM_FIXTURES)",
)

ATOL = 1e-4
RTOL = 1e-3
SCALED = 1e-5  # of the tensor's largest magnitude: float32 rounding grows with the values summed
# the same with the image encoded the fast way (frozen norms folded into the convolutions,
# channels-last): another summation order through 53 convolutions. Measured on the fixture (this
# CPU): res5 5.4e-5 of its scale, the encoder's memory and first fusion 1.4e-4 (the original's
# arithmetic: res3-res5 bit for bit); other CPUs' kernels may sum in another order again
SCALED_FOLDED = 3e-4


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL, scaled: float = SCALED) -> None:
    """Golden comparison: within ``atol`` (or ``scaled`` x max |expected| where that is larger) plus ``rtol``."""
    atol = max(atol, scaled_atol(expected.float(), scaled)) if atol else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def released_shapes(name: str) -> dict[str, list[int]]:
    return json.loads((HIPIE / f"keys_{name}.json").read_text())


def our_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {"hipie." + k: list(v.shape) for k, v in module.state_dict().items()}


@needs_fixtures
def test_full_config_reproduces_released_keys():
    with torch.device("meta"):
        model = HipieDecoder(HipieDecoderConfig())
    assert our_shapes(model) == released_shapes("full")


@needs_fixtures
def test_reduced_config_reproduces_released_keys_and_loads_strictly(fixture_weights):
    model = HipieDecoder(HipieDecoderConfig.reduced())
    assert our_shapes(model) == released_shapes("reduced")
    load_released_hipie(model, fixture_weights, prefix="hipie.")
    state = model.state_dict()
    for key, value in fixture_weights.items():
        assert torch.equal(state[key.removeprefix("hipie.")], value), key


@needs_fixtures
def test_loader_rejects_missing_keys(fixture_weights):
    model = HipieDecoder(HipieDecoderConfig.reduced())
    broken = dict(fixture_weights)
    broken.pop("hipie.detr.mask_head.lay1.weight")
    with pytest.raises(CheckpointError, match="missing"):
        load_released_hipie(model, broken, prefix="hipie.")


@needs_fixtures
def test_gamma_quirk(fixture_weights):
    """The released loader keeps gamma = 1 / enc_layers whatever the checkpoint stores."""
    changed = dict(fixture_weights)
    key = "hipie.detr.detr.transformer.encoder.vl_layers.0.b_attn.gamma_v"
    changed[key] = torch.full_like(changed[key], 0.123)
    released = load_released_hipie(HipieDecoder(HipieDecoderConfig.reduced()), changed, prefix="hipie.")
    stored = load_released_hipie(HipieDecoder(HipieDecoderConfig.reduced()), changed, prefix="hipie.", gamma="stored")
    b_attn = "detr.detr.transformer.encoder.vl_layers.0.b_attn"
    assert torch.all(released.get_submodule(b_attn).gamma_v == 0.5)
    assert torch.all(stored.get_submodule(b_attn).gamma_v == 0.123)


def test_deformable_sampling_matches_explicit_bilinear():
    """grid_sample path == a hand-written bilinear interpolation with zero padding."""
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    b, m, dh, q, p = 2, 3, 4, 6, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), m, dh, dtype=torch.float64)
    loc = torch.rand(b, q, m, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, q, m, len(shapes), p, dtype=torch.float64)
    got = multi_scale_deformable_sample(value, shapes, loc, weights)

    expected = torch.zeros(b, q, m, dh, dtype=torch.float64)
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].view(b, h, w, m, dh)
        start += h * w
        x = loc[..., level, :, 0] * w - 0.5  # [b, q, m, p]
        y = loc[..., level, :, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                wgt = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                xc, yc = xi.clamp(0, w - 1).long(), yi.clamp(0, h - 1).long()
                bi = torch.arange(b)[:, None, None, None]
                mi = torch.arange(m)[None, None, :, None]
                sampled = v[bi, yc, xc, mi]  # [b, q, m, p, dh]
                contrib = sampled * (wgt * inside * weights[..., level, :])[..., None]
                expected += contrib.sum(3)
    torch.testing.assert_close(got, expected.reshape(b, q, m * dh))
    torch.testing.assert_close(multi_scale_deformable_sample_reference(value, shapes, loc, weights), got)


def test_gather_sampler_gradients_equal_the_reference_samplers():
    """The fast sampler's gradients (values, sampling points, attention weights) == grid_sample's,
    points inside, on the border band and far outside every level included."""
    torch.manual_seed(1)
    shapes = [(4, 6), (2, 3), (1, 1)]
    b, m, dh, q, p = 2, 2, 3, 5, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), m, dh, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(b, q, m, len(shapes), p, 2, dtype=torch.float64) * 2.2 - 0.6).requires_grad_(True)
    weights = torch.rand(b, q, m, len(shapes), p, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(b, q, m * dh, dtype=torch.float64)
    grads = []
    for sampler in (multi_scale_deformable_sample, multi_scale_deformable_sample_reference):
        out = sampler(value, shapes, loc, weights)
        grads.append((out, *torch.autograd.grad((out * seed).sum(), (value, loc, weights))))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    assert grads[0][2].abs().sum() > 0  # the points do receive gradient


def test_gather_sampler_in_bfloat16_is_finite_and_close_to_float32():
    """bfloat16 values sample without NaN (grid_sample's CPU kernel gave NaN in reduced precision)
    and agree with float32 within bfloat16's precision, relative to the outputs' scale."""
    torch.manual_seed(2)
    shapes = [(12, 16), (6, 8)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 4, 8)
    loc = torch.rand(1, 50, 4, 2, 4, 2) * 1.2 - 0.1
    weights = torch.rand(1, 50, 4, 2, 4).softmax(-1)
    full = multi_scale_deformable_sample(value, shapes, loc, weights)
    half = multi_scale_deformable_sample(value.bfloat16(), shapes, loc.bfloat16(), weights.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.03 * full.abs().max()


def test_encoder_layer_in_chunks_equals_the_whole_layer():
    """CPU inference runs an encoder layer a chunk of tokens at a time after projecting the values;
    with more tokens than a chunk (and a partial last chunk) it gives the whole layer's values, as
    training computes them."""
    torch.manual_seed(3)
    shapes = [(40, 50), (20, 25), (5, 6)]
    s = sum(h * w for h, w in shapes)
    assert s > 2 * CHUNK and s % CHUNK
    layer = EncoderLayer(dim=32, ffn_dim=64, num_levels=len(shapes), num_heads=4, num_points=2).eval()
    src, pos = torch.randn(2, s, 32), torch.randn(2, s, 32)
    reference = encoder_reference_points(shapes, src.device)[:, :, None].expand(-1, -1, len(shapes), -1)
    calls = []
    in_chunks = layer._in_chunks
    layer._in_chunks = lambda x, *rest: calls.append(x.shape) or in_chunks(x, *rest)
    with torch.no_grad():
        chunked = layer(src, pos, reference, shapes)
    whole = layer(src, pos, reference, shapes).detach()  # with gradients on: the whole FFN at once
    assert calls == [src.shape]  # the chunked path ran once (no_grad), the whole one after
    assert_close_scaled(chunked, whole)


def test_fusion_fast_mode_equals_reference_mode_with_masked_tokens_and_gradients():
    """The reassociated fusion == the original's order, values and gradients, with masked prompt tokens."""
    torch.manual_seed(0)
    attn = BiMultiHeadAttention(v_dim=32, l_dim=24, embed_dim=64, num_heads=4).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases too
    v = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    lang = torch.randn(2, 6, 24, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    results = []
    for reference in (True, False):
        attn.reference = reference
        dv, dl = attn(v, lang, mask)
        grads = torch.autograd.grad((dv * dv.detach()).sum() + (dl * dl.detach()).sum(), (v, lang))
        results.append((dv, dl, *grads))
    for ref, fast in zip(*results):
        torch.testing.assert_close(fast, ref)


def _perturbed_norms(model: torch.nn.Module) -> None:
    """Every frozen norm of the backbone made non-trivial (scale, shift, statistics)."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            if ".norm." in name and ("weight" in name or "running_var" in name):
                b.uniform_(0.5, 1.5)
            elif ".norm." in name:
                b.uniform_(-0.2, 0.2)


def test_folded_backbone_equals_the_original_arithmetic(monkeypatch):
    """ResNet.forward_folded (norms folded into the convolutions, channels-last on the CPU) gives
    the maps of ResNet.forward (separate frozen norms) to float rounding (observed <= 3e-6 of the
    maps' scale), keeps its folded weights between calls and makes them anew after a weight
    change; encode_image uses it in inference in the fast mode, and neither in the reference mode
    nor with a gradient."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = HipieDecoder(replace(HipieDecoderConfig.reduced(), image_size=128)).eval()
    _perturbed_norms(model)
    resnet = model.detr.detr.backbone[0].backbone
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        want = resnet(pixels)
        got = resnet.forward_folded(pixels)
    assert list(got) == list(want) == ["res3", "res4", "res5"]
    for k in want:
        assert got[k].is_contiguous(memory_format=torch.channels_last)
        assert_close_scaled(got[k], want[k], rel=2e-5)
    cached = resnet.__dict__["_folded"]
    before = pixels.clone()
    with torch.no_grad():
        again = resnet.forward_folded(pixels)
    assert resnet.__dict__["_folded"] is cached  # kept while the weights are unchanged
    # the in-place residual sums overwrite only the blocks' own intermediates
    assert torch.equal(pixels, before) and all(torch.equal(again[k], got[k]) for k in got)
    # without oneDNN's fused kernel (other devices): the same sums in three steps
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.no_grad():
        plain = resnet.forward_folded(pixels)
    monkeypatch.undo()
    for k in want:
        assert_close_scaled(plain[k], want[k], rel=2e-5)
    # an in-place change of one norm (as load_state_dict or an optimizer step makes): folded anew
    with torch.no_grad():
        resnet.res5[0].conv3.norm.weight.mul_(3.0)
        want2 = resnet(pixels)["res5"]
        got2 = resnet.forward_folded(pixels)["res5"]
    assert resnet.__dict__["_folded"] is not cached
    assert_close_scaled(got2, want2, rel=2e-5)
    assert not torch.allclose(want2, want["res5"], rtol=1e-3, atol=0)  # the change did change the maps
    # the state dict holds no folded copies
    assert not any("folded" in k for k in model.state_dict())
    # which path encode_image takes: folded in fast inference, the original's otherwise
    view = model.image_encoder
    with torch.no_grad():
        fast = model.encode_image(pixels).srcs
        _, folded_srcs = view.maps_folded(pixels)
        _, plain_srcs = view.maps(pixels)
        with model.reference_mode():
            ref = model.encode_image(pixels).srcs
    trained = model.encode_image(pixels).srcs  # with a gradient: the original's arithmetic
    assert all(torch.equal(a, b) for a, b in zip(fast, folded_srcs))
    assert all(torch.equal(a, b) for a, b in zip(ref, plain_srcs))
    assert all(torch.equal(a.detach(), b) for a, b in zip(trained, plain_srcs))
    assert any(not torch.equal(a, b) for a, b in zip(fast, plain_srcs))  # two different paths
    assert all(s.is_contiguous() for s in fast)
    # an image's features do not depend on the images that share its batch
    with torch.no_grad():
        alone = view.maps_folded(pixels[1:])[1]
    assert all(torch.equal(a[1:], b) for a, b in zip(folded_srcs, alone))
    # float32 compiled (set_compiled on the CPU): the compiled maps; bfloat16 on the CPU: the
    # folded path, compiled or not, within bfloat16's rounding of the original's maps
    calls = []
    monkeypatch.setattr(model, "compiled_image", lambda p: calls.append(p) or view.maps(p), raising=False)
    with torch.no_grad():
        model.encode_image(pixels)
    assert len(calls) == 1
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_pixels = pixels.bfloat16()
    with torch.no_grad():
        want16 = half.image_encoder.maps_folded(half_pixels)[1]
        got16 = half.encode_image(half_pixels).srcs
        half.compiled_image = lambda p: pytest.fail("bfloat16 ran the compiled image step")
        compiled16 = half.encode_image(half_pixels).srcs
    assert all(torch.equal(a, b) and torch.equal(c, b) for a, b, c in zip(got16, want16, compiled16))
    for a, b in zip(got16, plain_srcs):
        assert_close_scaled(a.float(), b, rel=5e-2)
    # a CPU without native bfloat16 (AVX2 only, where oneDNN's fused bfloat16 kernel raises):
    # the residual sums in three steps, within bfloat16's rounding of the original's maps
    import segllm.decoders.hipie.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "cpu_bfloat16_is_native", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise_", None)  # must not be reached
    with torch.no_grad():
        emulated16 = half.image_encoder.maps_folded(half_pixels)[1]
    for a, b in zip(emulated16, plain_srcs):
        assert_close_scaled(a.float(), b, rel=5e-2)


def test_fast_cpu_inference_decodes_prompts_one_at_a_time():
    """In the fast mode's CPU inference the transformer takes several prompts one at a time (no
    work is shared between them, and their large tensors stay below glibc's mmap threshold): each
    prompt's transformer results equal its own call's exactly; the reference mode and training keep
    the batch together. The heads after the transformer take the prompts as one batch, so their
    outputs equal a single prompt's only to rounding: oneDNN may block a matrix product of two rows
    differently from one (on an AMX Xeon, CI's machine of session 34, the logits differed in the
    last bits)."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = HipieDecoder(replace(HipieDecoderConfig.reduced(), image_size=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    transformer = model.detr.detr.transformer
    calls = []
    transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["lang"].shape[0]) if "lang" in kwargs else calls.append(args[2].shape[0]), with_kwargs=True)
    pixels = model.preprocess(torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8))[0][None]
    prompts = torch.randn(2, 8, 768)
    with torch.no_grad():
        features = model.encode_image(pixels)
        both = model.forward_raw(features, prompts, torch.zeros(2, dtype=torch.long))
        assert calls == [2, 1, 1]
        second = model.forward_raw(features, prompts[1:], torch.zeros(1, dtype=torch.long))
        for name in ("memory", "lang", "enc_class", "init_reference", "topk_indices"):
            assert torch.equal(getattr(both.transformer, name)[1:], getattr(second.transformer, name)), name
        for name in ("hs", "references"):
            assert torch.equal(getattr(both.transformer, name)[:, 1:], getattr(second.transformer, name)), name
        for name in ("pred_logits", "pred_boxes", "pred_ious"):
            assert_close_scaled(getattr(both, name)[1:], getattr(second, name), rel=1e-5, msg=name)
        calls.clear()
        with model.reference_mode():
            model.forward_raw(features, prompts, torch.zeros(2, dtype=torch.long))
        assert calls == [2]
    calls.clear()
    model.forward_raw(features, prompts, torch.zeros(2, dtype=torch.long))  # with a gradient
    assert calls == [2]


def test_fast_mode_equals_reference_mode():
    """The fast mode == the original's way of computing (``set_reference``), on random weights
    perturbed so that every sampling offset, attention weight and bias is non-trivial: the image
    features (folded norms, channels-last, against separate norms), the encoder memory, fused
    prompt tokens, every query output and the selected masks agree to float32 rounding relative
    to each tensor's scale (observed <= 1.6e-6; tolerance 1e-5)."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = HipieDecoder(replace(HipieDecoderConfig.reduced(), image_size=128)).eval()
    use_onednn_linears(model)  # as in a built SegLLM: the fast mode's products through oneDNN
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert not model.reference
    pixels = torch.stack([model.preprocess(torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8))[0]] * 2)
    prompts = torch.randn(3, 8, 768)
    batch_index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        features = model.encode_image(pixels)
        fast = model.forward_raw(features, prompts, batch_index)
        with model.reference_mode():
            assert model.reference
            # the image encoded again the original's way (separate frozen norms, not folded)
            ref_features = model.encode_image(pixels)
            ref = model.forward_raw(ref_features, prompts, batch_index)
    assert not model.reference  # the context manager restores the mode
    for a, e in zip(features.srcs, ref_features.srcs):
        assert_close_scaled(a, e, rel=1e-5)
    pairs = {
        "memory": (fast.transformer.memory, ref.transformer.memory),
        "lang": (fast.transformer.lang, ref.transformer.lang),
        "hs": (fast.transformer.hs, ref.transformer.hs),
        "logits": (fast.pred_logits, ref.pred_logits),
        "boxes": (fast.pred_boxes, ref.pred_boxes),
        "ious": (fast.pred_ious, ref.pred_ious),
        "masks": (fast.pred_masks, ref.pred_masks),
    }
    for name, (a, e) in pairs.items():
        assert_close_scaled(a, e, rel=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(fast.transformer.topk_indices, ref.transformer.topk_indices)
    # forward(): the fast mode makes only the selected queries' masks, the reference mode all
    # of them (as the original) and keeps two; the same two masks, scores and boxes
    with torch.no_grad():
        lazy = model.forward_raw(features, prompts, batch_index, all_masks=False)
        got = model(features, prompts, batch_index)
        with model.reference_mode():
            want = model(ref_features, prompts, batch_index)
    assert lazy.pred_masks is None and lazy.mask_features is not None
    assert got.mask_logits.shape == want.mask_logits.shape == (3, 2, 32, 32)
    assert_close_scaled(got.mask_logits, want.mask_logits, rel=1e-5)
    assert_close_scaled(got.mask_logits, model.select(fast).mask_logits, rel=1e-5)
    assert_close_scaled(got.iou_scores, want.iou_scores, rel=1e-5)
    assert_close_scaled(got.boxes, want.boxes, rel=1e-5)


@pytest.fixture(scope="module")
def fixture_weights():
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(HIPIE / "weights.safetensors").items()}


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    return load_file(HIPIE / "inputs.safetensors"), load_file(HIPIE / "outputs.safetensors")


@pytest.fixture(scope="module", params=["original", "folded"])
def run(request, fixture_weights, golden):
    """The reduced model on the fixture photo and its two prompts (computed once per way of
    encoding the image), the first fusion and encoder layers' outputs (caught by forward hooks)
    and the golden tolerance of that way: the image encoded with the original's arithmetic
    (separate frozen norms: the reference mode and training) or the fast mode's in inference
    (the norms folded into the convolutions, channels-last: ``HipieDecoder.encode_image``'s
    default)."""
    inputs, _ = golden
    model = load_released_hipie(HipieDecoder(HipieDecoderConfig.reduced()), fixture_weights, prefix="hipie.").eval()
    encoder = model.detr.detr.transformer.encoder
    trace = {}

    # the fast mode's CPU inference takes the prompts one at a time: each call's rows appended
    def keep(key, value):
        trace[key] = value if key not in trace else torch.cat([trace[key], value])

    def after_fusion(module, args, out):
        keep("after_fusion0.visual", out[0])
        keep("after_fusion0.lang", out[1])

    def after_layer(module, args, out):
        keep("layer0.visual", out)

    hooks = [encoder.vl_layers[0].register_forward_hook(after_fusion), encoder.layers[0].register_forward_hook(after_layer)]
    with torch.no_grad():
        pixels = model.normalize(inputs["image_resized_padded_uint8"])[None]
        if request.param == "original":
            features = model.image_encoder(pixels, keep_backbone=True, maps=model.image_encoder.maps)
        else:
            features = model.encode_image(pixels, keep_backbone=True)
        raw = model.forward_raw(features, inputs["prompts"], torch.zeros(2, dtype=torch.long))
        selected = model.select(raw)
    for h in hooks:
        h.remove()
    return model, features, raw, selected, trace, SCALED if request.param == "original" else SCALED_FOLDED


@needs_fixtures
def test_preprocess_matches_released(golden):
    inputs, _ = golden
    model = HipieDecoder(HipieDecoderConfig.reduced())
    image = inputs["image_rgb_uint8"].permute(2, 0, 1).contiguous()
    pixels, frame = model.preprocess(image)
    assert (frame.resized_height, frame.resized_width, frame.size) == (768, 1024, 1024)
    expected = (
        inputs["image_resized_padded_uint8"].float() - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    ) / (torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1))
    torch.testing.assert_close(pixels, expected, atol=0, rtol=0)
    assert pixels[:, 800:, :].abs().min() > 1.0  # padding is normalised too, not zero


@needs_fixtures
def test_backbone(run, golden):
    _, out = golden
    features = run[1]
    res3, res4, res5 = features.backbone
    close(res3[..., ::2, ::2], out["backbone.res3.stride2_subsample"], scaled=run[5])
    close(res4, out["backbone.res4"], scaled=run[5])
    close(res5, out["backbone.res5"], scaled=run[5])


@needs_fixtures
def test_input_projections(run, golden):
    _, out = golden
    srcs = run[1].srcs
    close(srcs[0][..., ::4, ::4], out["input_proj.0.stride4_subsample"], scaled=run[5])
    close(srcs[1][..., ::2, ::2], out["input_proj.1.stride2_subsample"], scaled=run[5])
    close(srcs[2], out["input_proj.2"], scaled=run[5])
    close(srcs[3], out["input_proj.3"], scaled=run[5])


@needs_fixtures
def test_vl_fusion_and_first_encoder_layer(run, golden):
    _, out = golden
    trace = run[4]
    close(trace["after_fusion0.lang"], out["encoder.after_fusion0.lang"], scaled=run[5])
    close(trace["after_fusion0.visual"][:1, 20480:], out["encoder.after_fusion0.visual.prompt0.levels2_3"], scaled=run[5])
    close(trace["layer0.visual"][:1, 20480:], out["encoder.layer0.visual.prompt0.levels2_3"], scaled=run[5])


@needs_fixtures
def test_encoder_memory(run, golden):
    _, out = golden
    t = run[2].transformer
    memory = t.memory
    close(memory[:, :16384].reshape(2, 128, 128, 256)[:, ::8, ::8], out["encoder.memory.level0.stride8_subsample"], scaled=run[5])
    close(memory[:, 16384:20480].reshape(2, 64, 64, 256)[:, ::2, ::2], out["encoder.memory.level1.stride2_subsample"], scaled=run[5])
    close(memory[:, 20480:], out["encoder.memory.levels2_3"], scaled=run[5])
    close(t.lang, out["encoder.lang_after"], scaled=run[5])


@needs_fixtures
def test_two_stage_proposals(run, golden):
    _, out = golden
    t = run[2].transformer
    close(t.enc_class, out["two_stage.enc_outputs_class"], scaled=run[5])
    expected = out["two_stage.enc_outputs_coord_unact"]
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(t.enc_coord_unact), finite)
    close(t.enc_coord_unact[finite], expected[finite], scaled=run[5])
    assert torch.equal(t.topk_indices, out["two_stage.topk_indices"])
    num_bg = HipieDecoderConfig.reduced().num_bg_queries
    close(t.init_reference[:, num_bg:], out["two_stage.topk_boxes_sigmoid"], scaled=run[5])
    close(t.init_reference, out["decoder.init_reference"], scaled=run[5])


@needs_fixtures
def test_decoder_layers(run, golden):
    _, out = golden
    t = run[2].transformer
    for layer in range(t.hs.shape[0]):
        close(t.hs[layer], out["decoder.hs"][layer], scaled=run[5])
        close(t.references[layer], out["decoder.inter_references"][layer], scaled=run[5])


@needs_fixtures
def test_raw_predictions(run, golden):
    _, out = golden
    raw = run[2]
    close(raw.pred_logits, out["raw.pred_logits"], scaled=run[5])
    close(raw.pred_boxes, out["raw.pred_boxes"], scaled=run[5])
    close(raw.pred_ious, out["raw.pred_boxious"], scaled=run[5])
    close(raw.reference_points, out["raw.reference_points"], scaled=run[5])
    close(raw.pred_masks, out["raw.pred_masks"][:, :, 0], atol=5e-4, scaled=run[5])


@needs_fixtures
def test_postprocessed_instances(run, golden):
    _, out = golden
    for i, inst in enumerate(run[2].instances):
        close(inst.scores, out[f"post.{i}.scores"], atol=1e-5, scaled=run[5])
        assert torch.equal(inst.labels, out[f"post.{i}.pred_classes"])
        close(inst.boxes, out[f"post.{i}.pred_boxes_xyxy"], atol=1e-2, scaled=run[5])


@needs_fixtures
def test_final_selection(run, golden):
    _, out = golden
    model, _, raw, selected, _, _ = run
    for i, inst in enumerate(raw.instances):
        target = inst.labels == 1
        index = int(torch.where(target, inst.scores, torch.full_like(inst.scores, -1.0)).argmax())
        assert index == int(out[f"final.{i}.index_in_instances"])
        close(selected.iou_scores[i, SEG], out[f"final.{i}.score"], atol=1e-5, scaled=run[5])
        close(selected.boxes[i, SEG], out[f"final.{i}.box_xyxy_1024"], atol=1e-2, scaled=run[5])
        logits = F.interpolate(selected.mask_logits[i : i + 1, SEG : SEG + 1], size=(1024, 1024), mode="bilinear")
        mask = logits[0, 0].sigmoid() > model.config.mask_threshold
        expected = out[f"final.{i}.mask"].bool()
        iou = (mask & expected).sum() / (mask | expected).sum()
        assert iou >= 0.99
        # channel REF is the best [REF]-class instance
        ref_scores = torch.where(inst.labels == 0, inst.scores, torch.full_like(inst.scores, -1.0))
        close(selected.iou_scores[i, REF], ref_scores.max(), atol=0, scaled=run[5])


@needs_fixtures
def test_mask_decoder_interface(run, golden):
    inputs, _ = golden
    model, features, _, selected, _, _ = run
    assert isinstance(model, MaskDecoder)
    assert (model.image_size, model.num_prompt_tokens, model.num_ref_tokens, model.prompt_dim) == (1024, 8, 4, 768)
    assert model.output_size == 256
    assert isinstance(selected, DecoderOutput)
    assert selected.mask_logits.shape == (2, 2, 256, 256)
    assert selected.iou_scores.shape == (2, 2)
    assert selected.boxes.shape == (2, 2, 4)
    # the image encoder is a view of owned modules: freezing it freezes them, and no new keys appear
    encoder_ids = {id(p) for p in model.image_encoder.parameters()}
    backbone_ids = {id(p) for p in model.detr.detr.input_proj.parameters()}
    assert backbone_ids <= encoder_ids
    assert not any(k.startswith("image_encoder") for k in model.state_dict())
    # forward() == select(forward_raw()) and prompts of one image can be given in any grouping
    with torch.no_grad():
        single = model(features, inputs["prompts"][1:], torch.zeros(1, dtype=torch.long))
    close(single.mask_logits[0], selected.mask_logits[1], atol=5e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_frame_any_dtype_and_gradients(dtype):
    """No fixtures needed: a 128-pixel frame, random weights, float32 (with gradients) and bfloat16."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = HipieDecoder(replace(HipieDecoderConfig.reduced(), image_size=128)).to(dtype)
    model.detr.detr.backbone.requires_grad_(False)  # a frozen ResNet keeps the backward pass short
    pixels, frame = model.preprocess(torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8))
    assert (frame.resized_height, frame.resized_width) == (73, 128)
    prompts = torch.randn(3, 8, 768, dtype=dtype, requires_grad=dtype == torch.float32)
    features = model.encode_image(torch.stack([pixels, pixels]).to(dtype))
    out = model(features, prompts, torch.tensor([0, 1, 1]))
    assert out.mask_logits.shape == (3, 2, 32, 32) and out.mask_logits.dtype == dtype
    assert out.iou_scores.shape == (3, 2) and out.boxes.shape == (3, 2, 4)
    assert torch.isfinite(out.mask_logits).all()
    if dtype == torch.float32:
        out.mask_logits.sum().backward()
        assert prompts.grad is not None and prompts.grad.abs().sum() > 0
        assert model.detr.detr.input_proj[0][0].weight.grad is not None


TINY = RELEASED_FIXTURES / "segllm_tiny"


@pytest.mark.skipif(
    not (TINY / "checkpoint/model.safetensors").exists() or not (HIPIE / "weights.safetensors").exists(),
    reason=f"released tiny SegLLM fixture not found under {TINY} (set SEGLLM_FIXTURES)",
)
def test_released_checkpoint_prefix_and_three_round_answers(run):
    """Load ``model.segmentator.hipie.*`` from a released-layout checkpoint and reproduce the
    original's final masks, boxes and instance scores for its 3 conversation rounds."""
    from safetensors.torch import load_file

    checkpoint = {k: v.float() for k, v in load_file(TINY / "checkpoint/model.safetensors").items()}
    golden = load_file(TINY / "golden.safetensors")
    model = load_released_hipie(HipieDecoder(HipieDecoderConfig.reduced()), checkpoint).eval()
    reference_model, features = run[0], run[1]
    # same weights as the hipie fixture, so its image features can be reused
    state = model.state_dict()  # once: state_dict() walks every module
    for key, value in reference_model.state_dict().items():
        assert torch.equal(state[key], value), key
    prompts = golden["final.prompt_tokens"]
    with torch.no_grad():
        raw = model.forward_raw(features, prompts, torch.zeros(len(prompts), dtype=torch.long))
        out = model.select(raw)
    for i, inst in enumerate(raw.instances):
        close(inst.scores, golden[f"final.post.{i}.scores"], atol=1e-5)
        assert torch.equal(inst.labels, golden[f"final.post.{i}.pred_classes"])
        close(out.boxes[i, SEG], golden["final.boxes_xyxy_1024"][i], atol=1e-2)
        mask = F.interpolate(out.mask_logits[i : i + 1, SEG : SEG + 1], size=(1024, 1024), mode="bilinear")[0, 0] > 0
        expected = golden["final.masks"][i].bool()
        assert (mask & expected).sum() / (mask | expected).sum() >= 0.99


def test_image_features_slice_by_image():
    """A batch's features give each image's own (batch segmentation and the own-protocol
    evaluation keep one per conversation); the position encodings are shared."""
    from segllm.decoders.hipie.decoder import HipieImageFeatures

    srcs = [torch.randn(3, 4, 8 // 2**i, 8 // 2**i) for i in range(4)]
    pos = [torch.randn(1, 4, 8 // 2**i, 8 // 2**i) for i in range(4)]
    feats = HipieImageFeatures(srcs, pos, [torch.randn(3, 2, 4, 4)])
    one = feats[1:2]
    assert len(one) == 1 and one.pos is pos
    assert all(torch.equal(a, s[1:2]) for a, s in zip(one.srcs, srcs)) and torch.equal(one.backbone[0], feats.backbone[0][1:2])
    with pytest.raises(TypeError, match="slice"):
        feats[1]
