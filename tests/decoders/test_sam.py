"""Tests of the SAM-style mask decoder (tiny configs, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segllm.config import SamDecoderConfig
from segllm.decoders.base import (
    REF,
    SEG,
    Frame,
    MaskDecoder,
    logits_to_image,
    masks_to_frame,
    resize_and_pad,
)
from segllm.decoders.sam import RandomFourierPositionEncoding, SamMaskDecoder
from segllm.errors import ConfigError, ImageError
from tests.tolerance import assert_close_scaled

K, R, D = 3, 1, 32


def tiny_config(**overrides) -> SamDecoderConfig:
    kwargs = {
        "image_size": 64,
        "patch_size": 8,
        "encoder_dim": 32,
        "encoder_depth": 1,
        "encoder_heads": 2,
        "dim": D,
        "depth": 1,
        "heads": 2,
        "mlp_dim": 64,
    }
    return SamDecoderConfig(**(kwargs | overrides))


def make(seed: int = 0, **overrides) -> SamMaskDecoder:
    torch.manual_seed(seed)
    return SamMaskDecoder(tiny_config(**overrides), num_prompt_tokens=K, num_ref_tokens=R)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)


def test_interface_attributes():
    m = make()
    assert isinstance(m, MaskDecoder)
    assert (m.image_size, m.num_prompt_tokens, m.num_ref_tokens, m.prompt_dim) == (64, K, R, D)
    assert m.output_size == 32  # 4 * (64 / 8)


def test_output_shapes():
    m = make()
    pixels = torch.stack([m.preprocess(random_image(64, 48, s))[0] for s in range(2)])
    feats = m.encode_image(pixels)
    assert feats.shape == (2, D, 8, 8)
    out = m(feats, torch.randn(3, K, D), torch.tensor([0, 1, 1]))
    assert out.mask_logits.shape == (3, 2, 32, 32)
    assert out.iou_scores.shape == (3, 2)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.iou_scores).all()
    # Prompts on the same image with different tokens give different masks; the two channels differ.
    assert not torch.allclose(out.mask_logits[1], out.mask_logits[2])
    assert not torch.allclose(out.mask_logits[:, REF], out.mask_logits[:, SEG])


def test_prompt_uses_its_own_image():
    m = make()
    feats = m.encode_image(torch.randn(2, 3, 64, 64))
    p = torch.randn(1, K, D)
    both = m(feats, p.expand(2, -1, -1), torch.tensor([0, 1]))
    only1 = m(feats[1:], p, torch.tensor([0]))
    assert_close_scaled(both.mask_logits[1:], only1.mask_logits, rel=1e-5)  # batched differently: rounding only
    assert not torch.allclose(both.mask_logits[0], both.mask_logits[1])


def test_zero_prompts():
    m = make()
    feats = m.encode_image(torch.randn(2, 3, 64, 64))
    out = m(feats, torch.zeros(0, K, D), torch.zeros(0, dtype=torch.long))
    assert out.mask_logits.shape == (0, 2, 32, 32)
    assert out.iou_scores.shape == (0, 2)


def test_preprocess_non_square():
    m = make()
    image = torch.full((3, 40, 64), 200, dtype=torch.uint8)
    pixels, frame = m.preprocess(image)
    assert frame == Frame(height=40, width=64, resized_height=40, resized_width=64, size=64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert torch.all(pixels[:, 40:, :] == 0)  # padding is exactly zero
    mean = torch.tensor(m.config.mean).view(3, 1)
    std = torch.tensor(m.config.std).view(3, 1)
    expected = ((200 / 255 - mean) / std).expand(3, 40 * 64).view(3, 40, 64)
    torch.testing.assert_close(pixels[:, :40, :], expected)
    assert (pixels[:, :40, :].abs() > 0.1).all()

    # Upscaling a small tall image: longest side goes to 64, padding on the right.
    pixels, frame = m.preprocess(random_image(20, 10))
    assert (frame.resized_height, frame.resized_width) == (64, 32)
    assert torch.all(pixels[:, :, 32:] == 0)
    assert pixels[:, :, :32].abs().sum(0).gt(0).float().mean() > 0.99


def test_masks_to_frame_round_trip():
    m = make()
    _, frame = m.preprocess(random_image(40, 64))
    mask = torch.zeros(1, 40, 64, dtype=torch.bool)
    mask[0, 10:30, 15:50] = True
    target = masks_to_frame(mask, frame, m.output_size)
    assert target.shape == (1, 32, 32)
    assert target[:, 20:].max() == 0  # the padded rows of the frame hold nothing
    back = logits_to_image(target * 20 - 10, frame)
    assert back.shape == (1, 40, 64)
    pred = back > 0
    iou = (pred & mask).sum() / (pred | mask).sum()
    assert iou > 0.9


def test_gradients_reach_every_parameter():
    m = make()
    feats = m.encode_image(torch.randn(2, 3, 64, 64))
    out = m(feats, torch.randn(3, K, D), torch.tensor([0, 1, 1]))
    target = torch.rand(3, 2, 32, 32)
    loss = F.binary_cross_entropy_with_logits(out.mask_logits, target) + out.iou_scores.square().mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _square_problem(n: int = 4):
    g = torch.Generator().manual_seed(1)
    images = torch.full((n, 3, 64, 64), 30, dtype=torch.uint8)
    masks = torch.zeros(n, 64, 64)
    for i in range(n):
        y, x = torch.randint(0, 40, (2,), generator=g).tolist()
        images[i, :, y : y + 20, x : x + 20] = 230
        masks[i, y : y + 20, x : x + 20] = 1
    return images, masks


def test_can_overfit_a_tiny_problem():
    m = make(seed=0)
    images, masks = _square_problem()
    pre = [m.preprocess(img) for img in images]
    pixels = torch.stack([p for p, _ in pre])
    target = torch.cat([masks_to_frame(mk[None], f, m.output_size) for mk, (_, f) in zip(masks, pre)])  # [4, 32, 32]
    torch.manual_seed(0)
    prompts = torch.nn.Parameter(torch.randn(4, K, D))
    opt = torch.optim.Adam([*m.parameters(), prompts], lr=3e-3)
    index = torch.arange(4)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out = m(m.encode_image(pixels), prompts, index)
        logits = out.mask_logits[:, SEG]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return loss, logits

    losses = []
    for _ in range(100):
        loss, logits = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final, logits = step()
    pred, tgt = logits > 0, target > 0.5
    iou = ((pred & tgt).sum() / (pred | tgt).sum()).item()
    assert final.item() < 0.5 * losses[0], (losses[0], final.item())
    assert iou > 0.7, iou


def test_prompts_select_the_target():
    """Two squares per image; each of the 4 learned prompts must pick out its own square."""
    m = make(seed=0)
    images = torch.full((2, 3, 64, 64), 30, dtype=torch.uint8)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    for j, (y, x) in enumerate([(4, 6), (36, 40), (40, 8), (8, 36)]):
        images[j // 2, :, y : y + 20, x : x + 20] = 230
        masks[j, y : y + 20, x : x + 20] = True
    index = torch.tensor([0, 0, 1, 1])
    pre = [m.preprocess(img) for img in images]
    pixels = torch.stack([p for p, _ in pre])
    target = torch.cat([masks_to_frame(mk[None], pre[i][1], m.output_size) for mk, i in zip(masks, index.tolist())])
    torch.manual_seed(0)
    prompts = torch.nn.Parameter(torch.randn(4, K, D))
    opt = torch.optim.Adam([*m.parameters(), prompts], lr=3e-3)
    for _ in range(100):
        logits = m(m.encode_image(pixels), prompts, index).mask_logits[:, SEG]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = m(m.encode_image(pixels), prompts, index).mask_logits[:, SEG]
    pred, tgt = logits > 0, target > 0.5
    ious = (pred & tgt).sum((1, 2)) / (pred | tgt).sum((1, 2))
    assert (ious > 0.7).all(), ious.tolist()
    # Back at the original resolution the two prompts on one image give two different masks.
    full = logits_to_image(logits[:2], pre[0][1]) > 0
    assert ((full & masks[:2]).sum((1, 2)) / (full | masks[:2]).sum((1, 2)) > 0.7).all()


@pytest.mark.parametrize(
    ("prompts", "index", "match"),
    [
        (torch.randn(2, K + 1, D), torch.tensor([0, 1]), "num_prompt_tokens"),
        (torch.randn(2, K, D + 1), torch.tensor([0, 1]), "prompt_dim"),
        (torch.randn(2, K, D), torch.tensor([0, 2]), "out of range"),
        (torch.randn(2, K, D), torch.tensor([-1, 0]), "out of range"),
        (torch.randn(2, K, D), torch.tensor([0]), "batch_index"),
        (torch.randn(2, K, D), torch.tensor([0.0, 1.0]), "integer"),
        (torch.randn(K, D), torch.tensor([0]), "prompts"),
    ],
)
def test_bad_decoder_input(prompts, index, match):
    m = make()
    feats = torch.randn(2, D, 8, 8)
    with pytest.raises(ValueError, match=match):
        m(feats, prompts, index)


def test_bad_features_and_pixels():
    m = make()
    with pytest.raises(ValueError, match="image_features"):
        m(torch.randn(2, D + 1, 8, 8), torch.randn(1, K, D), torch.tensor([0]))
    with pytest.raises(ValueError, match="image_features"):
        m(torch.randn(2, D, 4, 4), torch.randn(1, K, D), torch.tensor([0]))
    with pytest.raises(ValueError, match="pixels"):
        m.encode_image(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (torch.rand(3, 16, 16), "uint8"),
        (torch.zeros(4, 16, 16, dtype=torch.uint8), r"\[3, H, W\]"),
        (torch.zeros(16, 16, 3, dtype=torch.uint8), r"\[3, H, W\]"),
        (torch.zeros(16, 16, dtype=torch.uint8), r"\[3, H, W\]"),
        (torch.zeros(3, 0, 16, dtype=torch.uint8), "empty"),
    ],
)
def test_bad_image(image, match):
    with pytest.raises(ImageError, match=match):
        make().preprocess(image)


def test_bad_config():
    with pytest.raises(ConfigError, match="patch_size"):
        make(patch_size=7)
    with pytest.raises(ConfigError, match="heads"):
        make(heads=3)
    with pytest.raises(ConfigError, match="num_ref_tokens"):
        SamMaskDecoder(tiny_config(), num_prompt_tokens=2, num_ref_tokens=3)


def test_deterministic_under_seed():
    a, b = make(seed=3), make(seed=3)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_state_dict_round_trip():
    a, b = make(seed=0), make(seed=1)
    assert "pe.gaussian" in a.state_dict()
    assert not torch.equal(a.pe.gaussian, b.pe.gaussian)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval()
    b.eval()
    pixels = torch.randn(2, 3, 64, 64)
    prompts, index = torch.randn(3, K, D), torch.tensor([1, 0, 1])
    with torch.no_grad():
        oa = a(a.encode_image(pixels), prompts, index)
        ob = b(b.encode_image(pixels), prompts, index)
    assert torch.equal(oa.mask_logits, ob.mask_logits)
    assert torch.equal(oa.iou_scores, ob.iou_scores)


def test_positional_encoding():
    pe = RandomFourierPositionEncoding(D)
    enc = pe(8)
    assert enc.shape == (D, 8, 8)
    torch.testing.assert_close(enc[: D // 2].square() + enc[D // 2 :].square(), torch.ones(D // 2, 8, 8))
    assert not torch.allclose(enc[:, 0, 0], enc[:, 7, 7])


def test_bfloat16_autocast_and_cast():
    m = make()
    pixels = torch.randn(2, 3, 64, 64)
    prompts, index = torch.randn(3, K, D), torch.tensor([0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(m.encode_image(pixels), prompts, index)
    assert out.mask_logits.shape == (3, 2, 32, 32)
    assert torch.isfinite(out.mask_logits.float()).all()
    m = m.to(torch.bfloat16)
    out = m(m.encode_image(pixels), prompts, index)
    assert out.mask_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.iou_scores.float()).all()


@pytest.mark.parametrize(("k", "r"), [(1, 0), (4, 0), (4, 4), (8, 4)])
def test_prompt_splits(k, r):
    torch.manual_seed(0)
    m = SamMaskDecoder(tiny_config(), num_prompt_tokens=k, num_ref_tokens=r)
    out = m(torch.randn(1, D, 8, 8), torch.randn(2, k, D), torch.tensor([0, 0]))
    assert out.mask_logits.shape == (2, 2, 32, 32)
    assert out.iou_scores.shape == (2, 2)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "area"])
def test_an_image_at_its_frame_size_is_placed_unchanged(mode):
    # resize_and_pad skips interpolating an image already at its frame's size; that is only
    # right while interpolating to the same size gives the same values (it does today)
    torch.manual_seed(0)
    x = torch.rand(3, 2, 16, 16)
    frame = Frame.fit(16, 16, 16)
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    assert torch.equal(F.interpolate(x, size=(16, 16), mode=mode, **kwargs), x)
    assert torch.equal(resize_and_pad(x, frame, mode=mode), x)
    # a smaller image inside a larger frame is still resized and padded
    placed = resize_and_pad(x[..., :8, :], Frame.fit(8, 16, 32), mode=mode)
    assert placed.shape == (3, 2, 32, 32) and not placed[..., 16:, :].any()
