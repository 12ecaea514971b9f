"""The colour-guided edge filter: masks a pixel or two off an object's edge settle onto it."""

import dataclasses

import pytest
import torch

from segllm.config import EdgeFilterConfig, SegLLMConfig
from segllm.decoders.edge_filter import colour_guided_filter
from segllm.errors import ConfigError

SETTINGS = {"iterations": 10, "radius": 3, "sigma_space": 2.5, "sigma_colour": 0.03, "margin": 6}


def _scene():
    """A 64 x 64 grey image with a red 20 x 28 rectangle (rows 20-39, columns 16-43) and a thin
    red bar attached to its right side (rows 28-31, columns 44-51); the object's mask."""
    image = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    obj = torch.zeros(64, 64, dtype=torch.bool)
    obj[20:40, 16:44] = True
    obj[28:32, 44:52] = True
    image[:, obj] = torch.tensor([220, 30, 30], dtype=torch.uint8)[:, None]
    return image, obj


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_a_coarse_mask_settles_onto_the_object():
    image, obj = _scene()
    # the decoder's coarse answer: the rectangle with rounded, shrunk edges, the thin bar missed,
    # and a pixel of spill onto the background at the top
    coarse = torch.zeros(64, 64, dtype=torch.bool)
    coarse[22:38, 18:42] = True
    coarse[19, 25:35] = True
    logits = torch.where(coarse, 4.0, -4.0)[None]
    got = colour_guided_filter(logits, image, **SETTINGS)[0] > 0
    before, after = _iou(coarse, obj), _iou(got, obj)
    assert before < 0.8 and after > 0.95, (before, after)
    assert not (got & ~obj).any()  # the spill onto the grey background is gone
    assert got[20:40, 16:44].all()  # the rectangle to its edges; the thin bar only its first pixel
    assert got[28:32, 44].all() and not got[28:32, 46:].any()


def test_only_each_masks_box_changes_and_per_mask_images():
    image, obj = _scene()
    other = torch.full((3, 64, 64), 128, dtype=torch.uint8)  # a plain grey image: nothing to follow
    coarse = torch.zeros(2, 64, 64, dtype=torch.bool)
    coarse[:, 22:38, 18:42] = True
    logits = torch.where(coarse, 4.0, -4.0)
    logits[:, 0, 0] = -9.0  # far outside the masks' boxes (grown by the margin): kept as given
    got = colour_guided_filter(logits, torch.stack([image, other]), **SETTINGS)
    assert torch.equal(got[:, :10], logits[:, :10]) and torch.equal(got[:, 50:], logits[:, 50:])
    assert _iou(got[0] > 0, obj) > 0.95  # its own image: the object
    assert _iou(got[1] > 0, obj) < 0.8  # a featureless image: the filter only blurs its corners
    single = colour_guided_filter(logits[:1], image, **SETTINGS)
    torch.testing.assert_close(single[0], got[0])


def test_off_empty_and_bad_shapes():
    image, _ = _scene()
    logits = torch.randn(3, 64, 64)
    assert colour_guided_filter(logits, image, **{**SETTINGS, "iterations": 0}) is logits
    empty = torch.full((1, 64, 64), -3.0)  # no pixel above 0: left as it is
    assert torch.equal(colour_guided_filter(empty, image, **SETTINGS), empty)
    assert colour_guided_filter(torch.zeros(0, 64, 64), image, **SETTINGS).shape == (0, 64, 64)
    with pytest.raises(ValueError, match="same M and S"):
        colour_guided_filter(logits, image[:, :32, :32], **SETTINGS)
    with pytest.raises(ValueError, match="same M and S"):
        colour_guided_filter(logits, image[None].expand(2, -1, -1, -1), **SETTINGS)
    half = colour_guided_filter(logits.half(), image, **SETTINGS)
    assert half.dtype == torch.float16


def test_config_is_off_by_default_checked_and_saved():
    assert not SegLLMConfig().edge_filter.on
    cfg = SegLLMConfig(edge_filter=EdgeFilterConfig(iterations=10))
    assert cfg.edge_filter.on
    assert SegLLMConfig.from_dict(cfg.to_dict()).edge_filter == cfg.edge_filter
    old = cfg.to_dict()
    del old["edge_filter"]  # a checkpoint saved before the filter existed: off
    assert not SegLLMConfig.from_dict(old).edge_filter.on
    for bad in ({"iterations": -1}, {"radius": 0}, {"sigma_colour": 0.0}, {"margin": -2}):
        with pytest.raises(ConfigError, match="edge_filter"):
            dataclasses.replace(EdgeFilterConfig(), **bad)
