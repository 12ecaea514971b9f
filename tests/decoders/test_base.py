"""Mask helpers of the decoder interface (segllm/decoders/base.py)."""

import torch

from segllm.decoders.base import most_confident_region


def test_the_region_with_the_most_probability_mass_is_kept():
    logits = torch.full((3, 12, 12), -4.0)
    logits[0, 1:3, 1:3] = 9.0  # small and sure: mass ~4
    logits[0, 6:11, 6:11] = 1.0  # large and unsure: mass ~18, kept
    logits[1, 1:3, 1:3] = 9.0  # kept
    logits[1, 6:8, 6:8] = 0.5
    keep = most_confident_region(logits)
    assert keep.dtype == torch.bool and keep.shape == logits.shape
    assert torch.equal(keep[0], logits[0] == 1.0)
    assert torch.equal(keep[1], logits[1] == 9.0)
    assert not keep[2].any()  # nothing above the threshold: nothing kept


def test_pixels_touching_at_a_corner_are_one_region_and_a_snake_is_followed_to_its_end():
    logits = torch.full((2, 16, 16), -1.0)
    logits[0, 2, 2] = logits[0, 3, 3] = logits[0, 4, 4] = 3.0  # a diagonal line: 8-connected
    logits[0, 10, 10] = 5.0  # a brighter dot, less mass than the line
    for r in range(0, 16, 4):  # a snake across the whole map, turning at alternate ends
        logits[1, r, :] = 1.0
        if r + 2 < 16:
            logits[1, r + 1 : r + 4, 15 if r % 8 == 0 else 0] = 1.0
    logits[1, 2, 5:8] = 4.0  # a brighter bar inside the loops, apart from the snake
    keep = most_confident_region(logits)
    assert torch.equal(keep[0], logits[0] == 3.0)
    assert torch.equal(keep[1], logits[1] == 1.0)


def test_an_empty_batch():
    assert most_confident_region(torch.zeros(0, 5, 5)).shape == (0, 5, 5)


def test_the_3x3_maximum_is_max_pooling():
    from segllm.decoders.base import _dilate3

    x = torch.rand(2, 9, 13)
    assert torch.equal(_dilate3(x), torch.nn.functional.max_pool2d(x[:, None], 3, stride=1, padding=1)[:, 0])
