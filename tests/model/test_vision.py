import pytest
import torch
import torch.nn.functional as F

from segllm.config import VisionConfig
from segllm.errors import ImageError
from segllm.model import vision
from segllm.model.vision import VisionTower, build_vision_model

HF = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 16,
      "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.mark.parametrize("resize", ["squash", "center_crop", "pad"])
def test_preprocess_shapes(resize):
    cfg = VisionConfig(hf_config=HF, image_size=32, resize=resize, mean=(0.5,) * 3, std=(0.5,) * 3)
    tower = VisionTower(build_vision_model(cfg), cfg)
    img = torch.full((3, 20, 40), 255, dtype=torch.uint8)
    x = tower.preprocess(img)
    assert x.shape == (3, 32, 32)
    if resize == "pad":
        assert torch.allclose(x[:, :16], torch.ones(3, 16, 32), atol=1e-5)
        assert x[:, 16:].abs().max() == 0  # padding is the normalised zero
    else:
        assert torch.allclose(x, torch.ones_like(x), atol=1e-5)


@pytest.mark.parametrize("size", [(12, 12, 128, 128), (37, 37, 128, 128), (5, 1, 128, 128), (90, 60, 32, 21),
                                  (128, 128, 64, 64), (7, 100, 3, 40), (300, 200, 128, 85), (1, 3000, 128, 128)])
def test_resize_is_interpolates_antialiased_bicubic(size):
    """The matrix form of the resize (small inputs) and F.interpolate (large ones) give
    F.interpolate's values up to float rounding, upsampling and downsampling, square or not;
    a change of the weights (another filter, no antialiasing, axes swapped) fails this."""
    H, W, h, w = size
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(H * 1000 + W))
    want = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    vision._RESIZE_WEIGHTS.clear()
    got = vision._resize(x.clone(), h, w)
    assert got.shape == (2, 3, h, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    used_matrices = bool(vision._RESIZE_WEIGHTS)
    assert used_matrices == (max(H, W) <= vision._MATRIX_RESIZE_MAX_SIDE)


def test_tokens_and_pool():
    cfg = VisionConfig(hf_config=HF, image_size=32)
    tower = VisionTower(build_vision_model(cfg), cfg)
    x = torch.randn(2, 3, 32, 32)
    assert tower(x).shape == (2, 16, 16)
    assert tower.num_tokens == 16
    assert tower.pool(x).shape == (2, 16)
    cfg_mean = VisionConfig(hf_config=HF, image_size=32, pool="mean")
    t2 = VisionTower(tower.model, cfg_mean)
    torch.testing.assert_close(t2.pool(x), tower(x).mean(1))


def test_bad_image():
    cfg = VisionConfig(hf_config=HF, image_size=32)
    tower = VisionTower(build_vision_model(cfg), cfg)
    with pytest.raises(ImageError):
        tower.preprocess(torch.zeros(3, 8, 8))
    with pytest.raises(ImageError):
        tower.preprocess(torch.zeros(4, 8, 8, dtype=torch.uint8))
